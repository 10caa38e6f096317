//! What an owner asks for: a job's hyperparameters, their defaults and their limits.

use serde::{Deserialize, Serialize};

use starling_core::optim::{LrSchedule, OptimizerSpec};
use starling_core::protocol::Quant;

/// Training hyperparameters of a job. Every field has a default, so `{}` is a valid (demo-like) request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hyper {
    pub optimizer: OptimizerSpec,
    /// Rows per optimizer step.
    pub global_batch: u32,
    /// Rows per leased micro-batch; the global batch is split into `ceil(global / micro)` of them.
    pub micro_batch: u32,
    /// Optimizer steps to run.
    pub steps: u64,
    /// Independent workers each micro-batch is leased to (R); at least 2, so no single result reaches the model.
    pub redundancy: u32,
    /// Largest relative L2 distance between two gradients that still counts as agreement (see docs/PROTOCOL.md).
    pub tolerance: f32,
    /// Evaluate on the held-out set every this many steps.
    pub eval_every: u64,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// How long a worker may hold a lease before it is reassigned.
    pub lease_timeout_ms: u64,
    /// Stop early once held-out accuracy reaches this.
    pub target_accuracy: Option<f32>,
    /// How accepted micro-batch gradients are combined: `mean` (row-weighted), `trimmed-mean` or `median`
    /// (coordinate-wise; see `aggregate.rs`).
    pub aggregate: crate::aggregate::Rule,
    /// Scale each accepted micro-batch gradient down to at most this L2 norm before aggregating.
    pub clip_norm: Option<f32>,
    /// Adaptive replication (docs/PROTOCOL.md, Verification): a worker with a long record of agreed results gets
    /// unreplicated micro-batches that the coordinator spot-checks by recomputation. Off by default.
    pub adaptive: bool,
    /// This job's share of workers relative to other running jobs (like BOINC's resource share): with weights 1
    /// and 3, the second job gets three leases for every one of the first while both have work.
    pub weight: f32,
    /// Learning-rate schedule over `steps` (a factor on the optimizer's `lr`).
    pub lr_schedule: LrSchedule,
    /// Decoupled (AdamW-style) weight decay per step, relative to the learning rate.
    pub weight_decay: f32,
    /// Early stopping: complete the job after this many evaluations without a lower held-out loss (the best
    /// version by accuracy stays downloadable).
    pub patience: Option<u32>,
    /// Share of micro-batches accepted on replicas alone that the coordinator recomputes afterwards (a random
    /// audit, drawn from the scheduler's seeded generator after acceptance; models up to
    /// `--spot-check-max-params`). A failed audit refuses every worker that vouched for the result and claws back
    /// their credits for it (docs/PROTOCOL.md, Verification). 0 turns audits off.
    pub audit: f32,
    /// How results are verified: `replicated` (every unit by R independent workers, with `adaptive` and `audit`
    /// as above) or `audited`: a trusted worker's result is used alone, a random `audit` share of units is
    /// recomputed by another trusted worker on another subnet before the step is applied, and workers without a
    /// record get R = 3 with a trusted one among them (docs/PROTOCOL.md, Verification, "Audited mode"; models up to
    /// `--spot-check-max-params`, larger ones are replicated).
    pub verification: Verification,
    /// `sync` (one optimizer step per global batch of micro-batches, protocol v1) or `local` (outer rounds of
    /// H-step local leases, protocol v2). In `local` mode `global_batch` is the rows of one outer round,
    /// `micro_batch` the rows of one lease, `steps` the outer rounds, `optimizer` is unused (see `inner_optimizer`).
    pub mode: Mode,
    /// `local`: inner steps per lease (H).
    pub h: u32,
    /// `local`: rows per inner step.
    pub inner_batch: u32,
    /// `local`: the workers' inner optimizer, its state reset every lease.
    pub inner_optimizer: OptimizerSpec,
    /// `local`: the outer Nesterov step's learning rate and momentum (DiLoCo's 0.7 and 0.9).
    pub outer_lr: f32,
    pub outer_momentum: f32,
    /// `local`: how deltas and model broadcasts travel (`int8` blocks or `f32`).
    pub quant: Quant,
    /// `local`: the agreement bound between replicas' deltas (`None`: [`local_tolerance`] for `h`).
    pub local_tolerance: Option<f32>,
    /// `local`, elastic rounds: most shards (distinct row sets, each leased R-fold) one outer round may hold.
    /// `None`: the `ceil(global_batch / micro_batch)` base shards only (a fixed round). Above the base shards a
    /// round grows one shard whenever a v2 worker is idle and every shard of the round is fully leased.
    pub round_shards_max: Option<u32>,
    /// `local`, elastic rounds: verified training samples (`h × inner_batch` per shard of this round) at which a
    /// round closes. `None`: every base shard's worth.
    pub round_samples: Option<u64>,
    /// `local`, elastic rounds: a round closes this long after it opened with what is verified by then (at least
    /// one delta; a round with none stays open until its first). `None`: no deadline.
    pub round_deadline_ms: Option<u64>,
    /// `local`, bounded staleness S: a shard still out when its round closes stays valid; its verified delta is
    /// applied at a later round's close while `v_now − v ≤ S`, weighted `1/(1 + v_now − v)`; beyond S it is late.
    pub staleness: u32,
}

/// How a job's results are verified (see [`Hyper::verification`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    #[default]
    Replicated,
    Audited,
}

/// How a job trains (see [`Hyper::mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Sync,
    Local,
}

/// The default agreement bound of `local` leases of `h` inner steps: the relative L2 distance between honest
/// replicas' int8 deltas grows with H (docs/PROTOCOL.md, "Local leases": the measured table and the headroom).
pub fn local_tolerance(h: u32) -> f32 {
    // Measured honest maxima (CPU vs WGSL on lavapipe, int8 deltas): 4e-7 at H = 1, 9e-5 at 4, 1.6e-4 at 16,
    // 2.2e-4 at 64; these bounds leave ≥ 60× headroom for devices and trajectories not yet measured.
    match h {
        0..=16 => 1e-2,
        _ => 2e-2,
    }
}

impl Default for Hyper {
    fn default() -> Self {
        // The demo schedule: on the 8,000-row MNIST split this reaches 95% held-out accuracy at about step 450
        // (the single-process trainer, `starling train`, measures the same curve).
        Self {
            optimizer: OptimizerSpec::Adam {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            global_batch: 128,
            micro_batch: 32,
            steps: 1000,
            redundancy: 2,
            tolerance: DEFAULT_TOLERANCE,
            eval_every: 25,
            seed: 1,
            lease_timeout_ms: 30_000,
            target_accuracy: None,
            aggregate: crate::aggregate::Rule::Mean,
            clip_norm: None,
            adaptive: false,
            weight: 1.0,
            lr_schedule: LrSchedule::Constant,
            weight_decay: 0.0,
            patience: None,
            audit: DEFAULT_AUDIT,
            verification: Verification::Replicated,
            mode: Mode::Sync,
            h: 16,
            inner_batch: 32,
            // The sync demo's Adam: with a fresh state each lease its first steps are sign-like, as at the start
            // of a sync job.
            inner_optimizer: OptimizerSpec::Adam {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            outer_lr: 0.7,
            outer_momentum: 0.9,
            quant: Quant::Int8,
            local_tolerance: None,
            round_shards_max: None,
            round_samples: None,
            round_deadline_ms: None,
            staleness: DEFAULT_STALENESS,
        }
    }
}

/// Default agreement tolerance: relative L2 distance 1e-3 (docs/PROTOCOL.md explains the choice).
pub const DEFAULT_TOLERANCE: f32 = 1e-3;
/// Default share of replica-accepted micro-batches audited by recomputation.
pub const DEFAULT_AUDIT: f32 = 0.05;
/// Default bound on the staleness of a `local` delta (rounds between its base version and the one it is applied to).
pub const DEFAULT_STALENESS: u32 = 4;
/// Most shards one elastic round may hold.
pub const MAX_ROUND_SHARDS: u32 = 4096;
/// Largest staleness bound a job may set.
pub const MAX_STALENESS: u32 = 64;
/// Most replicas of one micro-batch (R plus tie-breakers) before it is abandoned for this step.
pub const MAX_REPLICAS: u32 = 6;

impl Hyper {
    /// Checks every field against its bounds, naming the first one that is out.
    pub fn validate(&self, train_rows: usize) -> Result<(), String> {
        self.optimizer.validate()?;
        if self.global_batch == 0 || self.global_batch > 65_536 {
            return Err(format!(
                "global_batch must be in 1..=65536, got {}",
                self.global_batch
            ));
        }
        if self.micro_batch == 0 || self.micro_batch > self.global_batch {
            return Err(format!(
                "micro_batch must be in 1..=global_batch ({}), got {}",
                self.global_batch, self.micro_batch
            ));
        }
        if self.global_batch as usize > train_rows {
            return Err(format!(
                "global_batch {} is larger than the {train_rows} training rows",
                self.global_batch
            ));
        }
        if self.steps == 0 || self.steps > 10_000_000 {
            return Err(format!("steps must be in 1..=10000000, got {}", self.steps));
        }
        if !(2..=5).contains(&self.redundancy) {
            return Err(format!(
                "redundancy must be in 2..=5 (every result is verified by an independent replica), got {}",
                self.redundancy
            ));
        }
        if !(self.tolerance > 0.0 && self.tolerance <= 0.1) {
            return Err(format!(
                "tolerance must be in (0, 0.1], got {}",
                self.tolerance
            ));
        }
        if self.eval_every == 0 {
            return Err("eval_every must be at least 1".into());
        }
        if !(1_000..=3_600_000).contains(&self.lease_timeout_ms) {
            return Err(format!(
                "lease_timeout_ms must be in 1000..=3600000, got {}",
                self.lease_timeout_ms
            ));
        }
        if let Some(t) = self.target_accuracy
            && !(t > 0.0 && t <= 1.0)
        {
            return Err(format!("target_accuracy must be in (0, 1], got {t}"));
        }
        if let Some(c) = self.clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(format!(
                "clip_norm must be a positive finite number, got {c}"
            ));
        }
        if !(self.weight.is_finite() && self.weight > 0.0 && self.weight <= 1000.0) {
            return Err(format!("weight must be in (0, 1000], got {}", self.weight));
        }
        self.lr_schedule.validate()?;
        if !(self.weight_decay.is_finite() && (0.0..=1.0).contains(&self.weight_decay)) {
            return Err(format!(
                "weight_decay must be in [0, 1], got {}",
                self.weight_decay
            ));
        }
        if !(0.0..=1.0).contains(&self.audit) {
            return Err(format!("audit must be in [0, 1], got {}", self.audit));
        }
        if self.verification == Verification::Audited && self.audit <= 0.0 {
            return Err("verification \"audited\" needs audit > 0 (audits are its only check of a trusted result)".into());
        }
        if self.patience == Some(0) {
            return Err("patience must be at least 1 evaluation".into());
        }
        if self.mode == Mode::Local {
            let plan = starling_core::local::LeasePlan {
                h: self.h,
                inner_batch: self.inner_batch,
                seed: 0,
                optimizer: self.inner_optimizer,
            };
            plan.validate(self.micro_batch as usize)
                .map_err(|e| format!("local lease: {e}"))?;
            if !(self.outer_lr.is_finite() && self.outer_lr > 0.0 && self.outer_lr <= 10.0) {
                return Err(format!(
                    "outer_lr must be in (0, 10], got {}",
                    self.outer_lr
                ));
            }
            if !(0.0..1.0).contains(&self.outer_momentum) {
                return Err(format!(
                    "outer_momentum must be in [0, 1), got {}",
                    self.outer_momentum
                ));
            }
            if let Some(t) = self.local_tolerance
                && !(t > 0.0 && t <= 0.5)
            {
                return Err(format!("local_tolerance must be in (0, 0.5], got {t}"));
            }
            let base = self.global_batch.div_ceil(self.micro_batch);
            if let Some(m) = self.round_shards_max
                && !(base..=MAX_ROUND_SHARDS).contains(&m)
            {
                return Err(format!(
                    "round_shards_max must be in {base}..={MAX_ROUND_SHARDS} (at least the round's \
                     ceil(global_batch / micro_batch) base shards), got {m}"
                ));
            }
            if let Some(n) = self.round_samples
                && !(1..=1_000_000_000).contains(&n)
            {
                return Err(format!("round_samples must be in 1..=1000000000, got {n}"));
            }
            if let Some(d) = self.round_deadline_ms
                && !(100..=86_400_000).contains(&d)
            {
                return Err(format!(
                    "round_deadline_ms must be in 100..=86400000, got {d}"
                ));
            }
            if self.staleness > MAX_STALENESS {
                return Err(format!(
                    "staleness must be in 0..={MAX_STALENESS}, got {}",
                    self.staleness
                ));
            }
        }
        Ok(())
    }

    /// The agreement bound results of this job are judged by.
    pub fn agreement_tolerance(&self) -> f32 {
        match self.mode {
            Mode::Sync => self.tolerance,
            Mode::Local => self.local_tolerance.unwrap_or(local_tolerance(self.h)),
        }
    }

    /// Whether the job trains with local leases (protocol v2).
    pub fn is_local(&self) -> bool {
        self.mode == Mode::Local
    }

    /// Agreeing results needed to accept a micro-batch: a strict majority of R.
    pub fn quorum(&self) -> u32 {
        self.redundancy / 2 + 1
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Running,
    /// The owner paused it: no new leases; resumable.
    Paused,
    Completed,
    /// The owner cancelled it: terminal, its checkpoints stay downloadable.
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "paused" => Self::Paused,
            "completed" => Self::Completed,
            "cancelled" => Self::Cancelled,
            _ => Self::Running,
        }
    }

    /// Whether the job can never run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Hyper {
        Hyper {
            mode: Mode::Local,
            h: 2,
            inner_batch: 4,
            global_batch: 16,
            micro_batch: 8,
            ..Hyper::default()
        }
    }

    #[test]
    fn elastic_fields_default_when_left_out_and_are_range_checked_by_name() {
        let old: Hyper = serde_json::from_str(r#"{"mode":"local","h":2,"inner_batch":4}"#)
            .expect("job JSON from before elastic rounds still loads");
        assert_eq!(
            (
                old.round_shards_max,
                old.round_samples,
                old.round_deadline_ms,
                old.staleness
            ),
            (None, None, None, DEFAULT_STALENESS)
        );
        assert_eq!(local().validate(64), Ok(()));
        let ok = Hyper {
            round_shards_max: Some(2),
            round_samples: Some(1),
            round_deadline_ms: Some(100),
            staleness: MAX_STALENESS,
            ..local()
        };
        assert_eq!(ok.validate(64), Ok(()), "bounds included");
        for (bad, name) in [
            (
                Hyper {
                    round_shards_max: Some(1),
                    ..local()
                },
                "round_shards_max",
            ),
            (
                Hyper {
                    round_shards_max: Some(MAX_ROUND_SHARDS + 1),
                    ..local()
                },
                "round_shards_max",
            ),
            (
                Hyper {
                    round_samples: Some(0),
                    ..local()
                },
                "round_samples",
            ),
            (
                Hyper {
                    round_deadline_ms: Some(99),
                    ..local()
                },
                "round_deadline_ms",
            ),
            (
                Hyper {
                    staleness: MAX_STALENESS + 1,
                    ..local()
                },
                "staleness",
            ),
        ] {
            let err = bad.validate(64).expect_err(name);
            assert!(err.starts_with(name), "{name}: {err}");
        }
    }
}
