//! Leases: expiry, disconnects, speculation, restarts, owner control, fair shares, address spreading, and
//! what a failed durable write withholds.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use starling_core::protocol::{CoordinatorMsg, JobId, Outcome, WorkerId};

use super::*;
use crate::job::{Hyper, JobStatus};
use crate::store::AcceptedRow;

#[test]
fn an_expired_lease_is_reassigned_and_its_late_result_is_late() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
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
    h.load(1, one_micro(), Vec::new());
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
    h.load(1, one_micro(), Vec::new());
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
fn pause_resume_and_cancel_control_leasing() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
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
    h.load(1, one_micro(), Vec::new());
    let (a, b, c) = (h.connect(1), h.connect(2), h.connect(3));
    h.ready(a);
    h.ready(b);
    h.honest_result(a);
    let l = h.held(b).expect("b leased");
    let fx =
        h.st.result(b, l.lease, 1.0, 2, honest(JobId(1), 0, l.micro).2);
    // The quorum's write (op 0) fails: nothing after it may go out.
    assert!(matches!(fx.store[0], StoreOp::Accepted { .. }));
    let Effects { store, later, .. } = fx;
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
    h.st.halt(&jobs, &withheld, Some("disk full"));
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
        train: dataset(64).into(),
        test: dataset(8).into(),
        checkpoint: None,
        accepted: Vec::new(),
        dataset_frame: None,
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

#[test]
fn a_restart_after_every_micro_batch_was_accepted_applies_that_step() {
    let mut h = Harness::new();
    // A crash after the step's last accepted micro-batch, before its checkpoint: all four are in the store.
    let accepted = (0..4)
        .map(|micro| {
            let (loss, correct, grad) = honest(JobId(1), 0, micro);
            AcceptedRow {
                micro,
                rows: 4,
                loss,
                correct,
                agreeing: 2,
                grad,
            }
        })
        .collect();
    h.load(1, hyper(), accepted);
    assert_eq!(h.job(1).step, 1, "the step is applied on load");
    let fx = h.st.tick();
    assert!(
        fx.store
            .iter()
            .any(|o| matches!(o, StoreOp::Checkpoint { ckpt, .. } if ckpt.step == 1)),
        "and its checkpoint is written with the next tick"
    );
    h.take(fx);
    let a = h.connect(1);
    h.ready(a);
    assert_eq!(h.held(a).map(|l| l.step), Some(1));
}

#[test]
fn effects_computed_before_a_halt_are_stale_for_the_halted_job_only() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    h.load(2, one_micro(), Vec::new());
    h.honest_result(a);
    // b's result completes a quorum: its acceptance is computed now, written later (queued behind a failing write).
    let l = h.held(b).expect("b leased");
    let queued = h.st.result(b, l.lease, 1.0, 2, honest(l.job, 0, l.micro).2);
    assert!(
        queued
            .store
            .iter()
            .any(|o| matches!(o, StoreOp::Accepted { .. }))
    );
    let before = h.st.effects().epoch;
    h.st.halt(&BTreeSet::from([l.job]), &[], Some("disk full"));
    assert!(
        h.st.stale(l.job, queued.epoch),
        "the queued acceptance describes a rolled-back state"
    );
    let other = if l.job == JobId(1) {
        JobId(2)
    } else {
        JobId(1)
    };
    assert!(
        !h.st.stale(other, queued.epoch),
        "another job's effects stay valid"
    );
    assert!(
        !h.st.stale(l.job, h.st.effects().epoch),
        "effects computed after the halt are not stale"
    );
    assert!(h.st.effects().epoch > before);
}
