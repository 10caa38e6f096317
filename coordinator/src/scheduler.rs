//! The scheduler: jobs in memory, leases, verification of redundant results, aggregation and model advance.
//!
//! All state lives in one [`State`] behind a mutex; every handler is a short synchronous function that mutates it
//! and returns [`Effects`] — database writes, then frames to send, then evaluations to run — which the caller
//! carries out in that order, so a verdict is only sent once what it reports is durable.
//!
//! Invariants: a micro-batch is accepted only when `quorum` (a strict majority of R ≥ 2) independent workers
//! agree; a worker never holds two leases of the same micro-batch; results are compared only within one
//! micro-batch of one model version; a result for a superseded version or an expired lease is `late`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::Message;
use tokio::sync::mpsc::UnboundedSender;

use starling_core::data::Dataset;
use starling_core::optim::Optimizer;
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, Platform, WireFrame, WorkerId,
    WorkerMsg, encode, f32_bytes, lease_payload,
};
use starling_core::{EvalOutput, ModelSpec, schedule};

use crate::job::{Hyper, JobStatus, MAX_REPLICAS};
use crate::store::{AcceptedRow, Checkpoint, Credit, MetricRow, now_ms};
use crate::verify::{self, Candidate};

/// One WebSocket connection.
pub type ConnId = u64;

/// Something to send on a connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    Frame(Message),
    /// Send an `error` message with this code, then close the connection.
    Close(ErrorCode, String),
}

impl Outbound {
    pub fn msg(msg: &CoordinatorMsg, payload: &[u8]) -> Self {
        Self::Frame(frame_message(encode(msg, payload)))
    }
}

pub fn frame_message(frame: WireFrame) -> Message {
    match frame {
        WireFrame::Text(t) => Message::Text(t.into()),
        WireFrame::Binary(b) => Message::Binary(Bytes::from(b)),
    }
}

/// A durable write the scheduler asks for.
#[derive(Debug, Clone)]
pub enum StoreOp {
    Accepted {
        job: JobId,
        step: u64,
        row: AcceptedRow,
        credits: Vec<Credit>,
    },
    Credit {
        job: JobId,
        step: u64,
        micro: u32,
        credit: Credit,
    },
    Rejection {
        worker: WorkerId,
        refused: bool,
    },
    Checkpoint {
        job: JobId,
        ckpt: Checkpoint,
        train: MetricRow,
    },
    Status {
        job: JobId,
        status: JobStatus,
    },
    Eval {
        job: JobId,
        metric: MetricRow,
    },
}

/// A micro-batch the coordinator recomputes on the CPU, off the lock: a trusted worker's unreplicated result to
/// spot-check, or (`arbitrate`) replicas that disagree, to settle by the coordinator's own result instead of a
/// volunteer tie-breaker (whom a colluding partner could be).
#[derive(Debug, Clone)]
pub struct SpotCheck {
    /// Arbitration of a disagreement rather than a spot check of one trusted result.
    pub arbitrate: bool,
    pub job: JobId,
    pub step: u64,
    pub micro: u32,
    pub lease: LeaseId,
    pub spec: ModelSpec,
    pub params: Arc<Vec<f32>>,
    pub x: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Least probability that a trusted worker's micro-batch is still replicated (adaptive replication).
pub const SPOT_P_MIN: f64 = 0.05;

/// A seed that differs per coordinator start.
fn start_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ ((std::process::id() as u64) << 32)
}

/// A held-out evaluation to run off the scheduler lock.
#[derive(Debug, Clone)]
pub struct EvalTask {
    pub job: JobId,
    pub step: u64,
    pub spec: ModelSpec,
    pub params: Arc<Vec<f32>>,
    pub test: Arc<Dataset>,
}

/// What a handler wants done, in this order: persist, send, evaluate.
#[derive(Debug, Default)]
pub struct Effects {
    pub store: Vec<StoreOp>,
    /// Jobs whose visible state changed (live dashboards are told after the rest is done).
    pub notify: Vec<JobId>,
    pub sends: Vec<(ConnId, Outbound)>,
    pub evals: Vec<EvalTask>,
    /// Recomputations of trusted, unreplicated results (adaptive replication).
    pub spot_checks: Vec<SpotCheck>,
}

/// Scheduler-wide settings (from the command line).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Losing or invalid results after which a worker is refused further work.
    pub strike_limit: u32,
    /// Shortest time a lease must be outstanding before an idle worker may get a speculative replica of it.
    pub speculate_after: Duration,
    /// Consecutive agreed results after which a worker (per backend) is trusted under adaptive replication.
    pub trust_threshold: u32,
    /// Largest model (parameters) the coordinator recomputes to spot-check a trusted, unreplicated result.
    pub spot_check_max_params: usize,
}

/// A connected worker as the scheduler sees it.
#[derive(Debug)]
pub struct Conn {
    pub worker: WorkerId,
    pub addr: IpAddr,
    pub name: Option<String>,
    pub backend: Backend,
    pub adapter: String,
    pub platform: Platform,
    tx: UnboundedSender<Outbound>,
    /// The worker asked for a lease and has none.
    ready: bool,
    lease: Option<LeaseId>,
    /// Model version whose parameters this connection already has.
    model: Option<(JobId, u64)>,
    waiting_sent: bool,
    pub connected_ms: i64,
}

/// A worker's standing (cached from the database, kept in step with it through [`StoreOp`]s).
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub name: Option<String>,
    pub credits_flops: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub strikes: u32,
    pub refused: bool,
    /// Near misses in a row (see `verify::near_miss`): rare and isolated for honest devices, constant for a worker
    /// adding small noise, which is struck at [`NEAR_MISS_STRIKE`] in a row.
    pub near_misses: u32,
}

/// Consecutive near misses that count as one strike.
pub const NEAR_MISS_STRIKE: u32 = 3;

impl WorkerInfo {
    /// Credits in GFLOP, the unit shown to volunteers.
    pub fn credits(&self) -> f64 {
        self.credits_flops as f64 / 1e9
    }
}

#[derive(Debug)]
struct Lease {
    job: JobId,
    step: u64,
    micro: u32,
    conn: ConnId,
    worker: WorkerId,
    issued: Instant,
    deadline: Instant,
}

#[derive(Debug)]
struct Submission {
    worker: WorkerId,
    conn: ConnId,
    lease: LeaseId,
    loss: f32,
    correct: u32,
    grad: Vec<f32>,
}

#[derive(Debug)]
enum Settled {
    Accepted {
        loss: f32,
        correct: u32,
        grad: Arc<Vec<f32>>,
        agreeing: u32,
    },
    /// No quorum within [`MAX_REPLICAS`]; the step goes on without this micro-batch.
    Abandoned,
}

#[derive(Debug)]
struct Micro {
    rows: Vec<u32>,
    /// Replicas wanted now: R, plus one per tie-breaker.
    wanted: u32,
    active: Vec<LeaseId>,
    subs: Vec<Submission>,
    /// Workers (and their addresses) that were ever leased this micro-batch in this step.
    involved: Vec<(WorkerId, IpAddr)>,
    settled: Option<Settled>,
    /// Leased to one trusted worker only (adaptive replication): its result waits for a coordinator spot check.
    solo: bool,
    /// The coordinator is recomputing this micro-batch to settle a disagreement.
    arbitrating: bool,
}

impl Micro {
    fn new(rows: Vec<u32>, wanted: u32) -> Self {
        Self {
            rows,
            wanted,
            active: Vec::new(),
            subs: Vec::new(),
            involved: Vec::new(),
            settled: None,
            solo: false,
            arbitrating: false,
        }
    }
}

/// Counters of one job since the coordinator started (persistent figures come from the database).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JobCounters {
    pub leases_issued: u64,
    pub leases_expired: u64,
    pub speculative_leases: u64,
    pub results_accepted: u64,
    pub results_rejected: u64,
    pub results_late: u64,
    pub results_failed: u64,
    pub disagreements: u64,
    pub micro_batches_abandoned: u64,
    /// Trusted results recomputed by the coordinator instead of replicated, and how many of those disagreed.
    pub spot_checks: u64,
    pub spot_check_failures: u64,
    /// Disagreements settled by the coordinator's own recomputation.
    pub arbitrations: u64,
    pub steps_applied: u64,
}

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
    pub created_ms: i64,
    train: Arc<Dataset>,
    test: Arc<Dataset>,
    /// Steps applied so far; also the model version.
    pub step: u64,
    params: Arc<Vec<f32>>,
    /// The `model` frame of the current version, encoded once and shared by every connection.
    model_frame: Bytes,
    optim: Optimizer,
    micros: Vec<Micro>,
    pub counters: JobCounters,
    pub last_train: Option<MetricRow>,
    pub last_eval: Option<MetricRow>,
    pub best_accuracy: Option<f32>,
    step_started: Instant,
    /// Exponential moving averages: wall time per applied step, and lease issue → result latency.
    pub step_ms: f64,
    result_ms: f64,
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
    pub train: Dataset,
    pub test: Dataset,
    pub checkpoint: Option<Checkpoint>,
    pub accepted: Vec<AcceptedRow>,
}

impl JobRun {
    fn model_frame(id: JobId, step: u64, spec: &ModelSpec, params: &[f32]) -> Bytes {
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

    fn fresh_micros(&self) -> Vec<Micro> {
        let rows = schedule::step_rows(
            self.train.rows(),
            self.hyper.global_batch as usize,
            self.hyper.seed,
            self.step,
        );
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
}

/// The scheduler's whole state.
#[derive(Debug)]
pub struct State {
    config: SchedulerConfig,
    jobs: BTreeMap<JobId, JobRun>,
    workers: HashMap<WorkerId, WorkerInfo>,
    conns: HashMap<ConnId, Conn>,
    leases: HashMap<LeaseId, Lease>,
    /// Wall time per applied step, all jobs, for `/metrics`.
    step_hist: Histogram,
    next_conn: ConnId,
    next_lease: u64,
    /// Consecutive agreed results per (worker, backend); any disagreement resets all of a worker's to zero.
    /// In memory only: after a restart every worker earns trust again.
    trust: HashMap<(WorkerId, Backend), u32>,
    /// Seeded per coordinator start: randomises which open micro-batch a worker gets and the replication rolls, so
    /// colluders can neither choose to meet nor predict when they are unreplicated.
    rng: starling_core::rng::SplitMix64,
}

impl State {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            jobs: BTreeMap::new(),
            workers: HashMap::new(),
            conns: HashMap::new(),
            leases: HashMap::new(),
            step_hist: Histogram::default(),
            next_conn: 1,
            next_lease: 1,
            trust: HashMap::new(),
            rng: starling_core::rng::SplitMix64::new(start_seed()),
        }
    }

    /// Brings a job into memory from its checkpoint (or a fresh initialisation) and the accepted results of the
    /// step in progress, so nothing accepted before a restart is recomputed or re-credited.
    pub fn load_job(&mut self, load: JobLoad) {
        let n = load.spec.param_count();
        let (step, params, optim) = match load.checkpoint {
            Some(c) => {
                let optim = Optimizer::from_bytes(load.hyper.optimizer, n, &c.optim)
                    .unwrap_or_else(|| Optimizer::new(load.hyper.optimizer, n));
                (c.step, c.params, optim)
            }
            None => (
                0,
                load.spec.init_params(load.hyper.seed),
                Optimizer::new(load.hyper.optimizer, n),
            ),
        };
        let model_frame = JobRun::model_frame(load.id, step, &load.spec, &params);
        let mut job = JobRun {
            id: load.id,
            owner: load.owner,
            owner_name: load.owner_name,
            name: load.name,
            spec: load.spec,
            hyper: load.hyper,
            status: load.status,
            created_ms: load.created_ms,
            train: Arc::new(load.train),
            test: Arc::new(load.test),
            step,
            params: Arc::new(params),
            model_frame,
            optim,
            micros: Vec::new(),
            counters: JobCounters::default(),
            last_train: None,
            last_eval: None,
            best_accuracy: None,
            step_started: Instant::now(),
            step_ms: 0.0,
            result_ms: 0.0,
        };
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
                m.settled = Some(Settled::Accepted {
                    loss: a.loss,
                    correct: a.correct,
                    grad: Arc::new(a.grad),
                    agreeing: a.agreeing,
                });
            }
        }
        tracing::info!(job = %job.id, step = job.step, status = job.status.as_str(), "job loaded");
        self.jobs.insert(job.id, job);
    }

    /// Restores a metric seen before a restart (for status views).
    pub fn restore_metric(&mut self, job: JobId, m: MetricRow) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if m.kind == "eval" {
                j.best_accuracy = Some(j.best_accuracy.map_or(m.accuracy, |b| b.max(m.accuracy)));
                j.last_eval = Some(m);
            } else {
                j.last_train = Some(m);
            }
        }
    }

    pub fn set_worker(&mut self, id: WorkerId, info: WorkerInfo) {
        self.workers.insert(id, info);
    }

    /// Registers an authenticated connection of `worker` (known to the store as `stored_name`), unless that worker
    /// is refused. Returns the connection and the worker's credits (GFLOP) for its welcome.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        worker: WorkerId,
        stored_name: Option<String>,
        addr: IpAddr,
        name: Option<String>,
        backend: Backend,
        adapter: String,
        platform: Platform,
        tx: UnboundedSender<Outbound>,
    ) -> Option<(ConnId, f64)> {
        let info = self.workers.entry(worker).or_insert_with(|| WorkerInfo {
            name: stored_name,
            ..WorkerInfo::default()
        });
        if info.refused {
            return None;
        }
        let credits = info.credits();
        let id = self.next_conn;
        self.next_conn += 1;
        let conn = Conn {
            worker,
            addr,
            name,
            backend,
            adapter,
            platform,
            tx,
            ready: false,
            lease: None,
            model: None,
            waiting_sent: false,
            connected_ms: now_ms(),
        };
        self.conns.insert(id, conn);
        Some((id, credits))
    }

    /// Sends frames directly (used for the welcome before any effect exists).
    pub fn send(&self, conn: ConnId, out: Outbound) {
        if let Some(c) = self.conns.get(&conn) {
            let _ = c.tx.send(out);
        }
    }

    /// Delivers effects' frames to their connections (those already gone are skipped).
    pub fn deliver(&self, sends: Vec<(ConnId, Outbound)>) {
        for (conn, out) in sends {
            self.send(conn, out);
        }
    }

    /// A connection closed: its leases become available again.
    pub fn disconnect(&mut self, conn: ConnId) -> Effects {
        let mut fx = Effects::default();
        self.conns.remove(&conn);
        let gone: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.drop_lease(id);
        }
        self.assign_all(&mut fx);
        fx
    }

    fn drop_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(job) = self.jobs.get_mut(&lease.job)
            && job.step == lease.step
            && let Some(m) = job.micros.get_mut(lease.micro as usize)
        {
            m.active.retain(|l| *l != id);
        }
        if let Some(c) = self.conns.get_mut(&lease.conn)
            && c.lease == Some(id)
        {
            c.lease = None;
        }
        Some(lease)
    }

    /// Whether `msg` is part of the protocol's paced flow on `conn`: a `result` or `failed` for the lease it holds,
    /// or a `ready` while it holds none and has not already asked. Anything else counts against the rate limit.
    pub fn solicited(&self, conn: ConnId, msg: &WorkerMsg) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        match msg {
            WorkerMsg::Result { lease, .. } | WorkerMsg::Failed { lease, .. } => {
                c.lease == Some(*lease)
            }
            WorkerMsg::Ready => c.lease.is_none() && !c.ready,
            WorkerMsg::Hello { .. } => false,
        }
    }

    /// The worker asked for work.
    pub fn ready(&mut self, conn: ConnId) -> Effects {
        let mut fx = Effects::default();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ready = true;
        }
        self.assign(conn, Instant::now(), &mut fx);
        fx
    }

    /// Expires overdue leases and hands out work (including speculative replicas) to idle workers.
    pub fn tick(&mut self, now: Instant) -> Effects {
        let overdue: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(l) = self.drop_lease(id) {
                tracing::info!(lease = %id, worker = %l.worker, "lease expired; micro-batch will be reassigned");
                if let Some(job) = self.jobs.get_mut(&l.job) {
                    job.counters.leases_expired += 1;
                }
            }
        }
        let mut fx = Effects::default();
        self.assign_all(&mut fx);
        fx
    }

    fn assign_all(&mut self, fx: &mut Effects) {
        let now = Instant::now();
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ready && c.lease.is_none())
            .map(|(id, _)| *id)
            .collect();
        for conn in idle {
            self.assign(conn, now, fx);
        }
    }

    /// Gives `conn` a lease if any running job has a micro-batch it may take.
    fn assign(&mut self, conn_id: ConnId, now: Instant, fx: &mut Effects) {
        let Some(conn) = self.conns.get(&conn_id) else {
            return;
        };
        if !conn.ready || conn.lease.is_some() {
            return;
        }
        let (worker, addr) = (conn.worker, conn.addr);
        if self.workers.get(&worker).is_some_and(|w| w.refused) {
            return;
        }
        let speculate_after = self.config.speculate_after;
        let mut choice = None;
        for job in self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
        {
            if let Some((micro, speculative)) = pick_micro(
                job,
                worker,
                addr,
                now,
                speculate_after,
                &self.leases,
                self.rng.next_u64(),
            ) {
                choice = Some((job.id, micro, speculative));
                break;
            }
        }
        let Some((job_id, micro, speculative)) = choice else {
            let conn = self.conns.get_mut(&conn_id).expect("checked above");
            if !conn.waiting_sent {
                conn.waiting_sent = true;
                let reason = if self.jobs.values().any(|j| j.status == JobStatus::Running) {
                    "every micro-batch of the current step is taken; waiting for the next step"
                } else {
                    "no job is running"
                };
                fx.sends.push((
                    conn_id,
                    Outbound::msg(
                        &CoordinatorMsg::Waiting {
                            reason: reason.into(),
                        },
                        &[],
                    ),
                ));
            }
            return;
        };
        let lease_id = LeaseId(self.next_lease);
        self.next_lease += 1;
        let record = self
            .conns
            .get(&conn_id)
            .and_then(|c| self.trust.get(&(worker, c.backend)))
            .copied()
            .unwrap_or(0);
        let roll = self.rng.next_f64();
        let (threshold, max_params) = (
            self.config.trust_threshold,
            self.config.spot_check_max_params,
        );
        let job = self.jobs.get_mut(&job_id).expect("chosen above");
        let deadline = now + Duration::from_millis(job.hyper.lease_timeout_ms);
        let m = &mut job.micros[micro];
        // Adaptive replication: a trusted worker's fresh micro-batch is replicated only with probability
        // max(P_MIN, 1 / record); otherwise it is leased to that worker alone and spot-checked by recomputation.
        if job.hyper.adaptive
            && !speculative
            && m.involved.is_empty()
            && record >= threshold
            && job.spec.param_count() <= max_params
            && roll >= SPOT_P_MIN.max(1.0 / record as f64)
        {
            m.solo = true;
            m.wanted = 1;
        }
        m.active.push(lease_id);
        m.involved.push((worker, addr));
        let (x, labels) = job.train.gather(&m.rows);
        job.counters.leases_issued += 1;
        if speculative {
            job.counters.speculative_leases += 1;
        }
        let conn = self.conns.get_mut(&conn_id).expect("checked above");
        if conn.model != Some((job.id, job.step)) {
            fx.sends.push((
                conn_id,
                Outbound::Frame(Message::Binary(job.model_frame.clone())),
            ));
            conn.model = Some((job.id, job.step));
        }
        let msg = CoordinatorMsg::Lease {
            lease: lease_id,
            job: job.id,
            version: job.step,
            step: job.step,
            micro_batch: micro as u32,
            rows: labels.len() as u32,
            deadline_ms: job.hyper.lease_timeout_ms,
        };
        fx.sends
            .push((conn_id, Outbound::msg(&msg, &lease_payload(&x, &labels))));
        conn.ready = false;
        conn.lease = Some(lease_id);
        conn.waiting_sent = false;
        self.leases.insert(
            lease_id,
            Lease {
                job: job.id,
                step: job.step,
                micro: micro as u32,
                conn: conn_id,
                worker,
                issued: now,
                deadline,
            },
        );
    }

    /// A worker could not compute its lease: release it without a strike.
    pub fn failed(&mut self, conn: ConnId, lease: LeaseId) -> Effects {
        if self.leases.get(&lease).is_some_and(|l| l.conn == conn)
            && let Some(l) = self.drop_lease(lease)
            && let Some(job) = self.jobs.get_mut(&l.job)
        {
            job.counters.results_failed += 1;
        }
        let mut fx = Effects::default();
        self.assign_all(&mut fx);
        fx
    }

    fn verdict(
        &self,
        conn: ConnId,
        worker: WorkerId,
        lease: LeaseId,
        outcome: Outcome,
        fx: &mut Effects,
    ) {
        let credits = self.workers.get(&worker).map_or(0.0, WorkerInfo::credits);
        fx.sends.push((
            conn,
            Outbound::msg(
                &CoordinatorMsg::Verdict {
                    lease,
                    outcome,
                    credits,
                },
                &[],
            ),
        ));
    }

    fn credit(&mut self, worker: WorkerId, flops: u64) -> Credit {
        let w = self.workers.entry(worker).or_default();
        w.credits_flops += flops;
        w.accepted += 1;
        w.near_misses = 0;
        if let Some(backend) = self
            .conns
            .values()
            .find(|c| c.worker == worker)
            .map(|c| c.backend)
        {
            *self.trust.entry((worker, backend)).or_default() += 1;
        }
        Credit { worker, flops }
    }

    fn strike(&mut self, worker: WorkerId, fx: &mut Effects) {
        self.trust.retain(|(w, _), _| *w != worker);
        let limit = self.config.strike_limit;
        let w = self.workers.entry(worker).or_default();
        w.rejected += 1;
        w.strikes += 1;
        let refuse = w.strikes >= limit && !w.refused;
        if refuse {
            w.refused = true;
            tracing::warn!(%worker, strikes = w.strikes, "worker refused further work after repeated losing results");
            for (id, c) in &self.conns {
                if c.worker == worker {
                    fx.sends.push((
                        *id,
                        Outbound::Close(
                            ErrorCode::Refused,
                            format!("refused after {} rejected results", limit),
                        ),
                    ));
                }
            }
        }
        fx.store.push(StoreOp::Rejection {
            worker,
            refused: refuse,
        });
    }

    /// Takes `lease_id` back from `conn` for its result. A lease that is unknown, expired, another connection's, or
    /// of a superseded step is late: ignored, no strike (`None`, with the `late` verdict in `fx`).
    fn claim(
        &mut self,
        conn: ConnId,
        lease_id: LeaseId,
        fx: &mut Effects,
    ) -> Option<(WorkerId, Lease)> {
        let worker = self.conns.get(&conn).map(|c| c.worker)?;
        let lease = match self.leases.get(&lease_id) {
            Some(l) if l.conn == conn => self.drop_lease(lease_id),
            _ => None,
        };
        if let Some(c) = self.conns.get_mut(&conn)
            && c.lease == Some(lease_id)
        {
            c.lease = None;
        }
        let Some(lease) = lease else {
            self.verdict(conn, worker, lease_id, Outcome::Late, fx);
            return None;
        };
        let job = self.jobs.get_mut(&lease.job)?;
        if job.step != lease.step || job.status.is_terminal() {
            job.counters.results_late += 1;
            self.verdict(conn, worker, lease_id, Outcome::Late, fx);
            return None;
        }
        Some((worker, lease))
    }

    /// A result arrived for `lease` whose payload does not match the `commit` it was sent with: rejected with a
    /// strike, like any invalid result (or `late` when the lease is no longer this connection's).
    pub fn result_mismatch(&mut self, conn: ConnId, lease_id: LeaseId) -> Effects {
        let mut fx = Effects::default();
        let Some((worker, lease)) = self.claim(conn, lease_id, &mut fx) else {
            return fx;
        };
        tracing::warn!(%worker, lease = %lease_id, "result rejected: payload does not match its commit");
        if let Some(job) = self.jobs.get_mut(&lease.job) {
            job.counters.results_rejected += 1;
        }
        self.strike(worker, &mut fx);
        self.verdict(conn, worker, lease_id, Outcome::Rejected, &mut fx);
        self.assign_all(&mut fx);
        fx
    }

    /// A result arrived for `lease` on `conn`.
    pub fn result(
        &mut self,
        conn: ConnId,
        lease_id: LeaseId,
        loss: f32,
        correct: u32,
        grad: Vec<f32>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some((worker, lease)) = self.claim(conn, lease_id, &mut fx) else {
            return fx;
        };
        let Some(job) = self.jobs.get_mut(&lease.job) else {
            return fx;
        };
        let elapsed = lease.issued.elapsed().as_secs_f64() * 1000.0;
        job.result_ms = if job.result_ms == 0.0 {
            elapsed
        } else {
            0.9 * job.result_ms + 0.1 * elapsed
        };
        let micro = lease.micro;
        let m = &mut job.micros[micro as usize];
        let rows = m.rows.len() as u32;
        let flops = job.spec.train_flops(rows as u64);
        if let Err(why) = verify::validate(loss, correct, rows, &grad, job.spec.param_count()) {
            tracing::warn!(%worker, lease = %lease_id, %why, "invalid result rejected");
            job.counters.results_rejected += 1;
            self.strike(worker, &mut fx);
            self.verdict(conn, worker, lease_id, Outcome::Rejected, &mut fx);
            self.assign_all(&mut fx);
            return fx;
        }
        let (tolerance, quorum, step) =
            (job.hyper.tolerance, job.hyper.quorum() as usize, job.step);
        let max_params = self.config.spot_check_max_params;
        match &m.settled {
            Some(Settled::Accepted {
                loss: l,
                correct: c,
                grad: g,
                ..
            }) => {
                // A speculative or extra replica of a micro-batch already accepted: credit it if it agrees.
                let agrees = verify::agree(
                    &Candidate {
                        loss: *l,
                        correct: *c,
                        grad: g,
                    },
                    &Candidate {
                        loss,
                        correct,
                        grad: &grad,
                    },
                    tolerance,
                );
                if agrees {
                    job.counters.results_accepted += 1;
                    let credit = self.credit(worker, flops);
                    fx.store.push(StoreOp::Credit {
                        job: lease.job,
                        step,
                        micro,
                        credit,
                    });
                    self.verdict(conn, worker, lease_id, Outcome::Accepted, &mut fx);
                } else {
                    job.counters.results_rejected += 1;
                    self.strike(worker, &mut fx);
                    self.verdict(conn, worker, lease_id, Outcome::Rejected, &mut fx);
                }
                self.assign_all(&mut fx);
                return fx;
            }
            Some(Settled::Abandoned) => {
                job.counters.results_late += 1;
                self.verdict(conn, worker, lease_id, Outcome::Late, &mut fx);
                self.assign_all(&mut fx);
                return fx;
            }
            None => {}
        }
        if m.solo && m.subs.is_empty() {
            // A trusted worker's unreplicated result reaches the model only if the coordinator's own
            // recomputation agrees (`spot_checked`); until then it waits here like a first replica.
            let (x, labels) = job.train.gather(&m.rows);
            fx.spot_checks.push(SpotCheck {
                arbitrate: false,
                job: job.id,
                step,
                micro,
                lease: lease_id,
                spec: job.spec.clone(),
                params: job.params.clone(),
                x,
                labels,
            });
            job.counters.spot_checks += 1;
            m.subs.push(Submission {
                worker,
                conn,
                lease: lease_id,
                loss,
                correct,
                grad,
            });
            self.assign_all(&mut fx);
            return fx;
        }
        m.subs.push(Submission {
            worker,
            conn,
            lease: lease_id,
            loss,
            correct,
            grad,
        });
        let candidates: Vec<Candidate<'_>> = m
            .subs
            .iter()
            .map(|s| Candidate {
                loss: s.loss,
                correct: s.correct,
                grad: &s.grad,
            })
            .collect();
        match verify::settle(&candidates, quorum, tolerance) {
            Some((winners, losers)) => {
                let n = winners.len() as f32;
                let mut mean = vec![0.0f32; m.subs[winners[0]].grad.len()];
                for &w in &winners {
                    for (o, v) in mean.iter_mut().zip(&m.subs[w].grad) {
                        *o += v / n;
                    }
                }
                let mean_loss = winners.iter().map(|&w| m.subs[w].loss).sum::<f32>() / n;
                let leader_correct = m.subs[winners[0]].correct;
                let row = AcceptedRow {
                    micro,
                    rows,
                    loss: mean_loss,
                    correct: leader_correct,
                    agreeing: winners.len() as u32,
                    grad: mean.clone(),
                };
                m.settled = Some(Settled::Accepted {
                    loss: mean_loss,
                    correct: leader_correct,
                    grad: Arc::new(mean),
                    agreeing: winners.len() as u32,
                });
                let subs = std::mem::take(&mut m.subs);
                job.counters.results_accepted += winners.len() as u64;
                job.counters.results_rejected += losers.len() as u64;
                let job_id = job.id;
                let credits: Vec<Credit> = winners
                    .iter()
                    .map(|&w| self.credit(subs[w].worker, flops))
                    .collect();
                fx.store.push(StoreOp::Accepted {
                    job: job_id,
                    step,
                    row,
                    credits,
                });
                for &w in &winners {
                    self.verdict(
                        subs[w].conn,
                        subs[w].worker,
                        subs[w].lease,
                        Outcome::Accepted,
                        &mut fx,
                    );
                }
                for &l in &losers {
                    tracing::warn!(worker = %subs[l].worker, job = %job_id, step, micro, "result lost verification");
                    self.strike(subs[l].worker, &mut fx);
                    self.verdict(
                        subs[l].conn,
                        subs[l].worker,
                        subs[l].lease,
                        Outcome::Rejected,
                        &mut fx,
                    );
                }
                self.maybe_advance(job_id, &mut fx);
            }
            None => {
                if m.subs.len() as u32 >= m.wanted && !m.arbitrating {
                    job.counters.disagreements += 1;
                    if job.spec.param_count() <= max_params {
                        // Settle it with our own recomputation: a volunteer tie-breaker could be a colluder's
                        // partner, who would then outvote (and get struck) the honest replica.
                        m.arbitrating = true;
                        job.counters.arbitrations += 1;
                        let (x, labels) = job.train.gather(&m.rows);
                        let check = SpotCheck {
                            arbitrate: true,
                            job: job.id,
                            step,
                            micro,
                            lease: lease_id,
                            spec: job.spec.clone(),
                            params: job.params.clone(),
                            x,
                            labels,
                        };
                        fx.spot_checks.push(check);
                        tracing::info!(job = %job.id, step, micro, "results disagree; the coordinator recomputes the micro-batch to settle it");
                    } else if m.wanted >= MAX_REPLICAS {
                        tracing::warn!(job = %job.id, step, micro, "no quorum after {MAX_REPLICAS} replicas; micro-batch abandoned for this step");
                        job.counters.micro_batches_abandoned += 1;
                        m.settled = Some(Settled::Abandoned);
                        m.subs.clear();
                        let job_id = job.id;
                        self.maybe_advance(job_id, &mut fx);
                    } else {
                        m.wanted += 1;
                        tracing::info!(job = %job.id, step, micro, replicas = m.wanted, "results disagree; leasing a tie-breaker");
                    }
                }
            }
        }
        self.assign_all(&mut fx);
        fx
    }

    /// Applies the step once every micro-batch is settled: row-weighted mean of the accepted gradients, one
    /// optimizer update, a new model version, a checkpoint, and (every `eval_every` steps) an evaluation.
    fn maybe_advance(&mut self, job_id: JobId, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if job.micros.is_empty() || job.micros.iter().any(|m| m.settled.is_none()) {
            return;
        }
        let mut parts: Vec<(u32, &[f32])> = Vec::new();
        let (mut loss_sum, mut correct, mut rows, mut min_agreeing) =
            (0.0f64, 0u32, 0u32, u32::MAX);
        for m in &job.micros {
            if let Some(Settled::Accepted {
                loss,
                correct: c,
                grad,
                agreeing,
            }) = &m.settled
            {
                let r = m.rows.len() as u32;
                parts.push((r, grad.as_slice()));
                loss_sum += *loss as f64 * r as f64;
                correct += c;
                rows += r;
                min_agreeing = min_agreeing.min(*agreeing);
            }
        }
        if parts.is_empty() {
            // Every micro-batch was abandoned: run the same step again with fresh leases.
            job.micros = job.fresh_micros();
            return;
        }
        let grad = crate::aggregate::combine(&parts, job.hyper.aggregate, job.hyper.clip_norm);
        let params = Arc::make_mut(&mut job.params);
        job.optim.step(params, &grad);
        job.step += 1;
        job.counters.steps_applied += 1;
        let elapsed = job.step_started.elapsed().as_secs_f64() * 1000.0;
        job.step_ms = if job.step_ms == 0.0 {
            elapsed
        } else {
            0.95 * job.step_ms + 0.05 * elapsed
        };
        job.step_started = Instant::now();
        self.step_hist.observe(elapsed / 1000.0);
        fx.notify.push(job.id);
        job.model_frame = JobRun::model_frame(job.id, job.step, &job.spec, &job.params);
        let train = MetricRow {
            step: job.step,
            kind: "train".into(),
            loss: (loss_sum / rows as f64) as f32,
            accuracy: correct as f32 / rows as f32,
            min_agreeing,
            at_ms: now_ms(),
        };
        if job.step % 50 == 0 {
            tracing::info!(job = %job.id, step = job.step, loss = train.loss, accuracy = train.accuracy, step_ms = job.step_ms as u64, "step applied");
        }
        job.last_train = Some(train.clone());
        fx.store.push(StoreOp::Checkpoint {
            job: job.id,
            ckpt: Checkpoint {
                step: job.step,
                params: job.params.to_vec(),
                optim: job.optim.to_bytes(),
            },
            train,
        });
        if job.step % job.hyper.eval_every == 0 || job.step >= job.hyper.steps {
            fx.evals.push(EvalTask {
                job: job.id,
                step: job.step,
                spec: job.spec.clone(),
                params: job.params.clone(),
                test: job.test.clone(),
            });
        }
        if job.step >= job.hyper.steps {
            job.status = JobStatus::Completed;
            job.micros.clear();
            fx.store.push(StoreOp::Status {
                job: job.id,
                status: JobStatus::Completed,
            });
            tracing::info!(job = %job.id, step = job.step, "job completed its steps");
        } else {
            job.micros = job.fresh_micros();
        }
    }

    /// An evaluation finished: record it, and complete the job if it reached its target accuracy.
    pub fn evaluated(&mut self, job_id: JobId, step: u64, eval: EvalOutput) -> Effects {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        let m = MetricRow {
            step,
            kind: "eval".into(),
            loss: eval.loss,
            accuracy: eval.accuracy(),
            min_agreeing: 0,
            at_ms: now_ms(),
        };
        tracing::info!(job = %job_id, step, test_loss = m.loss, test_accuracy = m.accuracy, "evaluated on held-out set");
        job.best_accuracy = Some(job.best_accuracy.map_or(m.accuracy, |b| b.max(m.accuracy)));
        if job.last_eval.as_ref().is_none_or(|l| l.step <= step) {
            job.last_eval = Some(m.clone());
        }
        if job.status == JobStatus::Running
            && job.hyper.target_accuracy.is_some_and(|t| m.accuracy >= t)
        {
            job.status = JobStatus::Completed;
            job.micros.clear();
            tracing::info!(job = %job_id, step, accuracy = m.accuracy, "target accuracy reached; job completed");
            fx.store.push(StoreOp::Status {
                job: job_id,
                status: JobStatus::Completed,
            });
        }
        fx.store.push(StoreOp::Eval {
            job: job_id,
            metric: m,
        });
        fx.notify.push(job_id);
        fx
    }

    /// Owner control: pause (no new leases), resume, or cancel (terminal; outstanding leases are dropped).
    pub fn set_status(&mut self, job_id: JobId, want: JobStatus) -> Result<Effects, String> {
        let mut fx = Effects::default();
        let job = self.jobs.get_mut(&job_id).ok_or("no such job")?;
        if job.status.is_terminal() {
            return Err(format!("job is {} and cannot change", job.status.as_str()));
        }
        match want {
            JobStatus::Paused | JobStatus::Running => job.status = want,
            JobStatus::Cancelled => {
                job.status = JobStatus::Cancelled;
                job.micros.clear();
                let dropped: Vec<LeaseId> = self
                    .leases
                    .iter()
                    .filter(|(_, l)| l.job == job_id)
                    .map(|(id, _)| *id)
                    .collect();
                for id in dropped {
                    self.drop_lease(id);
                }
            }
            JobStatus::Completed => return Err("a job completes by itself".into()),
        }
        tracing::info!(job = %job_id, status = want.as_str(), "job status changed by its owner");
        fx.store.push(StoreOp::Status {
            job: job_id,
            status: want,
        });
        fx.notify.push(job_id);
        self.assign_all(&mut fx);
        Ok(fx)
    }

    /// The coordinator's recomputation of a spot-checked micro-batch finished (`None`: it could not run). Accepts
    /// the trusted worker's result if they agree; otherwise a strike, trust back to zero, and the micro-batch goes
    /// back to ordinary R-fold replication. Without a recomputation it falls back to replication too.
    pub fn spot_checked(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        lease: LeaseId,
        reference: Option<starling_core::StepOutput>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        if job.step != step || job.status.is_terminal() {
            return fx;
        }
        let Some(m) = job.micros.get_mut(micro as usize) else {
            return fx;
        };
        let Some(i) = m.subs.iter().position(|s| s.lease == lease) else {
            return fx;
        };
        if m.settled.is_some() {
            return fx;
        }
        m.solo = false;
        let Some(reference) = reference else {
            m.wanted = job.hyper.redundancy;
            self.assign_all(&mut fx);
            return fx;
        };
        let rows = m.rows.len() as u32;
        let flops = job.spec.train_flops(rows as u64);
        let s = &m.subs[i];
        let theirs = Candidate {
            loss: s.loss,
            correct: s.correct,
            grad: &s.grad,
        };
        let ours = Candidate {
            loss: reference.loss,
            correct: reference.correct,
            grad: &reference.grad,
        };
        let agrees = verify::agree(&theirs, &ours, job.hyper.tolerance);
        let sub = m.subs.remove(i);
        if agrees {
            // Two independent computations agreed: the worker's and the coordinator's.
            let row = AcceptedRow {
                micro,
                rows,
                loss: sub.loss,
                correct: sub.correct,
                agreeing: 2,
                grad: sub.grad.clone(),
            };
            m.settled = Some(Settled::Accepted {
                loss: sub.loss,
                correct: sub.correct,
                grad: Arc::new(sub.grad),
                agreeing: 2,
            });
            job.counters.results_accepted += 1;
            let credit = self.credit(sub.worker, flops);
            fx.store.push(StoreOp::Accepted {
                job: job_id,
                step,
                row,
                credits: vec![credit],
            });
            self.verdict(sub.conn, sub.worker, sub.lease, Outcome::Accepted, &mut fx);
            self.maybe_advance(job_id, &mut fx);
        } else if verify::near_miss(&theirs_owned(&sub), &ours, job.hyper.tolerance) {
            // A ReLU-kink near miss (see `verify::near_miss`): not used, not struck; replicate the micro-batch.
            tracing::info!(worker = %sub.worker, job = %job_id, step, micro, "spot check was a near miss; replicating instead");
            job.counters.results_late += 1;
            m.wanted = job.hyper.redundancy;
            self.verdict(sub.conn, sub.worker, sub.lease, Outcome::Late, &mut fx);
        } else {
            tracing::warn!(worker = %sub.worker, job = %job_id, step, micro, "trusted result failed the coordinator's spot check");
            job.counters.results_rejected += 1;
            job.counters.spot_check_failures += 1;
            m.wanted = job.hyper.redundancy;
            self.strike(sub.worker, &mut fx);
            self.verdict(sub.conn, sub.worker, sub.lease, Outcome::Rejected, &mut fx);
        }
        self.assign_all(&mut fx);
        fx
    }

    /// The coordinator's recomputation of a disputed micro-batch finished (`None`: it could not run, so a volunteer
    /// tie-breaker is leased instead). Replicas that agree with it win (accepted, credited; `agreeing` counts the
    /// coordinator too); the others get strikes. If none agrees, all are struck and the micro-batch is leased afresh.
    pub fn arbitrated(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        reference: Option<starling_core::StepOutput>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        if job.step != step || job.status.is_terminal() {
            return fx;
        }
        let Some(m) = job.micros.get_mut(micro as usize) else {
            return fx;
        };
        if m.settled.is_some() || !m.arbitrating {
            return fx;
        }
        m.arbitrating = false;
        let Some(reference) = reference else {
            m.wanted = (m.wanted + 1).min(MAX_REPLICAS);
            self.assign_all(&mut fx);
            return fx;
        };
        let tolerance = job.hyper.tolerance;
        let rows = m.rows.len() as u32;
        let flops = job.spec.train_flops(rows as u64);
        let ours = Candidate {
            loss: reference.loss,
            correct: reference.correct,
            grad: &reference.grad,
        };
        let (winners, rest): (Vec<Submission>, Vec<Submission>) =
            std::mem::take(&mut m.subs).into_iter().partition(|s| {
                verify::agree(
                    &Candidate {
                        loss: s.loss,
                        correct: s.correct,
                        grad: &s.grad,
                    },
                    &ours,
                    tolerance,
                )
            });
        // Honest devices can differ by more than `tolerance` when a ReLU input sits within rounding of zero (its
        // derivative flips between 0 and 1 for that unit), while loss and correct count still match. Such a
        // near-miss is inconclusive: neither credited nor struck (`late`), and never used for the model.
        let (inconclusive, losers): (Vec<Submission>, Vec<Submission>) =
            rest.into_iter().partition(|s| {
                verify::near_miss(
                    &Candidate {
                        loss: s.loss,
                        correct: s.correct,
                        grad: &s.grad,
                    },
                    &ours,
                    tolerance,
                )
            });
        job.counters.results_rejected += losers.len() as u64;
        job.counters.results_late += inconclusive.len() as u64;
        if winners.is_empty() && inconclusive.is_empty() {
            tracing::warn!(job = %job_id, step, micro, replicas = losers.len(), "no replica agrees with the coordinator's recomputation");
            m.wanted = job.hyper.redundancy;
        } else if winners.is_empty() {
            // Only near-misses: the coordinator's own recomputation is the micro-batch's result, backed by the
            // near-miss replicas (counted as agreeing computations); nobody is credited for it.
            let agreeing = inconclusive.len() as u32 + 1;
            let row = AcceptedRow {
                micro,
                rows,
                loss: reference.loss,
                correct: reference.correct,
                agreeing,
                grad: reference.grad.clone(),
            };
            m.settled = Some(Settled::Accepted {
                loss: reference.loss,
                correct: reference.correct,
                grad: Arc::new(reference.grad.clone()),
                agreeing,
            });
            fx.store.push(StoreOp::Accepted {
                job: job_id,
                step,
                row,
                credits: Vec::new(),
            });
        } else {
            let n = winners.len() as f32;
            let mut mean = vec![0.0f32; reference.grad.len()];
            for w in &winners {
                for (o, v) in mean.iter_mut().zip(&w.grad) {
                    *o += v / n;
                }
            }
            let loss = winners.iter().map(|w| w.loss).sum::<f32>() / n;
            let (correct, agreeing) = (winners[0].correct, winners.len() as u32 + 1);
            let row = AcceptedRow {
                micro,
                rows,
                loss,
                correct,
                agreeing,
                grad: mean.clone(),
            };
            m.settled = Some(Settled::Accepted {
                loss,
                correct,
                grad: Arc::new(mean),
                agreeing,
            });
            job.counters.results_accepted += winners.len() as u64;
            let credits: Vec<Credit> = winners
                .iter()
                .map(|w| self.credit(w.worker, flops))
                .collect();
            fx.store.push(StoreOp::Accepted {
                job: job_id,
                step,
                row,
                credits,
            });
            for w in &winners {
                self.verdict(w.conn, w.worker, w.lease, Outcome::Accepted, &mut fx);
            }
        }
        for l in &inconclusive {
            let w = self.workers.entry(l.worker).or_default();
            w.near_misses += 1;
            if w.near_misses >= NEAR_MISS_STRIKE {
                w.near_misses = 0;
                tracing::warn!(worker = %l.worker, job = %job_id, step, micro, "{NEAR_MISS_STRIKE} near misses in a row: struck");
                self.strike(l.worker, &mut fx);
                self.verdict(l.conn, l.worker, l.lease, Outcome::Rejected, &mut fx);
                continue;
            }
            tracing::info!(
                worker = %l.worker, job = %job_id, step, micro, rel_l2 = verify::relative_l2(&l.grad, &reference.grad),
                "result is a near miss of the coordinator's recomputation (ReLU kink rounding): not counted, no strike"
            );
            self.verdict(l.conn, l.worker, l.lease, Outcome::Late, &mut fx);
        }
        for l in &losers {
            tracing::warn!(
                worker = %l.worker, job = %job_id, step, micro,
                rel_l2 = verify::relative_l2(&l.grad, &reference.grad),
                loss = l.loss, reference_loss = reference.loss, correct = l.correct, reference_correct = reference.correct,
                "result disagrees with the coordinator's recomputation"
            );
            self.strike(l.worker, &mut fx);
            self.verdict(l.conn, l.worker, l.lease, Outcome::Rejected, &mut fx);
        }
        self.maybe_advance(job_id, &mut fx);
        self.assign_all(&mut fx);
        fx
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

fn theirs_owned(s: &Submission) -> Candidate<'_> {
    Candidate {
        loss: s.loss,
        correct: s.correct,
        grad: &s.grad,
    }
}

/// A Prometheus-style cumulative histogram of seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// Observations ≤ each bound (cumulative), then the total count and sum.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Self {
            counts: vec![0; bounds.len()],
            bounds,
            count: 0,
            sum: 0.0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Chooses a micro-batch of `job` for `worker`: one still short of its wanted replicas that this worker has not
/// touched, preferring micro-batches none of whose replicas came from the same address; failing that, a
/// speculative extra replica of a micro-batch whose lease has been outstanding for a while.
fn pick_micro(
    job: &JobRun,
    worker: WorkerId,
    addr: IpAddr,
    now: Instant,
    speculate_after: Duration,
    leases: &HashMap<LeaseId, Lease>,
    salt: u64,
) -> Option<(usize, bool)> {
    let open = |m: &Micro| m.settled.is_none() && !m.involved.iter().any(|(w, _)| *w == worker);
    // (same address, replicas so far, a salted hash of the index: random order among equals, fresh per call)
    let mut best: Option<(bool, usize, u64, usize)> = None;
    for (i, m) in job.micros.iter().enumerate() {
        if !open(m) || (m.active.len() + m.subs.len()) as u32 >= m.wanted {
            continue;
        }
        let key = (
            m.involved.iter().any(|(_, a)| *a == addr),
            m.active.len() + m.subs.len(),
            starling_core::rng::SplitMix64::new(salt ^ i as u64).next_u64(),
            i,
        );
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    if let Some((_, _, _, i)) = best {
        return Some((i, false));
    }
    let threshold = speculate_after.max(Duration::from_secs_f64(3.0 * job.result_ms / 1000.0));
    job.micros.iter().enumerate().find_map(|(i, m)| {
        let straggling = m.active.iter().any(|l| {
            leases
                .get(l)
                .is_some_and(|l| now.duration_since(l.issued) >= threshold)
        });
        (open(m) && straggling && ((m.active.len() + m.subs.len()) as u32) < m.wanted + 1)
            .then_some((i, true))
    })
}
