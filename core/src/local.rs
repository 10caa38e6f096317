//! The inner loop of a local-training lease (protocol v2): H optimizer steps from the lease's base parameters θ_v
//! over a seeded order of the lease's rows, with a fresh inner optimizer, returning Δ = θ_end − θ_v.
//!
//! It is written sans-IO — [`InnerLoop`] says which rows to compute next and takes the engine's [`StepOutput`] —
//! so the worker drives it with whatever engine it has (the async WGSL engine or the CPU backend) and the
//! coordinator replays a lease with [`run_cpu`]. Everything that is not the engine's forward/backward pass (row
//! order, optimizer arithmetic, the delta) is computed here in f32 in a fixed order, so two replicas of a lease
//! differ only by what their engines' gradients differ by.

use serde::{Deserialize, Serialize};

use crate::cpu::CpuEngine;
use crate::optim::{Optimizer, OptimizerSpec};
use crate::rng::SplitMix64;
use crate::{BatchError, ModelSpec, StepOutput};

/// Most inner steps one lease may ask for.
pub const MAX_H: u32 = 1024;

/// What a lease asks a worker to run (carried by the `local_lease` message).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeasePlan {
    /// Inner steps.
    pub h: u32,
    /// Rows per inner step.
    pub inner_batch: u32,
    /// Seed of the row order (see [`row_order`]).
    pub seed: u64,
    /// The inner optimizer; its state starts from zero every lease.
    pub optimizer: OptimizerSpec,
}

/// Why a lease cannot run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LocalError {
    #[error("h must be in 1..={MAX_H}, got {0}")]
    H(u32),
    #[error("inner_batch must be in 1..=rows of the lease ({rows}), got {got}")]
    InnerBatch { got: u32, rows: usize },
    #[error("inner optimizer: {0}")]
    Optimizer(String),
    #[error("base parameters hold {got} values, the model has {expected}")]
    Params { got: usize, expected: usize },
    #[error("inner step {step} produced a non-finite gradient or loss")]
    NonFinite { step: u32 },
    #[error("inner step {step}: gradient has {got} values, expected {expected}")]
    GradLength {
        step: u32,
        got: usize,
        expected: usize,
    },
    #[error("all {0} inner steps have run")]
    Finished(u32),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl LeasePlan {
    /// Checks the plan against a lease of `rows` rows.
    pub fn validate(&self, rows: usize) -> Result<(), LocalError> {
        if !(1..=MAX_H).contains(&self.h) {
            return Err(LocalError::H(self.h));
        }
        if self.inner_batch == 0 || self.inner_batch as usize > rows {
            return Err(LocalError::InnerBatch {
                got: self.inner_batch,
                rows,
            });
        }
        self.optimizer.validate().map_err(LocalError::Optimizer)
    }
}

/// The positions (into the lease's rows) of each inner step's batch: the lease's rows are walked in a sequence of
/// permutations drawn from one `SplitMix64::new(seed)` (a fresh permutation each time the rows run out), and step
/// `i` takes positions `i·B .. (i+1)·B` of that sequence. Both replicas derive it from the lease alone.
pub fn row_order(rows: usize, plan: &LeasePlan) -> Vec<Vec<u32>> {
    let b = plan.inner_batch as usize;
    let need = plan.h as usize * b;
    let mut rng = SplitMix64::new(plan.seed);
    let mut seq = Vec::with_capacity(need + rows);
    while seq.len() < need {
        let mut perm: Vec<u32> = (0..rows as u32).collect();
        rng.shuffle(&mut perm);
        seq.extend_from_slice(&perm);
    }
    seq.truncate(need);
    seq.chunks(b).map(<[u32]>::to_vec).collect()
}

/// What a lease produces.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalOutput {
    /// θ_end − θ_v, in the spec's flat layout.
    pub delta: Vec<f32>,
    /// The mean loss of each inner step's batch, before that step's update.
    pub losses: Vec<f32>,
    /// Rows classified correctly in each inner step's batch.
    pub correct: Vec<u32>,
}

/// The H-step loop of one lease, driven by the caller's engine (see the module docs).
#[derive(Debug)]
pub struct InnerLoop {
    base: Vec<f32>,
    params: Vec<f32>,
    optim: Optimizer,
    order: Vec<Vec<u32>>,
    losses: Vec<f32>,
    correct: Vec<u32>,
}

impl InnerLoop {
    /// Starts a lease over `rows` rows from the base parameters.
    pub fn new(base: &[f32], plan: &LeasePlan, rows: usize) -> Result<Self, LocalError> {
        plan.validate(rows)?;
        Ok(Self {
            base: base.to_vec(),
            params: base.to_vec(),
            optim: Optimizer::new(plan.optimizer, base.len()),
            order: row_order(rows, plan),
            losses: Vec::with_capacity(plan.h as usize),
            correct: Vec::with_capacity(plan.h as usize),
        })
    }

    /// Inner steps done so far.
    pub fn done(&self) -> u32 {
        self.losses.len() as u32
    }

    /// Inner steps in the lease.
    pub fn h(&self) -> u32 {
        self.order.len() as u32
    }

    /// The positions (into the lease's rows) of the next inner step's batch, or `None` when all have run.
    pub fn next_rows(&self) -> Option<&[u32]> {
        self.order.get(self.losses.len()).map(Vec::as_slice)
    }

    /// The parameters the next inner step must be computed at.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Takes the engine's output for the batch [`InnerLoop::next_rows`] named and applies one inner update.
    pub fn apply(&mut self, out: &StepOutput) -> Result<(), LocalError> {
        let step = self.done();
        if step >= self.h() {
            return Err(LocalError::Finished(self.h()));
        }
        if out.grad.len() != self.params.len() {
            return Err(LocalError::GradLength {
                step,
                got: out.grad.len(),
                expected: self.params.len(),
            });
        }
        if !out.loss.is_finite() || out.grad.iter().any(|g| !g.is_finite()) {
            return Err(LocalError::NonFinite { step });
        }
        self.optim.step(&mut self.params, &out.grad);
        self.losses.push(out.loss);
        self.correct.push(out.correct);
        Ok(())
    }

    /// Δ = θ_end − θ_v and the traces; call once every step has run.
    pub fn finish(self) -> LocalOutput {
        let delta = self
            .params
            .iter()
            .zip(&self.base)
            .map(|(p, b)| p - b)
            .collect();
        LocalOutput {
            delta,
            losses: self.losses,
            correct: self.correct,
        }
    }
}

/// Gathers the rows at `positions` of a lease's features (`input` wide) and labels (one per row).
pub fn gather(x: &[f32], labels: &[u32], input: usize, positions: &[u32]) -> (Vec<f32>, Vec<u32>) {
    gather_rows(x, labels, (input, 1), positions)
}

/// Gathers the rows at `positions` of a lease's features (`input` wide) and labels (`per_row` each: 1 for a
/// classifier, `T` for a language model, whose rows are token windows; `ModelSpec::labels_per_row`).
pub fn gather_rows(
    x: &[f32],
    labels: &[u32],
    (input, per_row): (usize, usize),
    positions: &[u32],
) -> (Vec<f32>, Vec<u32>) {
    let mut bx = Vec::with_capacity(positions.len() * input);
    let mut by = Vec::with_capacity(positions.len() * per_row);
    for &p in positions {
        let p = p as usize;
        bx.extend_from_slice(&x[p * input..(p + 1) * input]);
        by.extend_from_slice(&labels[p * per_row..(p + 1) * per_row]);
    }
    (bx, by)
}

/// Runs a whole lease on the CPU backend: how the coordinator replays a lease to settle a disagreement, and how a
/// CPU worker computes one. `x` and `labels` are the lease's rows in payload order (`labels_per_row` labels each:
/// a language model's rows are token windows with their next tokens).
pub fn run_cpu(
    engine: &mut CpuEngine,
    base: &[f32],
    plan: &LeasePlan,
    x: &[f32],
    labels: &[u32],
) -> Result<LocalOutput, LocalError> {
    let spec: &ModelSpec = engine.spec();
    let (input, expected) = (spec.input_len(), spec.param_count());
    if base.len() != expected {
        return Err(LocalError::Params {
            got: base.len(),
            expected,
        });
    }
    crate::check_batch(spec, x, labels)?;
    let per_row = spec.labels_per_row();
    let mut lp = InnerLoop::new(base, plan, labels.len() / per_row.max(1))?;
    while let Some(rows) = lp.next_rows() {
        let (bx, by) = gather_rows(x, labels, (input, per_row), rows);
        engine.load(lp.params())?;
        let out = engine.step(&bx, &by)?;
        lp.apply(&out)?;
    }
    Ok(lp.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Activation, Input, Layer};

    fn tiny() -> (ModelSpec, Vec<f32>, Vec<u32>) {
        let spec = ModelSpec {
            input: Input::Features(6),
            layers: vec![
                Layer::dense(5, Activation::Relu),
                Layer::dense(3, Activation::None),
            ],
        };
        let mut r = SplitMix64::new(3);
        let rows = 20;
        let x = (0..rows * 6).map(|_| r.normal() as f32).collect();
        let y = (0..rows).map(|i| (i % 3) as u32).collect();
        (spec, x, y)
    }

    fn plan(h: u32, optimizer: OptimizerSpec) -> LeasePlan {
        LeasePlan {
            h,
            inner_batch: 8,
            seed: 42,
            optimizer,
        }
    }

    #[test]
    fn row_order_is_seeded_covers_every_row_per_pass_and_cycles() {
        let p = plan(
            5,
            OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.0,
            },
        );
        let order = row_order(20, &p);
        assert_eq!(order.len(), 5);
        assert!(order.iter().all(|b| b.len() == 8));
        assert_eq!(order, row_order(20, &p), "same lease, same order");
        let flat: Vec<u32> = order.concat();
        let mut first: Vec<u32> = flat[..20].to_vec();
        first.sort_unstable();
        assert_eq!(
            first,
            (0..20).collect::<Vec<_>>(),
            "each pass is a permutation"
        );
        let other = LeasePlan { seed: 43, ..p };
        assert_ne!(order, row_order(20, &other));
    }

    #[test]
    fn replicas_compute_the_same_delta_and_the_optimizer_state_resets_every_lease() {
        let (spec, x, y) = tiny();
        let base = spec.init_params(7);
        for opt in [
            OptimizerSpec::Sgd {
                lr: 0.05,
                momentum: 0.9,
            },
            OptimizerSpec::Adam {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let p = plan(6, opt);
            let a = run_cpu(&mut CpuEngine::new(spec.clone()), &base, &p, &x, &y).unwrap();
            let mut engine = CpuEngine::new(spec.clone());
            let b = run_cpu(&mut engine, &base, &p, &x, &y).unwrap();
            // The same engine again: nothing carries across leases.
            let c = run_cpu(&mut engine, &base, &p, &x, &y).unwrap();
            assert_eq!(a, b);
            assert_eq!(a, c);
            assert_eq!(a.losses.len(), 6);
            assert!(a.delta.iter().any(|d| *d != 0.0));
            // The loop is exactly H steps of the optimizer on the engine's gradients.
            let mut params = base.clone();
            let mut optim = Optimizer::new(opt, base.len());
            let mut engine = CpuEngine::new(spec.clone());
            for rows in row_order(y.len(), &p) {
                let (bx, by) = gather(&x, &y, 6, &rows);
                engine.load(&params).unwrap();
                let out = engine.step(&bx, &by).unwrap();
                optim.step(&mut params, &out.grad);
            }
            let delta: Vec<f32> = params.iter().zip(&base).map(|(p, b)| p - b).collect();
            assert_eq!(a.delta, delta);
        }
    }

    #[test]
    fn a_lease_trains_and_bad_plans_are_named() {
        let (spec, x, y) = tiny();
        let base = spec.init_params(1);
        let p = plan(
            40,
            OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.9,
            },
        );
        let out = run_cpu(&mut CpuEngine::new(spec.clone()), &base, &p, &x, &y).unwrap();
        let first: f32 = out.losses[..5].iter().sum();
        let last: f32 = out.losses[35..].iter().sum();
        assert!(last < first, "{:?}", out.losses);
        let bad = LeasePlan { h: 0, ..p };
        assert_eq!(
            run_cpu(&mut CpuEngine::new(spec.clone()), &base, &bad, &x, &y),
            Err(LocalError::H(0))
        );
        let bad = LeasePlan {
            inner_batch: 21,
            ..p
        };
        assert!(matches!(
            InnerLoop::new(&base, &bad, 20),
            Err(LocalError::InnerBatch { got: 21, rows: 20 })
        ));
        let mut lp = InnerLoop::new(&base, &plan(1, p.optimizer), 20).unwrap();
        let nan = StepOutput {
            loss: f32::NAN,
            correct: 0,
            grad: vec![0.0; base.len()],
        };
        assert_eq!(lp.apply(&nan), Err(LocalError::NonFinite { step: 0 }));
        let ok = StepOutput { loss: 1.0, ..nan };
        lp.apply(&ok).unwrap();
        assert_eq!(lp.apply(&ok), Err(LocalError::Finished(1)));
    }

    /// A language model's lease walks token windows: each inner step's batch is the windows at its `row_order`
    /// positions with T next-token labels each, replicas agree bit for bit, and the loss falls.
    #[test]
    fn a_language_model_lease_runs_over_token_windows() {
        use crate::tokens::{TokenStream, lease_windows};
        use crate::transformer::LmSpec;
        let lm = LmSpec {
            vocab: 4,
            context: 5,
            width: 8,
            heads: 2,
            layers: 1,
            tied: true,
        };
        let spec = lm.model_spec();
        let stream = TokenStream {
            tokens: (0..80u32).map(|i| i % 4).collect(),
            context: 5,
        };
        let starts = lease_windows(stream.windows(), (24, 12), 9, 3, 1);
        assert_eq!(starts.len(), 12);
        assert_eq!(
            starts,
            crate::tokens::step_windows(stream.windows(), 24, 9, 3)[12..],
            "shard 1 is the second 12 starts of the round's draw"
        );
        let (ids, labels) = stream.gather(&starts);
        let x: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
        let p = LeasePlan {
            h: 12,
            inner_batch: 4,
            seed: 5,
            optimizer: OptimizerSpec::Adam {
                lr: 3e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        };
        let base = spec.init_params(2);
        let a = run_cpu(&mut CpuEngine::new(spec.clone()), &base, &p, &x, &labels).unwrap();
        let b = run_cpu(&mut CpuEngine::new(spec.clone()), &base, &p, &x, &labels).unwrap();
        assert_eq!(a, b, "replicas agree bit for bit");
        assert_eq!(a.losses.len(), 12);
        assert!(a.correct.iter().all(|c| *c <= 4 * 5), "{:?}", a.correct);
        assert!(a.losses[11] < a.losses[0], "{:?}", a.losses);
        // Inner step 0 is the windows at row_order's first positions, T labels each.
        let first = &row_order(12, &p)[0];
        let (bx, by) = gather_rows(&x, &labels, (5, 5), first);
        let picked: Vec<u32> = first.iter().map(|&i| starts[i as usize]).collect();
        let (ids0, labels0) = stream.gather(&picked);
        assert_eq!(by, labels0);
        assert_eq!(bx, ids0.iter().map(|&i| i as f32).collect::<Vec<_>>());
        let mut engine = CpuEngine::new(spec.clone());
        engine.load(&base).unwrap();
        assert_eq!(engine.step(&bx, &by).unwrap().loss, a.losses[0]);
    }
}
