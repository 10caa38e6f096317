//! A job in memory: its model version, optimizer, the micro-batches of the step in progress, and how it is loaded
//! (from a checkpoint plus the accepted results of the step in progress, so a restart recomputes nothing).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;

use starling_core::optim::Optimizer;
use starling_core::protocol::{CoordinatorMsg, JobId, WireFrame, encode, f32_bytes};
use starling_core::{ModelSpec, schedule};

use super::State;
use super::counters::JobCounters;
use super::micro::{Micro, Outcome};
use super::round::LocalRun;
use crate::examples::Examples;
use crate::job::{Hyper, JobStatus};
use crate::store::{AcceptedRow, Checkpoint, MetricRow};

/// A job being trained.
#[derive(Debug)]
pub struct JobRun {
    pub id: JobId,
    /// The owner who may see and control it (`None`: created before accounts existed).
    pub owner: Option<i64>,
    /// The owner's name: public, so volunteers see whom they train for.
    pub owner_name: Option<String>,
    pub name: String,
    pub spec: ModelSpec,
    pub hyper: Hyper,
    pub status: JobStatus,
    /// Why the coordinator paused the job itself (a failed durable write); cleared when the owner resumes it.
    pub error: Option<String>,
    pub created_ms: i64,
    pub(super) train: Arc<Examples>,
    pub(super) test: Arc<Examples>,
    /// Steps applied so far; also the model version.
    pub step: u64,
    pub(super) params: Arc<Vec<f32>>,
    /// The `model` frame of the current version, encoded once and shared by every connection.
    pub(super) model_frame: Bytes,
    pub(super) optim: Optimizer,
    pub(super) micros: Vec<Micro>,
    pub counters: JobCounters,
    /// The step that included the latest micro-batch a failed audit found wrong (that step's update is bounded by
    /// the job's robust aggregation, not undone).
    pub last_bad_step: Option<u64>,
    pub last_train: Option<MetricRow>,
    pub last_eval: Option<MetricRow>,
    pub best_accuracy: Option<f32>,
    /// Lowest held-out loss so far, and evaluations since it (early stopping, `hyper.patience`).
    pub(super) best_loss: Option<f32>,
    pub(super) evals_since_best: u32,
    pub(super) step_started: Instant,
    /// Exponential moving averages: wall time per applied step, and lease issue → result latency.
    pub step_ms: f64,
    pub(super) result_ms: f64,
    /// The halt count when this job was last halted (0: never); see `Effects::epoch`.
    pub(super) halted_epoch: u64,
    /// Stride-scheduling pass: advanced by `1 / hyper.weight` per lease; the lowest pass is served first.
    pub(super) pass: f64,
    /// Typical norm of accepted micro-batch gradients: the floor of the agreement rule (`verify::Scale`).
    pub(super) scale: crate::verify::Scale,
    /// Audits under way, by (step, micro-batch): the accepted outcome and the credits of those who vouched for it.
    pub(super) audits: std::collections::HashMap<(u64, u32), super::settle::Audit>,
    /// A `local` job's master parameters, outer optimizer and model deltas (`None` for `sync` jobs).
    pub(super) local: Option<super::round::LocalRun>,
    /// A `local` job's training set as one `dataset` frame, with its SHA-256: v2 workers fetch it once and are
    /// then leased row indices only.
    pub(super) dataset: Option<(String, super::round::DatasetFrames)>,
}

/// Everything needed to bring a job back into memory.
#[derive(Debug)]
pub struct JobLoad {
    pub id: JobId,
    pub owner: Option<i64>,
    pub owner_name: Option<String>,
    pub name: String,
    pub spec: ModelSpec,
    pub hyper: Hyper,
    pub status: JobStatus,
    pub created_ms: i64,
    pub train: Examples,
    pub test: Examples,
    pub checkpoint: Option<Checkpoint>,
    pub accepted: Vec<AcceptedRow>,
}

impl JobRun {
    pub(super) fn model_frame(id: JobId, step: u64, spec: &ModelSpec, params: &[f32]) -> Bytes {
        match encode(
            &CoordinatorMsg::Model {
                job: id,
                version: step,
                spec: spec.clone(),
            },
            &f32_bytes(params),
        ) {
            WireFrame::Binary(b) => Bytes::from(b),
            WireFrame::Text(t) => Bytes::from(t.into_bytes()),
        }
    }

    /// The micro-batches of the current step: its rows are a pure function of `(seed, step)`.
    pub(super) fn fresh_micros(&self) -> Vec<Micro> {
        let (n, batch, seed) = (
            self.train.rows(),
            self.hyper.global_batch as usize,
            self.hyper.seed,
        );
        // A language model draws window starts as `starling train --model char-lm` does (uniform, with
        // replacement), so a served run and the single-process reference see the same batches.
        let rows = match &*self.train {
            Examples::Tokens { .. } => {
                starling_core::tokens::step_windows(n, batch, seed, self.step)
            }
            Examples::Rows(_) => schedule::step_rows(n, batch, seed, self.step),
        };
        schedule::micro_batches(&rows, self.hyper.micro_batch as usize)
            .into_iter()
            .map(|r| Micro::new(r, self.hyper.redundancy))
            .collect()
    }

    pub fn params(&self) -> Arc<Vec<f32>> {
        self.params.clone()
    }

    pub fn test_rows(&self) -> usize {
        self.test.rows()
    }

    pub fn train_rows(&self) -> usize {
        self.train.rows()
    }

    /// A language model's vocabulary text, when its token dataset has one (samples, export metadata).
    pub fn vocab(&self) -> Option<&[String]> {
        self.train.vocab()
    }

    /// Early stopping's bookkeeping: a lower held-out loss resets the count of evaluations without progress.
    pub(super) fn note_eval_loss(&mut self, loss: f32) {
        if self.best_loss.is_none_or(|b| loss < b) {
            self.best_loss = Some(loss);
            self.evals_since_best = 0;
        } else {
            self.evals_since_best += 1;
        }
    }

    /// Builds a job from its durable state.
    fn from_load(load: JobLoad, now: Instant) -> Self {
        let n = load.spec.param_count();
        let (step, params, optim, local) = match load.checkpoint {
            Some(c) => {
                let optim = Optimizer::from_bytes(load.hyper.optimizer, n, &c.optim)
                    .unwrap_or_else(|| Optimizer::new(load.hyper.optimizer, n));
                let local = load
                    .hyper
                    .is_local()
                    .then(|| LocalRun::from_bytes(&load.hyper, &c.params, &c.optim));
                (c.step, c.params, optim, local)
            }
            None => {
                let params = load.spec.init_params(load.hyper.seed);
                let local = load
                    .hyper
                    .is_local()
                    .then(|| LocalRun::new(&load.hyper, &params));
                (0, params, Optimizer::new(load.hyper.optimizer, n), local)
            }
        };
        let model_frame = Self::model_frame(load.id, step, &load.spec, &params);
        let mut job = Self {
            id: load.id,
            owner: load.owner,
            owner_name: load.owner_name,
            name: load.name,
            spec: load.spec,
            hyper: load.hyper,
            status: load.status,
            error: None,
            created_ms: load.created_ms,
            train: Arc::new(load.train),
            test: Arc::new(load.test),
            step,
            params: Arc::new(params),
            model_frame,
            optim,
            micros: Vec::new(),
            counters: JobCounters::default(),
            last_bad_step: None,
            last_train: None,
            last_eval: None,
            best_accuracy: None,
            best_loss: None,
            evals_since_best: 0,
            step_started: now,
            step_ms: 0.0,
            result_ms: 0.0,
            pass: 0.0,
            halted_epoch: 0,
            scale: crate::verify::Scale::default(),
            audits: std::collections::HashMap::new(),
            local,
            dataset: None,
        };
        // A local job's leases name its training set: rows as an SDS1 frame, a token stream as an STK1 one.
        if job.local.is_some() {
            job.dataset = match &*job.train {
                Examples::Rows(train) => Some(super::round::dataset_frame(job.id, train)),
                Examples::Tokens { .. } => super::round::token_dataset_frame(job.id, &job.train),
            };
        }
        if job.step >= job.hyper.steps {
            job.status = JobStatus::Completed;
        }
        if !job.status.is_terminal() {
            job.micros = job.fresh_micros();
        }
        for a in load.accepted {
            if let Some(m) = job.micros.get_mut(a.micro as usize)
                && m.rows.len() == a.rows as usize
                && a.grad.len() == n
            {
                m.accept(Outcome {
                    loss: a.loss,
                    correct: a.correct,
                    grad: Arc::new(a.grad),
                    agreeing: a.agreeing,
                    verified: false,
                    trace: None,
                });
            }
        }
        job
    }
}

impl State {
    /// Brings a job into memory from its checkpoint (or a fresh initialisation) and the accepted results of the
    /// step in progress, so nothing accepted before a restart is recomputed or re-credited.
    pub fn load_job(&mut self, load: JobLoad) {
        let now = self.now();
        let mut job = JobRun::from_load(load, now);
        job.pass = self.min_pass();
        tracing::info!(job = %job.id, step = job.step, status = job.status.as_str(), "job loaded");
        let id = job.id;
        self.jobs.insert(id, job);
        self.advance_loaded(id);
    }

    /// A crash between the last accepted micro-batch of a step and that step's checkpoint leaves every
    /// micro-batch accepted on load: apply the step now (its effects go out with the next tick).
    fn advance_loaded(&mut self, id: JobId) {
        let mut fx = self.take_pending();
        self.maybe_advance(id, &mut fx);
        self.pending = fx;
    }

    /// Replaces a halted job with its durable state after a failed write ([`State::halt`]), keeping it paused
    /// with its error and keeping its counters.
    pub fn reload_job(&mut self, load: JobLoad) {
        let now = self.now();
        let mut job = JobRun::from_load(load, now);
        if let Some(old) = self.jobs.remove(&job.id) {
            job.counters = old.counters;
            job.last_bad_step = old.last_bad_step;
            job.last_train = old.last_train;
            job.last_eval = old.last_eval;
            job.best_accuracy = old.best_accuracy;
            job.best_loss = old.best_loss;
            job.evals_since_best = old.evals_since_best;
            job.pass = old.pass;
            job.halted_epoch = old.halted_epoch;
            job.error = old.error;
            if !job.status.is_terminal() {
                job.status = old.status;
            }
        }
        tracing::info!(job = %job.id, step = job.step, "job reloaded from its durable state");
        let id = job.id;
        self.jobs.insert(id, job);
        self.advance_loaded(id);
    }

    /// Restores a metric seen before a restart (for status views).
    pub fn restore_metric(&mut self, job: JobId, m: MetricRow) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if m.kind == "eval" {
                j.best_accuracy = Some(j.best_accuracy.map_or(m.accuracy, |b| b.max(m.accuracy)));
                j.note_eval_loss(m.loss);
                j.last_eval = Some(m);
            } else {
                j.last_train = Some(m);
            }
        }
    }

    /// The lowest pass among running jobs: a job that starts (or resumes) joins there, so it neither waits for
    /// the others to catch up nor takes every lease until it has caught up with them.
    pub(super) fn min_pass(&self) -> f64 {
        self.jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
            .map(|j| j.pass)
            .min_by(f64::total_cmp)
            .unwrap_or(0.0)
    }
}
