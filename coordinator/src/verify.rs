//! Verification: when do two results for the same micro-batch and model version agree, and how disagreements
//! are settled.
//!
//! Two results agree when their losses match to `tolerance` relatively, their correct counts differ by at most
//! one row (an arg-max near a tie may flip between devices), and their gradients are within [`distance`]
//! `tolerance`: `‖g₁ − g₂‖₂ / max(‖g₁‖₂, ‖g₂‖₂, SCALE_FLOOR · scale)`, where `scale` is the job's typical gradient
//! norm ([`Scale`]). The floor is what keeps the rule meaningful for honest devices on confident micro-batches:
//! once the loss is below ~1e-4 the gradient is tiny and `softmax − onehot` cancels in float32, so two honest
//! evaluations differ by 1e-3..1e-2 of *that* gradient's norm (measured in `coordinator/tests/tolerance.rs`),
//! while their absolute difference stays ~1e-7 of a typical gradient. Measured against the larger of the two
//! norms and the floor, honest pairs stay far below 1e-3, and a sign flip, a ×10 scale, zeros or noise at 1% of
//! the gradient are still far outside it whenever they could move the model by more than `tolerance ·
//! SCALE_FLOOR` of a typical micro-batch gradient.

/// One validated result as verification sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub loss: f32,
    pub correct: u32,
    pub grad: &'a [f32],
}

/// Why a result is refused before any comparison.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Invalid {
    #[error("gradient has {got} values, the model has {expected}")]
    Length { got: usize, expected: usize },
    #[error("gradient holds a non-finite value at index {0}")]
    NonFinite(usize),
    #[error("loss {0} is not a finite non-negative number")]
    Loss(f32),
    #[error("correct count {correct} exceeds the {rows} rows of the micro-batch")]
    Correct { correct: u32, rows: u32 },
}

/// Checks a result on its own: length, finiteness, plausible loss and count.
pub fn validate(
    loss: f32,
    correct: u32,
    rows: u32,
    grad: &[f32],
    params: usize,
) -> Result<(), Invalid> {
    if grad.len() != params {
        return Err(Invalid::Length {
            got: grad.len(),
            expected: params,
        });
    }
    if let Some(i) = grad.iter().position(|v| !v.is_finite()) {
        return Err(Invalid::NonFinite(i));
    }
    if !(loss.is_finite() && loss >= 0.0) {
        return Err(Invalid::Loss(loss));
    }
    if correct > rows {
        return Err(Invalid::Correct { correct, rows });
    }
    Ok(())
}

/// `‖a − b‖₂ / max(‖a‖₂, ‖b‖₂)`, accumulated in f64; 0 when both are zero (the rule before the scale floor, kept
/// for logs and the calibration test).
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    distance(a, b, 0.0)
}

/// Share of the job's typical gradient norm below which a gradient's own norm no longer sets the comparison's
/// scale (calibrated in `coordinator/tests/tolerance.rs`: honest naive-float32 vs CPU-engine pairs stay below
/// 1e-4 under this floor; see docs/PROTOCOL.md, Verification).
pub const SCALE_FLOOR: f64 = 0.05;

/// `‖a − b‖₂ / max(‖a‖₂, ‖b‖₂, SCALE_FLOOR · scale)`, accumulated in f64; `‖a − b‖₂` when all of them are zero.
pub fn distance(a: &[f32], b: &[f32], scale: f64) -> f64 {
    let (mut diff, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        diff += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
    }
    let norm = na.max(nb).sqrt().max(SCALE_FLOOR * scale);
    if norm == 0.0 {
        diff.sqrt()
    } else {
        diff.sqrt() / norm
    }
}

/// `‖g‖₂`, accumulated in f64.
pub fn l2_norm(g: &[f32]) -> f64 {
    g.iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt()
}

/// A job's typical micro-batch gradient norm: a slowly decaying maximum of the norms of *accepted* gradients
/// (so only verified results move it). It decays by [`Scale::DECAY`] per accepted micro-batch, so it follows the
/// gradients down as training converges, but one confident micro-batch does not pull it down; 0 (the plain
/// relative rule) until the first acceptance.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scale(pub f64);

impl Scale {
    /// Per-acceptance decay: after ~1,400 accepted micro-batches without a larger gradient it has halved.
    pub const DECAY: f64 = 0.9995;

    /// Folds in an accepted gradient's norm.
    pub fn observe(&mut self, norm: f64) {
        if norm.is_finite() {
            self.0 = (self.0 * Self::DECAY).max(norm);
        }
    }
}

/// Whether the losses agree within `tolerance` relatively (with an absolute floor of `tolerance · 1e-3`) and the
/// correct counts within one row.
fn loss_and_count_agree(a: &Candidate<'_>, b: &Candidate<'_>, tolerance: f32) -> bool {
    let tol = tolerance as f64;
    ((a.loss - b.loss).abs() as f64) <= tol * (a.loss.abs().max(b.loss.abs()) as f64).max(1e-3)
        && a.correct.abs_diff(b.correct) <= 1
}

/// Whether two results agree within `tolerance` at gradient scale `scale` (see the module docs).
pub fn agree(a: &Candidate<'_>, b: &Candidate<'_>, tolerance: f32, scale: f64) -> bool {
    loss_and_count_agree(a, b, tolerance) && distance(a.grad, b.grad, scale) <= tolerance as f64
}

/// Largest [`distance`] of a *near miss*: a result whose loss and correct count agree but whose gradient is off
/// by more than the tolerance, as happens honestly when a ReLU input rounds to either side of zero on two
/// devices (measured: 7.6e-3 for one flipped unit on a confident 784-128-10 micro-batch). Near misses are never
/// accepted into the model, but they are not struck either.
pub const NEAR_MISS: f64 = 5e-2;

/// Whether `a` is a near miss of `reference`: loss and correct count agree, gradient within [`NEAR_MISS`].
pub fn near_miss(a: &Candidate<'_>, reference: &Candidate<'_>, tolerance: f32, scale: f64) -> bool {
    loss_and_count_agree(a, reference, tolerance)
        && distance(a.grad, reference.grad, scale) <= NEAR_MISS
}

/// Where a micro-batch's replicas stand once compared with each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Fewer than `quorum` results, none disagreeing: wait for more.
    Waiting,
    /// At least `quorum` results, all agreeing with the first.
    Agreed,
    /// Some results disagree: clusters of mutual agreement with each cluster's first member, largest first (ties
    /// in arrival order), as indices into the results. A majority is **not** proof — two colluders agree with each
    /// other as well as two honest workers do — so the caller settles this by an independent recomputation and
    /// never strikes the smaller clusters by vote.
    Disagree(Vec<Vec<usize>>),
}

/// Compares a micro-batch's replicas with each other (see [`Settle`]).
pub fn settle(results: &[Candidate<'_>], quorum: usize, tolerance: f32, scale: f64) -> Settle {
    settle_by(results.len(), quorum, |a, b| {
        agree(&results[a], &results[b], tolerance, scale)
    })
}

/// [`settle`] over `n` results with any agreement rule (`agree(a, b)` on indices); `local` leases add the
/// comparison of their inner traces.
pub fn settle_by(n: usize, quorum: usize, agree: impl Fn(usize, usize) -> bool) -> Settle {
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        match clusters.iter_mut().find(|c| agree(c[0], i)) {
            Some(c) => c.push(i),
            None => clusters.push(vec![i]),
        }
    }
    match clusters.len() {
        0 => Settle::Waiting,
        1 if clusters[0].len() >= quorum => Settle::Agreed,
        1 => Settle::Waiting,
        _ => {
            clusters.sort_by_key(|c| std::cmp::Reverse(c.len()));
            Settle::Disagree(clusters)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(grad: &[f32]) -> Candidate<'_> {
        Candidate {
            loss: 1.0,
            correct: 5,
            grad,
        }
    }

    #[test]
    fn honest_noise_agrees_and_attacks_do_not() {
        let g: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let jitter: Vec<f32> = g
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + 1e-6 * ((i % 3) as f32 - 1.0)))
            .collect();
        let flipped: Vec<f32> = g.iter().map(|v| -v).collect();
        let scaled: Vec<f32> = g.iter().map(|v| v * 10.0).collect();
        let noised: Vec<f32> = g
            .iter()
            .enumerate()
            .map(|(i, v)| v + 0.02 * ((i % 7) as f32 - 3.0))
            .collect();
        let zeros = vec![0.0f32; 1000];
        assert!(agree(&c(&g), &c(&jitter), DEFAULT, 0.0));
        for bad in [&flipped, &scaled, &noised, &zeros] {
            assert!(!agree(&c(&g), &c(bad), DEFAULT, 0.0));
            // A typical norm equal to the gradient norm changes nothing.
            assert!(!agree(&c(&g), &c(bad), DEFAULT, l2_norm(&g)));
        }
        let other_loss = Candidate {
            loss: 1.01,
            correct: 5,
            grad: &g,
        };
        assert!(!agree(&c(&g), &other_loss, DEFAULT, 0.0));
    }

    const DEFAULT: f32 = crate::job::DEFAULT_TOLERANCE;

    #[test]
    fn any_disagreement_is_reported_not_decided_by_majority() {
        let g = vec![1.0f32, 2.0, 3.0];
        let bad = vec![-1.0f32, -2.0, -3.0];
        assert_eq!(settle(&[c(&g)], 2, DEFAULT, 0.0), Settle::Waiting);
        assert_eq!(settle(&[c(&g), c(&g)], 2, DEFAULT, 0.0), Settle::Agreed);
        assert_eq!(
            settle(&[c(&g), c(&bad)], 2, DEFAULT, 0.0),
            Settle::Disagree(vec![vec![0], vec![1]])
        );
        // Two agreeing results against one are still a disagreement, whichever side arrived first.
        assert_eq!(
            settle(&[c(&bad), c(&g), c(&g)], 2, DEFAULT, 0.0),
            Settle::Disagree(vec![vec![1, 2], vec![0]])
        );
    }

    #[test]
    fn the_scale_floor_only_loosens_tiny_gradients() {
        let g: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 1e-6).collect();
        let off: Vec<f32> = g.iter().map(|v| v * 1.005).collect();
        let scale = 1000.0 * l2_norm(&g);
        // 5e-3 of a gradient 1/1000 of the typical norm: outside the plain relative rule, inside the floored one.
        assert!(relative_l2(&g, &off) > DEFAULT as f64);
        assert!(distance(&g, &off, scale) < 1e-4);
        // A gradient at the typical norm is compared relatively, exactly as without the floor.
        let big: Vec<f32> = g.iter().map(|v| v * 1000.0).collect();
        let big_off: Vec<f32> = off.iter().map(|v| v * 1000.0).collect();
        assert_eq!(distance(&big, &big_off, scale), relative_l2(&big, &big_off));
        let mut s = Scale::default();
        s.observe(2.0);
        s.observe(1.0);
        assert_eq!(s.0, 2.0 * Scale::DECAY);
    }

    #[test]
    fn invalid_results_are_named() {
        assert_eq!(
            validate(1.0, 1, 4, &[0.0; 3], 4),
            Err(Invalid::Length {
                got: 3,
                expected: 4
            })
        );
        assert_eq!(
            validate(1.0, 1, 4, &[0.0, f32::NAN], 2),
            Err(Invalid::NonFinite(1))
        );
        assert_eq!(
            validate(f32::INFINITY, 1, 4, &[0.0], 1),
            Err(Invalid::Loss(f32::INFINITY))
        );
        assert_eq!(
            validate(1.0, 9, 4, &[0.0], 1),
            Err(Invalid::Correct {
                correct: 9,
                rows: 4
            })
        );
    }
}
