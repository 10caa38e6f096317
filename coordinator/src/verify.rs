//! Verification: when do two results for the same micro-batch and model version agree, and which result wins.
//!
//! Two results agree when their losses match to `tolerance` relatively, their correct counts differ by at most
//! one row (an arg-max near a tie may flip between devices), and their gradients are within relative L2 distance
//! `tolerance`: `‖g₁ − g₂‖₂ / max(‖g₁‖₂, ‖g₂‖₂) ≤ tolerance`. Honest f32 results from different GPUs, CPUs and
//! browsers differ by summation order and fused multiply-adds, measured here at ~1e-6 relative; 1e-3 leaves
//! three orders of magnitude of headroom while a sign flip (distance 2), a ×10 scale (0.9) or noise at 1% of the
//! gradient norm (0.01) are far outside it.

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

/// `‖a − b‖₂ / max(‖a‖₂, ‖b‖₂)`, accumulated in f64; 0 when both are zero.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        diff += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
    }
    let norm = na.max(nb).sqrt();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        diff.sqrt() / norm
    }
}

/// Whether two results agree within `tolerance` (see the module docs).
pub fn agree(a: &Candidate<'_>, b: &Candidate<'_>, tolerance: f32) -> bool {
    let tol = tolerance as f64;
    let loss_ok =
        ((a.loss - b.loss).abs() as f64) <= tol * (a.loss.abs().max(b.loss.abs()) as f64).max(1e-3);
    loss_ok && a.correct.abs_diff(b.correct) <= 1 && relative_l2(a.grad, b.grad) <= tol
}

/// Largest relative L2 distance of a *near miss*: a result whose loss and correct count agree but whose gradient
/// is off by more than the tolerance, as happens honestly when a ReLU input rounds to either side of zero on two
/// devices (measured: 7.6e-3 for one flipped unit on a confident 784-128-10 micro-batch). Near misses are never
/// accepted into the model, but they are not struck either.
pub const NEAR_MISS: f64 = 5e-2;

/// Whether `a` is a near miss of `reference`: loss and correct count agree, gradient within [`NEAR_MISS`].
pub fn near_miss(a: &Candidate<'_>, reference: &Candidate<'_>, tolerance: f32) -> bool {
    let loss_ok = ((a.loss - reference.loss).abs() as f64)
        <= tolerance as f64 * (a.loss.abs().max(reference.loss.abs()) as f64).max(1e-3);
    loss_ok
        && a.correct.abs_diff(reference.correct) <= 1
        && relative_l2(a.grad, reference.grad) <= NEAR_MISS
}

/// Groups results into clusters of mutual agreement with each cluster's first member, and returns the first
/// cluster (in arrival order) with at least `quorum` members: `(winners, losers)` as indices into `results`.
pub fn settle(
    results: &[Candidate<'_>],
    quorum: usize,
    tolerance: f32,
) -> Option<(Vec<usize>, Vec<usize>)> {
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match clusters
            .iter_mut()
            .find(|c| agree(&results[c[0]], r, tolerance))
        {
            Some(c) => c.push(i),
            None => clusters.push(vec![i]),
        }
    }
    let winners = clusters.into_iter().find(|c| c.len() >= quorum)?;
    let losers = (0..results.len())
        .filter(|i| !winners.contains(i))
        .collect();
    Some((winners, losers))
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
        assert!(agree(&c(&g), &c(&jitter), DEFAULT));
        for bad in [&flipped, &scaled, &noised, &zeros] {
            assert!(!agree(&c(&g), &c(bad), DEFAULT));
        }
        let other_loss = Candidate {
            loss: 1.01,
            correct: 5,
            grad: &g,
        };
        assert!(!agree(&c(&g), &other_loss, DEFAULT));
    }

    const DEFAULT: f32 = crate::job::DEFAULT_TOLERANCE;

    #[test]
    fn majority_wins_with_a_tie_breaker() {
        let g = vec![1.0f32, 2.0, 3.0];
        let bad = vec![-1.0f32, -2.0, -3.0];
        assert_eq!(settle(&[c(&g), c(&bad)], 2, DEFAULT), None);
        assert_eq!(
            settle(&[c(&g), c(&bad), c(&g)], 2, DEFAULT),
            Some((vec![0, 2], vec![1]))
        );
        assert_eq!(
            settle(&[c(&bad), c(&g), c(&g)], 2, DEFAULT),
            Some((vec![1, 2], vec![0]))
        );
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
