//! Unit tests of the scheduler state machine: no sockets, no database, an injected clock and seed. Each test
//! drives `State` through one behaviour and checks the frames, store operations and counters it produces. This
//! module is the harness; `verification` covers results and verdicts, `leasing` leases, fairness and durability,
//! `local` the `local` mode (protocol v2), `elastic` its elastic rounds and bounded staleness, `cluster` a job moving to another node.

mod audited;
mod cluster;
mod elastic;
mod leasing;
mod local;
mod verification;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starling_core::data::Dataset;
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, Platform, WorkerId,
};
use starling_core::spec::Activation;
use starling_core::{ModelSpec, StepOutput};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::*;
use crate::job::{Hyper, JobStatus};
use crate::store::AcceptedRow;

/// Parameters of the tiny model below: 4 inputs → 2 logits.
pub(super) const PARAMS: usize = 10;

pub(super) fn spec() -> ModelSpec {
    ModelSpec::dense(4, &[(2, Activation::None)])
}

pub(super) fn dataset(rows: usize) -> Dataset {
    Dataset {
        features: (0..rows * 4).map(|i| (i % 7) as f32 / 7.0).collect(),
        labels: (0..rows).map(|i| (i % 2) as u32).collect(),
        dim: 4,
    }
}

/// 16-row steps of four 4-row micro-batches, R = 2.
pub(super) fn hyper() -> Hyper {
    Hyper {
        global_batch: 16,
        micro_batch: 4,
        steps: 1_000,
        eval_every: 1_000,
        lease_timeout_ms: 10_000,
        ..Hyper::default()
    }
}

/// One 4-row micro-batch per step: a step is settled by a single quorum.
pub(super) fn one_micro() -> Hyper {
    Hyper {
        global_batch: 4,
        ..hyper()
    }
}

/// The honest result of (job, step, micro): any deterministic value will do, the scheduler only compares.
pub(super) fn honest(job: JobId, step: u64, micro: u32) -> (f32, u32, Vec<f32>) {
    let grad = (0..PARAMS)
        .map(|i| ((job.0 * 17 + step * 31 + micro as u64 * 7 + i as u64) % 13) as f32 + 1.0)
        .collect();
    (1.0, 2, grad)
}

/// A lease as a worker saw it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) lease: LeaseId,
    pub(super) job: JobId,
    pub(super) step: u64,
    pub(super) micro: u32,
}

pub(super) struct Harness {
    pub(super) st: State,
    now: Arc<Mutex<Instant>>,
    /// Each connection's writer channel (frames the scheduler sent directly, e.g. nothing in these tests).
    _rx: Vec<UnboundedReceiver<Outbound>>,
    /// What the workers have been sent, per connection, in order.
    pub(super) inbox: HashMap<ConnId, Vec<CoordinatorMsg>>,
    /// Connections closed by the scheduler, with the error code.
    pub(super) closed: HashMap<ConnId, ErrorCode>,
    /// Store operations produced so far.
    pub(super) ops: Vec<StoreOp>,
    pub(super) recomputes: Vec<Recompute>,
}

pub(super) fn decode(out: &Outbound) -> Option<CoordinatorMsg> {
    use axum::extract::ws::Message;
    match out {
        Outbound::Frame(Message::Text(t)) => CoordinatorMsg::decode_text(t.as_str()).ok(),
        Outbound::Frame(Message::Binary(b)) => {
            CoordinatorMsg::decode_binary(b).ok().map(|(m, _)| m)
        }
        _ => None,
    }
}

impl Harness {
    pub(super) fn new() -> Self {
        Self::with(|_| {})
    }

    pub(super) fn with(tune: impl FnOnce(&mut SchedulerConfig)) -> Self {
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock_now = now.clone();
        let mut config = SchedulerConfig {
            strike_limit: 3,
            speculate_after: Duration::from_secs(2),
            trust_threshold: 10,
            spot_check_max_params: 1_000_000,
            placement: Placement::Subnet,
            clock: Clock::from_fn(move || *clock_now.lock().expect("clock")),
            seed: Some(7),
        };
        tune(&mut config);
        Self {
            st: State::new(config),
            now,
            _rx: Vec::new(),
            inbox: HashMap::new(),
            closed: HashMap::new(),
            ops: Vec::new(),
            recomputes: Vec::new(),
        }
    }

    pub(super) fn advance(&self, d: Duration) {
        *self.now.lock().expect("clock") += d;
    }

    pub(super) fn load(&mut self, id: u64, hyper: Hyper, accepted: Vec<AcceptedRow>) {
        self.st.load_job(JobLoad {
            id: JobId(id),
            owner: Some(1),
            owner_name: Some("alice".into()),
            name: format!("job{id}"),
            spec: spec(),
            hyper,
            status: JobStatus::Running,
            created_ms: 0,
            train: dataset(64).into(),
            test: dataset(8).into(),
            checkpoint: None,
            accepted,
            dataset_frame: None,
        });
    }

    /// Connects worker `w` from 10.`w / 250`.`w % 250`.1 (distinct /24s unless a test says otherwise).
    pub(super) fn connect(&mut self, w: u64) -> ConnId {
        self.connect_from(
            w,
            IpAddr::V4(Ipv4Addr::new(10, (w / 250) as u8, (w % 250) as u8, 1)),
        )
    }

    pub(super) fn connect_from(&mut self, w: u64, addr: IpAddr) -> ConnId {
        let (tx, rx) = unbounded_channel();
        self._rx.push(rx);
        let (conn, _) = self
            .st
            .admit(
                WorkerId(w),
                None,
                addr,
                None,
                Backend::Cpu,
                "test".into(),
                Platform::Native,
                tx,
            )
            .expect("admitted");
        conn
    }

    /// Records what `fx` asks for, as the transport would with a store that never fails.
    pub(super) fn take(&mut self, fx: Effects) {
        let Effects { store, later, .. } = fx;
        self.ops.extend(store);
        for d in later {
            match d.action {
                Action::Send { conn, out, .. } => {
                    if let Outbound::Close(code, _) = &out {
                        self.closed.insert(conn, *code);
                    }
                    if let Some(m) = decode(&out) {
                        self.inbox.entry(conn).or_default().push(m);
                    }
                }
                Action::Recompute(r) => self.recomputes.push(r),
                Action::Notify(_) | Action::Eval(_) => {}
            }
        }
    }

    pub(super) fn ready(&mut self, conn: ConnId) {
        let fx = self.st.ready(conn);
        self.take(fx);
    }

    /// The lease `conn` holds (the last `lease` frame it was sent), if any.
    pub(super) fn held(&self, conn: ConnId) -> Option<Held> {
        self.inbox.get(&conn)?.iter().rev().find_map(|m| match m {
            CoordinatorMsg::Lease {
                lease,
                job,
                step,
                micro_batch,
                ..
            } => Some(Held {
                lease: *lease,
                job: *job,
                step: *step,
                micro: *micro_batch,
            }),
            _ => None,
        })
    }

    pub(super) fn leases_sent(&self, conn: ConnId) -> usize {
        self.inbox.get(&conn).map_or(0, |v| {
            v.iter()
                .filter(|m| matches!(m, CoordinatorMsg::Lease { .. }))
                .count()
        })
    }

    /// Sends `conn`'s result for its held lease: honest, or transformed by `lie`.
    pub(super) fn submit(&mut self, conn: ConnId, lie: impl Fn(&mut [f32])) -> Held {
        let h = self.held(conn).expect("holds a lease");
        let (loss, correct, mut grad) = honest(h.job, h.step, h.micro);
        lie(&mut grad);
        let fx = self.st.result(conn, h.lease, loss, correct, grad);
        self.take(fx);
        h
    }

    pub(super) fn honest_result(&mut self, conn: ConnId) -> Held {
        self.submit(conn, |_| {})
    }

    pub(super) fn verdicts(&self, conn: ConnId) -> Vec<Outcome> {
        self.inbox.get(&conn).map_or(Vec::new(), |v| {
            v.iter()
                .filter_map(|m| match m {
                    CoordinatorMsg::Verdict { outcome, .. } => Some(*outcome),
                    _ => None,
                })
                .collect()
        })
    }

    pub(super) fn last_verdict(&self, conn: ConnId) -> Option<Outcome> {
        self.verdicts(conn).last().copied()
    }

    pub(super) fn job(&self, id: u64) -> &JobRun {
        self.st.job(JobId(id)).expect("job")
    }

    /// Answers the oldest pending recomputation with the honest result, or `reference` if given.
    pub(super) fn recompute_honestly(&mut self) {
        let r = self.recomputes.remove(0);
        let (loss, correct, grad) = honest(r.job, r.step, r.micro);
        let fx = self.st.recomputed(
            r.job,
            r.step,
            r.micro,
            Some(StepOutput {
                loss,
                correct,
                grad,
            }),
        );
        self.take(fx);
    }
}

pub(super) fn flip(g: &mut [f32]) {
    g.iter_mut().for_each(|v| *v = -*v);
}

/// A relative-L2 distance of ~0.01 (inside the near-miss band, outside the 1e-3 tolerance).
pub(super) fn nudge(g: &mut [f32]) {
    g[0] *= 1.1;
}
