//! The scheduler: jobs in memory, leases, verification of redundant results, aggregation and model advance, as a
//! sans-IO state machine. Every handler is a short synchronous method of [`State`] that returns [`Effects`] —
//! durable writes, then the frames and tasks that report on them — which the caller carries out in that order.
//! The clock and the random number generator are injected ([`SchedulerConfig`]), so the unit tests drive every
//! transition deterministically in milliseconds.
//!
//! Invariants: a micro-batch is accepted only when all R ≥ 2 independent replicas agree, or when the coordinator's
//! own recomputation agrees with a replica (or, for models too large to recompute, a strict majority after a
//! disagreement) — or, in audited mode, when a trusted worker computed it and its audit (if one was drawn) passed
//! before its step is applied; nobody is struck by vote; a worker never holds two leases of
//! the same micro-batch; results are compared only within one micro-batch of one model version; a result for a
//! superseded version or an expired lease is `late`.
//!
//! Modules, by concern:
//! - `conns`: connections and the leases they hold (admit, ready, disconnect, expiry, claiming a lease back);
//! - `assign`: who gets which lease (fair among workers and among jobs, replica placement, speculation, adaptive
//!   replication rolls);
//! - `settle`: results to verdicts (the one accept path, the one reject path, recomputation outcomes);
//! - `advance`: applying a step, evaluations and early stopping, owner control, halting after a failed write;
//! - `audit`: audited mode (audit leases to trusted workers, the coordinator's fallback, failed audits and what
//!   they strike out); `placement`: which workers may not share a unit (`--placement`);
//! - `trust`: credits, strikes, refusal, near misses, trust records;
//! - `micro`: a micro-batch's lifecycle (the state enum and its legal transitions);
//! - `job_run`: a job in memory and how it is loaded;
//! - `round`: what `local` jobs (protocol v2) add: master parameters, outer Nesterov step, int8 model deltas,
//!   the `local_result` path and trace agreement;
//! - `elastic`: elastic `local` rounds (growing, closing at a sample target or a deadline) and bounded staleness;
//! - `effects`: what handlers ask the transport to do; `counters`: per-job counters and the step histogram.

mod advance;
mod assign;
mod audit;
mod conns;
mod counters;
mod effects;
mod elastic;
mod job_run;
mod micro;
mod placement;
mod recompute;
mod round;
mod settle;
mod trust;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_core::protocol::{Backend, JobId, LeaseId, WorkerId};

pub use conns::Conn;
pub use counters::{Histogram, JobCounters};
pub use effects::{
    Action, CheckKind, ConnId, Deferred, Effects, EvalTask, LocalReplay, Outbound, Recompute,
    StoreOp, frame_message,
};
pub use job_run::{JobLoad, JobRun};
pub use placement::Placement;
pub use round::{KEPT_DELTAS, LocalRun, Trace, traces_agree};
pub use trust::{NEAR_MISS_STRIKE, WorkerInfo};

/// Least probability that a trusted worker's micro-batch is still replicated (adaptive replication).
pub const SPOT_P_MIN: f64 = 0.05;

/// The scheduler's clock: `Instant::now` in production, a hand-moved instant in tests.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(Instant::now))
    }

    pub fn from_fn(f: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Scheduler-wide settings (from the command line), plus the injected clock and seed.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Losing or invalid results after which a worker is refused further work.
    pub strike_limit: u32,
    /// Shortest time a lease must be outstanding before an idle worker may get a speculative replica of it.
    pub speculate_after: Duration,
    /// Consecutive agreed results after which a worker (per backend) is trusted under adaptive replication.
    pub trust_threshold: u32,
    /// Largest model (parameters) the coordinator recomputes (spot checks and arbitration).
    pub spot_check_max_params: usize,
    /// Which workers may not share a unit (replicas, auditors): see [`Placement`].
    pub placement: Placement,
    pub clock: Clock,
    /// Seed of the placement and replication rolls (`None`: different on every start, so colluders can neither
    /// choose to meet nor predict when they are unreplicated).
    pub seed: Option<u64>,
}

/// A seed that differs per coordinator start.
fn start_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ ((std::process::id() as u64) << 32)
}

/// The scheduler's whole state.
#[derive(Debug)]
pub struct State {
    config: SchedulerConfig,
    jobs: BTreeMap<JobId, JobRun>,
    workers: HashMap<WorkerId, WorkerInfo>,
    conns: HashMap<ConnId, Conn>,
    leases: HashMap<LeaseId, conns::Lease>,
    /// Wall time per applied step, all jobs, for `/metrics`.
    step_hist: Histogram,
    next_conn: ConnId,
    next_lease: u64,
    /// Tickets of `ready` requests, in arrival order.
    next_ticket: u64,
    /// Consecutive agreed results per (worker, backend); any strike resets all of a worker's to zero.
    /// In memory only: after a restart every worker earns trust again.
    trust: HashMap<(WorkerId, Backend), u32>,
    /// Randomises which open micro-batch a worker gets and the replication rolls.
    rng: starling_core::rng::SplitMix64,
    /// Effects of loading jobs (a step whose micro-batches were all accepted before a restart advances on load),
    /// carried out with the next [`State::tick`].
    pending: Effects,
    /// Halts so far (failed durable writes); see [`Effects::epoch`].
    halts: u64,
    /// Each worker's latest partners on a unit (replicas and auditors, most recent last, at most
    /// `placement::RECENT_PARTNERS`): placement prefers partners not met lately.
    partners: HashMap<WorkerId, std::collections::VecDeque<WorkerId>>,
}

impl State {
    pub fn new(config: SchedulerConfig) -> Self {
        let seed = config.seed.unwrap_or_else(start_seed);
        Self {
            config,
            jobs: BTreeMap::new(),
            workers: HashMap::new(),
            conns: HashMap::new(),
            leases: HashMap::new(),
            step_hist: Histogram::default(),
            next_conn: 1,
            next_lease: 1,
            next_ticket: 1,
            trust: HashMap::new(),
            rng: starling_core::rng::SplitMix64::new(seed),
            pending: Effects::default(),
            halts: 0,
            partners: HashMap::new(),
        }
    }

    fn now(&self) -> Instant {
        self.config.clock.now()
    }

    /// An empty set of effects stamped with the current halt count.
    fn effects(&self) -> Effects {
        Effects {
            epoch: self.halts,
            ..Effects::default()
        }
    }

    /// Takes the effects of loading jobs (stamped when they were computed), or an empty set.
    fn take_pending(&mut self) -> Effects {
        let fx = std::mem::take(&mut self.pending);
        if fx.store.is_empty() && fx.later.is_empty() {
            self.effects()
        } else {
            fx
        }
    }

    /// Whether job `job` was halted after effects stamped `epoch` were computed (their writes for it are stale).
    pub fn stale(&self, job: JobId, epoch: u64) -> bool {
        self.jobs.get(&job).is_some_and(|j| j.halted_epoch > epoch)
    }

    fn ticket(&mut self) -> u64 {
        self.next_ticket += 1;
        self.next_ticket
    }

    /// Sets a worker's cached standing (from the store, at start and after a failed write).
    pub fn set_worker(&mut self, id: WorkerId, info: WorkerInfo) {
        let near = self.workers.get(&id).map_or(0, |w| w.near_misses);
        self.workers.insert(
            id,
            WorkerInfo {
                near_misses: near,
                ..info
            },
        );
    }

    /// Delivers frames to their connections (those already gone are skipped).
    pub fn deliver(&self, sends: impl IntoIterator<Item = (ConnId, Outbound)>) {
        for (conn, out) in sends {
            self.send(conn, out);
        }
    }

    /// Connected workers (for status views).
    pub fn connections(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    /// A job in memory (read-only: views never change scheduler state directly).
    pub fn job(&self, id: JobId) -> Option<&JobRun> {
        self.jobs.get(&id)
    }

    /// Every job in memory, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRun> {
        self.jobs.values()
    }

    /// A worker's cached standing.
    pub fn worker(&self, id: WorkerId) -> Option<&WorkerInfo> {
        self.workers.get(&id)
    }

    /// Wall time per applied step, all jobs.
    pub fn step_hist(&self) -> &Histogram {
        &self.step_hist
    }
}
