//! Unit tests of the scheduler state machine: no sockets, no database, an injected clock and seed. Each test
//! drives `State` through one behaviour and checks the frames, store operations and counters it produces.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starling_core::data::Dataset;
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, Platform, WorkerId,
};
use starling_core::spec::{Activation, LayerSpec};
use starling_core::{ModelSpec, StepOutput};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::*;
use crate::job::{Hyper, JobStatus};
use crate::store::AcceptedRow;

/// Parameters of the tiny model below: 4 inputs → 2 logits.
const PARAMS: usize = 10;

fn spec() -> ModelSpec {
    ModelSpec {
        input: 4,
        layers: vec![LayerSpec {
            units: 2,
            activation: Activation::None,
        }],
    }
}

fn dataset(rows: usize) -> Dataset {
    Dataset {
        features: (0..rows * 4).map(|i| (i % 7) as f32 / 7.0).collect(),
        labels: (0..rows).map(|i| (i % 2) as u32).collect(),
        dim: 4,
    }
}

/// 16-row steps of four 4-row micro-batches, R = 2.
fn hyper() -> Hyper {
    Hyper {
        global_batch: 16,
        micro_batch: 4,
        steps: 1_000,
        eval_every: 1_000,
        lease_timeout_ms: 10_000,
        ..Hyper::default()
    }
}

/// The honest result of (job, step, micro): any deterministic value will do, the scheduler only compares.
fn honest(job: JobId, step: u64, micro: u32) -> (f32, u32, Vec<f32>) {
    let grad = (0..PARAMS)
        .map(|i| ((job.0 * 17 + step * 31 + micro as u64 * 7 + i as u64) % 13) as f32 + 1.0)
        .collect();
    (1.0, 2, grad)
}

/// A lease as a worker saw it.
#[derive(Debug, Clone, Copy)]
struct Held {
    lease: LeaseId,
    job: JobId,
    step: u64,
    micro: u32,
}

struct Harness {
    st: State,
    now: Arc<Mutex<Instant>>,
    /// Each connection's writer channel (frames the scheduler sent directly, e.g. nothing in these tests).
    _rx: Vec<UnboundedReceiver<Outbound>>,
    /// What the workers have been sent, per connection, in order.
    inbox: HashMap<ConnId, Vec<CoordinatorMsg>>,
    /// Connections closed by the scheduler, with the error code.
    closed: HashMap<ConnId, ErrorCode>,
    /// Store operations produced so far.
    ops: Vec<StoreOp>,
    recomputes: Vec<Recompute>,
}

fn decode(out: &Outbound) -> Option<CoordinatorMsg> {
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
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tune: impl FnOnce(&mut SchedulerConfig)) -> Self {
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock_now = now.clone();
        let mut config = SchedulerConfig {
            strike_limit: 3,
            speculate_after: Duration::from_secs(2),
            trust_threshold: 10,
            spot_check_max_params: 1_000_000,
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

    fn advance(&self, d: Duration) {
        *self.now.lock().expect("clock") += d;
    }

    fn load(&mut self, id: u64, hyper: Hyper, accepted: Vec<AcceptedRow>) {
        self.st.load_job(JobLoad {
            id: JobId(id),
            owner: Some(1),
            owner_name: Some("alice".into()),
            name: format!("job{id}"),
            spec: spec(),
            hyper,
            status: JobStatus::Running,
            created_ms: 0,
            train: dataset(64),
            test: dataset(8),
            checkpoint: None,
            accepted,
        });
    }

    /// Connects worker `w` from 10.0.0.`w` (distinct addresses unless a test says otherwise).
    fn connect(&mut self, w: u64) -> ConnId {
        self.connect_from(
            w,
            IpAddr::V4(Ipv4Addr::new(10, 0, (w / 250) as u8, (w % 250) as u8)),
        )
    }

    fn connect_from(&mut self, w: u64, addr: IpAddr) -> ConnId {
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
    fn take(&mut self, fx: Effects) {
        let Effects { store, later } = fx;
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

    fn ready(&mut self, conn: ConnId) {
        let fx = self.st.ready(conn);
        self.take(fx);
    }

    /// The lease `conn` holds (the last `lease` frame it was sent), if any.
    fn held(&self, conn: ConnId) -> Option<Held> {
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

    fn leases_sent(&self, conn: ConnId) -> usize {
        self.inbox.get(&conn).map_or(0, |v| {
            v.iter()
                .filter(|m| matches!(m, CoordinatorMsg::Lease { .. }))
                .count()
        })
    }

    /// Sends `conn`'s result for its held lease: honest, or transformed by `lie`.
    fn submit(&mut self, conn: ConnId, lie: impl Fn(&mut [f32])) -> Held {
        let h = self.held(conn).expect("holds a lease");
        let (loss, correct, mut grad) = honest(h.job, h.step, h.micro);
        lie(&mut grad);
        let fx = self.st.result(conn, h.lease, loss, correct, grad);
        self.take(fx);
        h
    }

    fn honest_result(&mut self, conn: ConnId) -> Held {
        self.submit(conn, |_| {})
    }

    fn verdicts(&self, conn: ConnId) -> Vec<Outcome> {
        self.inbox.get(&conn).map_or(Vec::new(), |v| {
            v.iter()
                .filter_map(|m| match m {
                    CoordinatorMsg::Verdict { outcome, .. } => Some(*outcome),
                    _ => None,
                })
                .collect()
        })
    }

    fn last_verdict(&self, conn: ConnId) -> Option<Outcome> {
        self.verdicts(conn).last().copied()
    }

    fn job(&self, id: u64) -> &JobRun {
        self.st.job(JobId(id)).expect("job")
    }

    /// Answers the oldest pending recomputation with the honest result, or `reference` if given.
    fn recompute_honestly(&mut self) {
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

fn flip(g: &mut [f32]) {
    g.iter_mut().for_each(|v| *v = -*v);
}

/// A relative-L2 distance of ~0.01 (inside the near-miss band, outside the 1e-3 tolerance).
fn nudge(g: &mut [f32]) {
    g[0] *= 1.1;
}

#[test]
fn two_agreeing_replicas_are_accepted_credited_and_durable_first() {
    let mut h = Harness::new();
    h.load(1, hyper(), Vec::new());
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    let (la, lb) = (h.held(a).expect("a leased"), h.held(b).expect("b leased"));
    // Both got a model frame before their first lease.
    assert!(matches!(h.inbox[&a][0], CoordinatorMsg::Model { .. }));
    // Different micro-batches first (least replicated wins); give b the same one by having a third worker...
    assert_ne!(la.micro, lb.micro);
    h.honest_result(a);
    assert_eq!(h.last_verdict(a), None, "one replica is not a quorum");
    h.ready(a);
    let la2 = h.held(a).expect("a leased again");
    assert_ne!(
        la2.micro, la.micro,
        "never two replicas of one micro-batch to one worker"
    );
    // Find the worker whose lease is the other replica of la's micro-batch and let everyone finish the step.
    let mut conns = vec![a, b];
    for w in 3..=4 {
        let c = h.connect(w);
        h.ready(c);
        conns.push(c);
    }
    for _ in 0..20 {
        for &c in &conns {
            if h.held(c).is_some_and(|l| l.step == 0) && h.st.leases.values().any(|l| l.conn == c) {
                h.honest_result(c);
                h.ready(c);
            }
        }
    }
    assert!(h.job(1).step >= 1, "step 0 applied");
    let accepted = h.job(1).counters.micro_batches_accepted;
    assert!(accepted >= 4);
    // Every accepted micro-batch was written with two credits, before any verdict (the op precedes the sends).
    for op in &h.ops {
        if let StoreOp::Accepted { credits, row, .. } = op {
            assert_eq!(credits.len(), 2);
            assert_eq!(row.agreeing, 2);
        }
    }
    assert!(h.verdicts(a).iter().all(|v| *v == Outcome::Accepted));
}

#[test]
fn a_disagreement_is_settled_by_the_coordinator_not_by_vote() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (honest_c, liar) = (h.connect(1), h.connect(2));
    h.ready(honest_c);
    h.ready(liar);
    assert_eq!(
        h.held(honest_c).map(|l| l.micro),
        h.held(liar).map(|l| l.micro)
    );
    h.honest_result(honest_c);
    h.submit(liar, flip);
    assert_eq!(
        h.recomputes.len(),
        1,
        "the coordinator recomputes the micro-batch"
    );
    assert_eq!(h.recomputes[0].kind, CheckKind::Arbitrate);
    assert_eq!(h.job(1).counters.arbitrations, 1);
    h.recompute_honestly();
    assert_eq!(h.last_verdict(honest_c), Some(Outcome::Accepted));
    assert_eq!(h.last_verdict(liar), Some(Outcome::Rejected));
    assert_eq!(h.st.worker(WorkerId(2)).map(|w| w.strikes), Some(1));
    assert_eq!(h.st.worker(WorkerId(1)).map(|w| w.strikes), Some(0));
    assert_eq!(h.job(1).step, 1, "the one-micro-batch step advanced");
    // agreeing counts the coordinator's recomputation.
    assert!(
        h.ops
            .iter()
            .any(|o| matches!(o, StoreOp::Accepted { row, .. } if row.agreeing == 2))
    );
}

#[test]
fn near_misses_are_late_never_used_and_three_in_a_row_are_a_strike() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (good, close) = (h.connect(1), h.connect(2));
    for round in 0..3u64 {
        h.ready(good);
        h.ready(close);
        h.honest_result(good);
        h.submit(close, nudge);
        // Honest vs nudged disagree at 1e-3: arbitration; the honest one agrees with the reference.
        h.recompute_honestly();
        assert_eq!(h.job(1).step, round + 1);
        assert_eq!(h.last_verdict(good), Some(Outcome::Accepted));
        let expected = if round < 2 {
            Outcome::Late
        } else {
            Outcome::Rejected
        };
        assert_eq!(h.last_verdict(close), Some(expected), "round {round}");
    }
    assert_eq!(h.job(1).counters.near_misses, 3);
    assert_eq!(h.st.worker(WorkerId(2)).map(|w| w.strikes), Some(1));
    // The accepted gradients are the honest one, never the near miss.
    for op in &h.ops {
        if let StoreOp::Accepted { row, step, job, .. } = op {
            assert_eq!(row.grad, honest(*job, *step, row.micro).2);
        }
    }
}

#[test]
fn only_near_misses_make_the_coordinators_result_the_micro_batchs() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    h.submit(a, nudge);
    h.submit(b, |g| g[1] *= 0.9);
    h.recompute_honestly();
    assert_eq!(h.last_verdict(a), Some(Outcome::Late));
    assert_eq!(h.last_verdict(b), Some(Outcome::Late));
    assert_eq!(h.job(1).counters.micro_batches_by_coordinator, 1);
    assert_eq!(h.job(1).step, 1);
    assert!(
        h.ops
            .iter()
            .any(|o| matches!(o, StoreOp::Accepted { credits, .. } if credits.is_empty()))
    );
}

#[test]
fn an_expired_lease_is_reassigned_and_its_late_result_is_late() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (slow, a, b) = (h.connect(1), h.connect(2), h.connect(3));
    h.ready(slow);
    h.ready(a);
    let first = h.held(slow).expect("leased");
    h.ready(b);
    assert!(h.held(b).is_none(), "both replicas are out");
    h.advance(Duration::from_secs(11));
    let fx = h.st.tick();
    h.take(fx);
    assert_eq!(h.job(1).counters.leases_expired, 2);
    // Both replicas expired; b (idle longest? no: slow and a hold nothing now but did not ask) gets one.
    assert_eq!(h.held(b).map(|l| l.micro), Some(first.micro));
    let fx =
        h.st.result(slow, first.lease, 1.0, 2, honest(JobId(1), 0, 0).2);
    h.take(fx);
    assert_eq!(h.last_verdict(slow), Some(Outcome::Late));
    assert_eq!(h.st.worker(WorkerId(1)).map(|w| w.strikes), Some(0));
}

#[test]
fn a_disconnect_releases_its_lease_to_a_waiting_worker() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (gone, a, b) = (h.connect(1), h.connect(2), h.connect(3));
    h.ready(gone);
    h.ready(a);
    h.ready(b);
    assert!(h.held(b).is_none());
    assert!(
        h.inbox[&b]
            .iter()
            .any(|m| matches!(m, CoordinatorMsg::Waiting { reason } if reason.contains("in line"))),
        "an idle worker is told why"
    );
    let fx = h.st.disconnect(gone);
    h.take(fx);
    assert!(
        h.held(b).is_some(),
        "the waiting worker got the released replica"
    );
    assert!(h.st.leases.values().all(|l| l.conn != gone));
}

#[test]
fn a_straggler_gets_a_speculative_replica_and_the_extra_agreeing_result_is_credited() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (fast, slow, spare) = (h.connect(1), h.connect(2), h.connect(3));
    h.ready(fast);
    h.ready(slow);
    h.honest_result(fast);
    h.ready(spare);
    assert!(
        h.held(spare).is_none(),
        "no speculation before speculate_after"
    );
    h.advance(Duration::from_secs(3));
    let fx = h.st.tick();
    h.take(fx);
    assert!(
        h.held(spare).is_some(),
        "speculative replica of the straggler"
    );
    assert_eq!(h.job(1).counters.speculative_leases, 1);
    h.honest_result(spare);
    assert_eq!(
        h.job(1).step,
        1,
        "the speculative replica completed the quorum"
    );
    // The straggler's own (late, honest) result still agrees with the accepted one: credited, no strike.
    let fx = {
        let l = h.held(slow).expect("slow held");
        h.st.result(slow, l.lease, 1.0, 2, honest(JobId(1), 0, 0).2)
    };
    h.take(fx);
    assert_eq!(
        h.last_verdict(slow),
        Some(Outcome::Late),
        "superseded step: late"
    );
}

#[test]
fn an_extra_replica_of_an_accepted_micro_batch_is_compared_with_it() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 8,
            redundancy: 3,
            ..hyper()
        },
        Vec::new(),
    );
    let conns: Vec<ConnId> = (1..=3).map(|w| h.connect(w)).collect();
    for &c in &conns {
        h.ready(c);
    }
    // Micro-batches spread least-replicated first: with 3 workers and 2 micro-batches, one micro-batch has two.
    let micro = h.held(conns[0]).expect("leased").micro;
    let same: Vec<ConnId> = conns
        .iter()
        .copied()
        .filter(|c| h.held(*c).map(|l| l.micro) == Some(micro))
        .collect();
    if same.len() >= 2 {
        h.honest_result(same[0]);
        h.honest_result(same[1]);
        assert_eq!(
            h.last_verdict(same[0]),
            Some(Outcome::Accepted),
            "2 of R=3 is a quorum"
        );
    }
    assert!(h.job(1).counters.micro_batches_accepted <= 1);
}

#[test]
fn a_trusted_worker_is_spot_checked_instead_of_replicated() {
    let mut h = Harness::with(|c| c.trust_threshold = 2);
    h.load(
        1,
        Hyper {
            global_batch: 4,
            adaptive: true,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    // Earn trust: two agreed results each.
    for _ in 0..2 {
        h.ready(a);
        h.ready(b);
        h.honest_result(a);
        h.honest_result(b);
    }
    assert_eq!(h.st.trust_record(a, WorkerId(1)), 2);
    // With record 2, p(replicate) = max(0.05, 1/2): within 40 steps some micro-batch goes solo.
    let mut solo = false;
    for _ in 0..40 {
        h.ready(a);
        h.ready(b);
        let (ha, hb) = (h.held(a), h.held(b));
        if hb.is_none_or(|l| Some(l.lease) == ha.map(|x| x.lease) || l.step != h.job(1).step)
            || h.st.leases.values().filter(|l| l.job == JobId(1)).count() == 1
        {
            solo = true;
            h.honest_result(a);
            assert_eq!(h.recomputes.last().map(|r| r.kind), Some(CheckKind::Spot));
            h.recompute_honestly();
            assert_eq!(h.last_verdict(a), Some(Outcome::Accepted));
            assert!(h.ops.iter().any(|o| matches!(o, StoreOp::Accepted { row, credits, .. } if row.agreeing == 2 && credits.len() == 1)));
            break;
        }
        h.honest_result(a);
        h.honest_result(b);
    }
    assert!(solo, "a trusted worker got an unreplicated lease");
    assert!(h.job(1).counters.spot_checks >= 1);
}

#[test]
fn a_spot_check_that_fails_strikes_and_goes_back_to_replication() {
    let mut h = Harness::with(|c| c.trust_threshold = 1);
    h.load(
        1,
        Hyper {
            global_batch: 4,
            adaptive: true,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    h.honest_result(a);
    h.honest_result(b);
    // Record 1: p(replicate) = max(0.05, 1) = 1, never solo. Raise the record to make solo likely.
    for _ in 0..30 {
        h.ready(a);
        h.ready(b);
        if h.st.leases.values().filter(|l| l.job == JobId(1)).count() == 1 {
            let holder = if h.st.leases.values().any(|l| l.conn == a) {
                a
            } else {
                b
            };
            h.submit(holder, flip);
            h.recompute_honestly();
            assert_eq!(h.last_verdict(holder), Some(Outcome::Rejected));
            assert_eq!(h.job(1).counters.spot_check_failures, 1);
            let m = &h.job(1).micros[0];
            assert_eq!(m.wanted(), Some(2), "back to R-fold replication");
            return;
        }
        h.honest_result(a);
        h.honest_result(b);
    }
    panic!("no solo lease in 30 steps");
}

#[test]
fn a_restart_reuses_accepted_results_of_the_step_in_progress() {
    let mut h = Harness::new();
    let (loss, correct, grad) = honest(JobId(1), 0, 2);
    h.load(
        1,
        hyper(),
        vec![AcceptedRow {
            micro: 2,
            rows: 4,
            loss,
            correct,
            agreeing: 2,
            grad,
        }],
    );
    let conns: Vec<ConnId> = (1..=8).map(|w| h.connect(w)).collect();
    for &c in &conns {
        h.ready(c);
    }
    let micros: BTreeSet<u32> = conns
        .iter()
        .filter_map(|c| h.held(*c))
        .map(|l| l.micro)
        .collect();
    assert_eq!(
        micros,
        BTreeSet::from([0, 1, 3]),
        "micro-batch 2 is not leased again"
    );
    let leased = conns.iter().filter(|c| h.held(**c).is_some()).count();
    assert_eq!(leased, 6);
}

#[test]
fn a_refused_worker_gets_its_verdict_then_the_close_and_no_more_work() {
    let mut h = Harness::with(|c| c.strike_limit = 1);
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (good, bad) = (h.connect(1), h.connect(2));
    h.ready(good);
    h.ready(bad);
    h.honest_result(good);
    h.submit(bad, |g| g[3] = f32::NAN);
    assert_eq!(
        h.last_verdict(bad),
        Some(Outcome::Rejected),
        "the refusing result still gets its verdict"
    );
    assert_eq!(h.closed.get(&bad), Some(&ErrorCode::Refused));
    assert!(h.st.worker(WorkerId(2)).is_some_and(|w| w.refused));
    // The rejection is durable before the verdict: the op exists.
    assert!(h.ops.iter().any(
        |o| matches!(o, StoreOp::Rejection { worker, refused: true } if *worker == WorkerId(2))
    ));
    let before = h.leases_sent(bad);
    h.ready(bad);
    assert_eq!(h.leases_sent(bad), before, "a refused worker gets no lease");
    // A new connection of the refused worker is not admitted.
    let (tx, _rx) = unbounded_channel();
    let again = h.st.admit(
        WorkerId(2),
        None,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        None,
        Backend::Cpu,
        "x".into(),
        Platform::Native,
        tx,
    );
    assert!(again.is_none());
}

#[test]
fn pause_resume_and_cancel_control_leasing() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    let fx = h.st.set_status(JobId(1), JobStatus::Paused).expect("pause");
    h.take(fx);
    h.ready(a);
    assert!(h.held(a).is_none(), "paused: no leases");
    let fx =
        h.st.set_status(JobId(1), JobStatus::Running)
            .expect("resume");
    h.take(fx);
    assert!(h.held(a).is_some(), "resume serves the waiting worker");
    let fx =
        h.st.set_status(JobId(1), JobStatus::Cancelled)
            .expect("cancel");
    h.take(fx);
    assert!(h.st.leases.is_empty(), "cancel drops outstanding leases");
    h.honest_result(a);
    assert_eq!(h.last_verdict(a), Some(Outcome::Late));
    assert!(
        h.st.set_status(JobId(1), JobStatus::Running).is_err(),
        "cancelled is terminal"
    );
    h.ready(b);
    assert!(h.held(b).is_none());
}

#[test]
fn without_recomputation_a_disagreement_leases_tie_breakers_and_then_abandons() {
    let mut h = Harness::with(|c| c.spot_check_max_params = 1);
    h.load(
        1,
        Hyper {
            global_batch: 8,
            ..hyper()
        },
        Vec::new(),
    );
    let conns: Vec<ConnId> = (1..=7).map(|w| h.connect(w)).collect();
    // Everyone lies differently on micro-batch 0 so there is never a quorum on it.
    let mut rounds = 0;
    while h.job(1).counters.micro_batches_abandoned == 0 && rounds < 20 {
        rounds += 1;
        for (i, &c) in conns.iter().enumerate() {
            h.ready(c);
            if let Some(l) = h.held(c)
                && h.st.leases.values().any(|x| x.conn == c)
            {
                if l.micro == 0 {
                    h.submit(c, |g| g[0] += 100.0 * (i + 1) as f32);
                } else {
                    h.honest_result(c);
                }
            }
        }
    }
    assert_eq!(h.job(1).counters.micro_batches_abandoned, 1);
    assert!(
        h.recomputes.is_empty(),
        "the model is too large to recompute"
    );
    assert_eq!(
        h.job(1).step,
        1,
        "the step went on without the abandoned micro-batch"
    );
}

#[test]
fn invalid_results_are_rejected_before_any_comparison() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let a = h.connect(1);
    h.ready(a);
    let l = h.held(a).expect("leased");
    let fx = h.st.result(a, l.lease, 1.0, 2, vec![0.0; 3]);
    h.take(fx);
    assert_eq!(h.last_verdict(a), Some(Outcome::Rejected));
    assert_eq!(h.job(1).counters.results_rejected, 1);
    // A result for a lease it does not hold is late, not a strike.
    let fx = h.st.result(a, LeaseId(999), 1.0, 2, vec![0.0; PARAMS]);
    h.take(fx);
    assert_eq!(h.last_verdict(a), Some(Outcome::Late));
    assert_eq!(h.st.worker(WorkerId(1)).map(|w| w.strikes), Some(1));
}

/// Runs `workers` honest workers over `results` results, always answering the oldest lease first, and returns
/// how many accepted verdicts each connection got.
fn run_swarm(h: &mut Harness, workers: u64, results: usize) -> Vec<usize> {
    let conns: Vec<ConnId> = (1..=workers).map(|w| h.connect(w)).collect();
    for &c in &conns {
        h.ready(c);
    }
    let mut done = 0;
    while done < results {
        let oldest =
            h.st.leases
                .iter()
                .min_by_key(|(id, _)| id.0)
                .map(|(_, l)| l.conn);
        let Some(c) = oldest else { break };
        h.honest_result(c);
        h.ready(c);
        done += 1;
    }
    conns
        .iter()
        .map(|c| {
            h.verdicts(*c)
                .iter()
                .filter(|v| **v == Outcome::Accepted)
                .count()
        })
        .collect()
}

#[test]
fn sixteen_workers_on_eight_leases_per_step_all_get_work() {
    let mut h = Harness::new();
    // 32-row steps of 4 micro-batches × R 2 = 8 leases per step for 16 workers.
    h.load(
        1,
        Hyper {
            global_batch: 16,
            ..hyper()
        },
        Vec::new(),
    );
    let accepted = run_swarm(&mut h, 16, 1_600);
    let mean = accepted.iter().sum::<usize>() as f64 / accepted.len() as f64;
    let least = *accepted.iter().min().expect("workers") as f64;
    assert!(least > 0.0, "every worker got results: {accepted:?}");
    assert!(
        least >= mean / 2.0,
        "least-served {least} vs mean {mean}: {accepted:?}"
    );
}

#[test]
fn lease_shares_between_jobs_follow_their_weights() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            weight: 1.0,
            ..hyper()
        },
        Vec::new(),
    );
    h.load(
        2,
        Hyper {
            weight: 3.0,
            ..hyper()
        },
        Vec::new(),
    );
    run_swarm(&mut h, 4, 2_000);
    let (a, b) = (
        h.job(1).counters.leases_issued as f64,
        h.job(2).counters.leases_issued as f64,
    );
    let ratio = b / a;
    assert!(
        (2.4..=3.6).contains(&ratio),
        "lease shares {a}:{b} (ratio {ratio:.2}), want 1:3 ± 20%"
    );
}

#[test]
fn a_failed_write_withholds_what_reports_on_it_and_the_job_recovers_from_the_store() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b, c) = (h.connect(1), h.connect(2), h.connect(3));
    h.ready(a);
    h.ready(b);
    h.honest_result(a);
    let l = h.held(b).expect("b leased");
    let fx =
        h.st.result(b, l.lease, 1.0, 2, honest(JobId(1), 0, l.micro).2);
    // The quorum's write (op 0) fails: nothing after it may go out.
    assert!(matches!(fx.store[0], StoreOp::Accepted { .. }));
    let Effects { store, later } = fx;
    let (go, withheld) = Effects::split(later, 0);
    assert!(
        go.iter().all(|a| !matches!(a, Action::Send { out, .. } if matches!(decode(out), Some(CoordinatorMsg::Verdict { .. })))),
        "no verdict for the unwritten acceptance"
    );
    assert!(
        withheld
            .iter()
            .any(|d| matches!(&d.action, Action::Send { conn, .. } if *conn == a))
    );
    let jobs: BTreeSet<JobId> = store.iter().filter_map(StoreOp::job).collect();
    h.st.halt(&jobs, &withheld, "disk full");
    assert_eq!(h.job(1).status, JobStatus::Paused);
    assert_eq!(h.job(1).error.as_deref(), Some("disk full"));
    // Back to the durable state (nothing of step 0 was written): the micro-batch is open again.
    h.st.reload_job(JobLoad {
        id: JobId(1),
        owner: Some(1),
        owner_name: None,
        name: "job1".into(),
        spec: spec(),
        hyper: Hyper {
            global_batch: 4,
            ..hyper()
        },
        status: JobStatus::Running,
        created_ms: 0,
        train: dataset(64),
        test: dataset(8),
        checkpoint: None,
        accepted: Vec::new(),
    });
    assert_eq!(h.job(1).step, 0);
    assert_eq!(
        h.job(1).status,
        JobStatus::Paused,
        "stays paused until the owner resumes"
    );
    h.ready(c);
    assert!(h.held(c).is_none());
    let fx =
        h.st.set_status(JobId(1), JobStatus::Running)
            .expect("resume");
    h.take(fx);
    assert!(h.job(1).error.is_none());
    assert!(h.held(c).is_some(), "leasing again after resume");
}

#[test]
fn effects_withhold_exactly_the_actions_after_the_failed_write() {
    let mut fx = Effects::default();
    fx.send_msg(1, None, &CoordinatorMsg::Waiting { reason: "a".into() });
    fx.persist(StoreOp::Rejection {
        worker: WorkerId(1),
        refused: false,
    });
    fx.send_msg(
        2,
        Some(JobId(1)),
        &CoordinatorMsg::Waiting { reason: "b".into() },
    );
    fx.notify(JobId(1));
    let Effects { later, .. } = fx;
    let (go, withheld) = Effects::split(later, 0);
    assert_eq!(go.len(), 1);
    assert_eq!(withheld.len(), 2);
    let mut fx = Effects::default();
    fx.persist(StoreOp::Rejection {
        worker: WorkerId(1),
        refused: false,
    });
    fx.notify(JobId(1));
    let (go, withheld) = Effects::split(fx.later, 1);
    assert_eq!((go.len(), withheld.len()), (1, 0));
}

#[test]
fn replicas_avoid_sharing_an_address_when_they_can() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 8,
            ..hyper()
        },
        Vec::new(),
    );
    let same = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
    let (a, b) = (h.connect_from(1, same), h.connect_from(2, same));
    h.ready(a);
    h.ready(b);
    let c = h.connect(3);
    h.ready(c);
    let d = h.connect(4);
    h.ready(d);
    let (ma, mb) = (h.held(a).expect("a").micro, h.held(b).expect("b").micro);
    assert_ne!(ma, mb, "workers on one address get different micro-batches");
}
