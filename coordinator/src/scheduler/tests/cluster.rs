//! Leadership moving between nodes as the scheduler sees it: a job unloaded because another node took it over
//! (`cluster.rs` calls `unload_job`), and loaded again when this node takes it back; and a lease lost to a dropped
//! connection (a failover, a silence) going back to its worker.

use std::time::Duration;

use starling_core::protocol::{JobId, Outcome, WorkerId};

use super::*;

#[test]
fn unloading_a_job_drops_its_leases_and_leaves_the_other_jobs_running() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
    h.load(2, one_micro(), Vec::new());
    let conns: Vec<ConnId> = (1..=3).map(|w| h.connect(w)).collect();
    for &c in &conns {
        h.ready(c);
    }
    let on = |h: &Harness, job: u64| -> Vec<ConnId> {
        conns
            .iter()
            .copied()
            .filter(|&c| h.held(c).is_some_and(|l| l.job == JobId(job)))
            .collect()
    };
    let (on1, on2) = (on(&h, 1), on(&h, 2));
    assert!(
        !on1.is_empty() && !on2.is_empty(),
        "both jobs leased: {on1:?} {on2:?}"
    );
    let ops_before = h.ops.len();

    h.st.unload_job(JobId(1));
    assert!(
        h.st.job(JobId(1)).is_none(),
        "the job is gone from this node"
    );
    assert!(
        h.st.leases.values().all(|l| l.job != JobId(1)),
        "no lease of the unloaded job is outstanding"
    );
    assert!(
        h.st.leases.values().any(|l| l.job == JobId(2)),
        "job 2 keeps its leases"
    );
    // Results for the unloaded job's leases are late: no strike, nothing written (the new leader owns the job).
    for &c in &on1 {
        h.honest_result(c);
        assert_eq!(h.last_verdict(c), Some(Outcome::Late));
    }
    assert_eq!(
        h.ops.len(),
        ops_before,
        "nothing written for the unloaded job"
    );
    assert!(
        (1..=3).all(|w| h.st.worker(WorkerId(w)).map(|x| x.strikes) == Some(0)),
        "late is no strike"
    );
    // The freed workers get job 2's remaining replica; job 2's step settles and is written as before.
    for &c in &on1 {
        h.ready(c);
    }
    let now2 = on(&h, 2);
    assert_eq!(now2.len(), 2, "job 2 has both replicas out: {now2:?}");
    for &c in &now2 {
        h.honest_result(c);
    }
    assert!(
        h.ops
            .iter()
            .any(|op| matches!(op, StoreOp::Accepted { job, .. } if *job == JobId(2))),
        "job 2's micro-batch was accepted"
    );
    assert!(
        !h.ops
            .iter()
            .any(|op| matches!(op, StoreOp::Accepted { job, .. } if *job == JobId(1))),
        "nothing accepted for job 1 after it was unloaded"
    );
    // Unloading a job this node does not have changes nothing.
    let leases = h.st.leases.len();
    h.st.unload_job(JobId(9));
    assert_eq!(h.st.leases.len(), leases);

    // The node takes job 1 back (from the store): it is leased again from its durable step.
    h.load(1, one_micro(), Vec::new());
    let fx = h.st.tick();
    h.take(fx);
    for &c in &conns {
        h.ready(c);
    }
    assert!(
        conns
            .iter()
            .any(|&c| h.held(c).is_some_and(|l| l.job == JobId(1) && l.step == 0)),
        "job 1 is served again after it is loaded back"
    );
}

/// The flake of the single-node reference run (two workers, R = 2): a worker that lost its connection mid-lease and
/// reconnected was never leased that micro-batch again, nor was anyone else (both workers were "involved"), so the
/// step waited forever. A lost lease (disconnect or expiry) now lets its worker take the micro-batch again.
#[test]
fn a_lease_lost_by_one_of_exactly_r_workers_goes_back_to_it_on_reconnect() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    let lost = h.held(a).expect("a leased");
    assert!(h.held(b).is_some(), "both replicas out");
    h.honest_result(b);
    // a's connection drops (a silence, a node restart) and it comes back as the same worker.
    let fx = h.st.disconnect(a);
    h.take(fx);
    let a2 = h.connect(1);
    h.ready(a2);
    let again = h
        .held(a2)
        .expect("the reconnected worker gets the micro-batch again");
    assert_eq!((again.step, again.micro), (lost.step, lost.micro));
    assert_ne!(again.lease, lost.lease, "a fresh lease");
    h.honest_result(a2);
    assert_eq!(h.last_verdict(a2), Some(Outcome::Accepted));
    assert_eq!(h.job(1).step, 1, "the step was applied");

    // The same after an expiry: a's lease passes its deadline; a asks again and gets it back.
    let (a3, b3) = (a2, b);
    h.ready(a3);
    h.ready(b3);
    let expired = h.held(a3).expect("leased");
    h.honest_result(b3);
    h.advance(Duration::from_secs(11));
    let fx = h.st.tick();
    h.take(fx);
    // The late result of the expired lease does not count, the fresh lease's does.
    let fx = h.st.result(
        a3,
        expired.lease,
        1.0,
        2,
        honest(JobId(1), expired.step, expired.micro).2,
    );
    h.take(fx);
    assert_eq!(h.last_verdict(a3), Some(Outcome::Late));
    h.ready(a3);
    let fresh = h.held(a3).expect("leased again after the expiry");
    assert_eq!((fresh.step, fresh.micro), (expired.step, expired.micro));
    h.honest_result(a3);
    assert_eq!(h.last_verdict(a3), Some(Outcome::Accepted));
    assert_eq!(h.job(1).step, 2);
}
