//! Audited mode (`hyper.verification = "audited"`) and placement: trusted workers' results used alone, audits
//! leased to another trusted worker on another subnet (or run by the coordinator when none is online), failed
//! audits settled by recomputation before anyone is struck, and new workers at R = 3 with a trusted one.

use super::*;
use crate::job::Verification;

/// One micro-batch per step (or `micros`), audited mode, every accepted unit audited.
fn audited_hyper(micros: u32, audit: f32) -> Hyper {
    Hyper {
        global_batch: 4 * micros,
        verification: Verification::Audited,
        audit,
        ..hyper()
    }
}

/// Gives worker `w` a record (on the CPU backend the harness connects with).
fn trust(h: &mut Harness, w: u64) {
    h.st.trust.insert((WorkerId(w), Backend::Cpu), 100);
}

fn from(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// Trusted workers `ws`, each connected from its own /24, in a job of `micros` units audited at `audit`.
fn trusted(ws: &[u64], micros: u32, audit: f32) -> (Harness, Vec<ConnId>) {
    let mut h = Harness::new();
    h.load(1, audited_hyper(micros, audit), Vec::new());
    let conns = ws
        .iter()
        .map(|&w| {
            trust(&mut h, w);
            h.connect(w)
        })
        .collect();
    (h, conns)
}

#[test]
fn a_trusted_result_is_used_alone_and_audited_by_another_trusted_worker_before_its_step() {
    let (mut h, c) = trusted(&[1, 2], 1, 1.0);
    h.ready(c[0]);
    h.ready(c[1]);
    assert_eq!(
        h.leases_sent(c[1]),
        0,
        "a trusted worker's unit is not replicated"
    );
    h.honest_result(c[0]);
    assert_eq!(h.last_verdict(c[0]), Some(Outcome::Accepted));
    assert_eq!(h.job(1).step, 0, "the step waits for the unit's audit");
    // The auditor gets an ordinary lease of the same unit and version: it cannot tell it is an audit.
    let audit = h.held(c[1]).expect("audit lease");
    assert_eq!((audit.step, audit.micro), (0, 0));
    assert_eq!(h.job(1).counters.audit_leases, 1);
    h.honest_result(c[1]);
    assert_eq!(h.last_verdict(c[1]), Some(Outcome::Accepted));
    let k = &h.job(1).counters;
    assert_eq!((k.audits, k.audits_passed, k.audit_failures), (1, 1, 0));
    assert!(
        h.recomputes.is_empty(),
        "the coordinator recomputed nothing"
    );
    assert_eq!(h.job(1).step, 1);
    // Budget: one unit useful, two computed, nothing recomputed.
    assert_eq!(
        (k.rows_accepted, k.rows_computed, k.rows_recomputed),
        (4, 8, 0)
    );
}

#[test]
fn without_an_audit_roll_a_trusted_result_reaches_the_model_alone() {
    let (mut h, c) = trusted(&[1, 2], 1, 1e-9);
    h.ready(c[0]);
    h.honest_result(c[0]);
    assert_eq!(h.job(1).step, 1);
    assert_eq!(h.job(1).counters.audits, 0);
    assert!(h.recomputes.is_empty());
}

#[test]
fn the_auditor_never_shares_a_subnet_with_the_units_worker() {
    let mut h = Harness::new();
    h.load(1, audited_hyper(1, 1.0), Vec::new());
    for w in 1..=3 {
        trust(&mut h, w);
    }
    let a = h.connect_from(1, from(10, 7, 7, 1));
    let same = h.connect_from(2, from(10, 7, 7, 2));
    let other = h.connect_from(3, from(10, 8, 7, 1));
    h.ready(a);
    h.honest_result(a);
    h.ready(same);
    assert_eq!(
        h.leases_sent(same),
        0,
        "a worker of the same /24 never audits it"
    );
    h.ready(other);
    assert_eq!(h.held(other).map(|l| l.micro), Some(0));
}

#[test]
fn with_no_auditor_online_the_coordinator_audits_and_the_step_waits_for_it() {
    let mut h = Harness::new();
    h.load(1, audited_hyper(1, 1.0), Vec::new());
    trust(&mut h, 1);
    trust(&mut h, 2);
    let a = h.connect_from(1, from(10, 7, 7, 1));
    // A trusted worker on the same /24 is no auditor.
    let b = h.connect_from(2, from(10, 7, 7, 2));
    h.ready(a);
    h.ready(b);
    h.honest_result(a);
    assert_eq!(h.recomputes.len(), 1);
    assert_eq!(h.recomputes[0].kind, CheckKind::Audit);
    assert_eq!(h.job(1).counters.audits_by_coordinator, 1);
    assert_eq!(h.job(1).step, 0);
    h.recompute_honestly();
    assert_eq!(h.job(1).step, 1);
    assert_eq!(h.job(1).counters.audits_passed, 1);
    assert!(!h.st.worker(WorkerId(1)).expect("a").refused);
}

#[test]
fn a_failed_audit_is_settled_by_recomputation_then_refuses_claws_back_and_keeps_the_lie_out() {
    let (mut h, c) = trusted(&[1, 2], 1, 1.0);
    h.ready(c[0]);
    h.ready(c[1]);
    h.submit(c[0], flip);
    assert_eq!(h.last_verdict(c[0]), Some(Outcome::Accepted));
    let granted = h.st.worker(WorkerId(1)).expect("a").credits_flops;
    // The honest auditor disagrees: no vote — the coordinator recomputes before anyone is struck.
    h.honest_result(c[1]);
    assert!(h.closed.is_empty(), "nobody is struck on an auditor's word");
    assert_eq!(h.job(1).counters.audit_disputes, 1);
    assert_eq!(h.recomputes.len(), 1);
    h.recompute_honestly();
    let job = h.job(1);
    assert_eq!(job.counters.audit_failures, 1);
    assert_eq!(job.last_bad_step, Some(0));
    assert_eq!(h.closed.get(&c[0]), Some(&ErrorCode::Refused));
    assert_eq!(
        h.last_verdict(c[1]),
        Some(Outcome::Accepted),
        "the auditor is credited"
    );
    let a = h.st.worker(WorkerId(1)).expect("a");
    assert!(a.refused);
    assert_eq!(a.credits_flops, 0);
    assert!(h.ops.iter().any(|o| matches!(o,
        StoreOp::Clawback { micro: 0, credit, .. } if credit.worker == WorkerId(1) && credit.flops == granted)));
    // The step applied the coordinator's result in place of the lie.
    assert_eq!(job.step, 1);
    assert_eq!(job.counters.micro_batches_by_coordinator, 1);
}

#[test]
fn a_lying_auditor_is_struck_after_the_recomputation_and_the_honest_result_stands() {
    let (mut h, c) = trusted(&[1, 2], 1, 1.0);
    h.ready(c[0]);
    h.ready(c[1]);
    h.honest_result(c[0]);
    h.submit(c[1], flip);
    h.recompute_honestly();
    assert_eq!(h.last_verdict(c[1]), Some(Outcome::Rejected));
    assert_eq!(h.st.worker(WorkerId(2)).expect("b").strikes, 1);
    let a = h.st.worker(WorkerId(1)).expect("a");
    assert!(!a.refused && a.credits_flops > 0);
    assert_eq!(h.job(1).counters.audits_passed, 1);
    assert_eq!(h.job(1).step, 1);
}

#[test]
fn a_refused_workers_other_unapplied_results_are_struck_out_and_computed_afresh() {
    let (mut h, c) = trusted(&[1, 2, 3], 3, 1.0);
    let (a, b, x) = (c[0], c[1], c[2]);
    h.ready(a);
    h.ready(b);
    let first = h.submit(a, flip).micro;
    h.ready(a);
    let second = h.submit(a, |_| {}).micro;
    assert_ne!(first, second);
    let theirs = h.honest_result(b).micro;
    // b and x audit a's two units (in some order), a audits b's.
    h.ready(a);
    h.ready(b);
    h.ready(x);
    let audit_of = |h: &Harness, conn| h.held(conn).expect("audit").micro;
    assert_eq!(audit_of(&h, a), theirs);
    let liar_auditor = if audit_of(&h, b) == first { b } else { x };
    let other_auditor = if liar_auditor == b { x } else { b };
    h.honest_result(liar_auditor);
    h.recompute_honestly();
    let job = h.job(1);
    assert_eq!(job.counters.audit_failures, 1);
    assert_eq!(job.counters.results_struck_out, 1);
    assert!(matches!(
        job.micros[second as usize].phase,
        micro::Phase::Open { .. }
    ));
    assert_eq!(job.step, 0, "the step waits for the struck-out unit");
    assert_eq!(
        h.ops
            .iter()
            .filter(
                |o| matches!(o, StoreOp::Clawback { credit, .. } if credit.worker == WorkerId(1))
            )
            .count(),
        2
    );
    // The refused worker's connection closes; the struck-out unit is computed afresh and the step goes on.
    let fx = h.st.disconnect(a);
    h.take(fx);
    let _ = other_auditor;
    let mut rounds = 0;
    while h.job(1).step == 0 && rounds < 10 {
        rounds += 1;
        for conn in [b, x] {
            if h.st.conns.get(&conn).is_some_and(|c| c.lease.is_some()) {
                h.honest_result(conn);
            }
            h.ready(conn);
        }
        while !h.recomputes.is_empty() {
            h.recompute_honestly();
        }
    }
    assert_eq!(h.job(1).step, 1);
}

#[test]
fn a_new_worker_gets_r3_with_a_trusted_worker_among_them() {
    let mut h = Harness::new();
    h.load(1, audited_hyper(1, 1e-9), Vec::new());
    trust(&mut h, 9);
    let t = h.connect(9);
    let n: Vec<ConnId> = (1..=3).map(|w| h.connect(w)).collect();
    for &c in &n {
        h.ready(c);
    }
    assert_eq!(h.leases_sent(n[0]) + h.leases_sent(n[1]), 2);
    assert_eq!(
        h.leases_sent(n[2]),
        0,
        "the last replica is kept for a trusted worker"
    );
    h.ready(t);
    assert_eq!(h.held(t).map(|l| l.micro), Some(0));
    for c in [n[0], n[1], t] {
        h.honest_result(c);
    }
    assert_eq!(h.job(1).step, 1);
    assert_eq!(h.job(1).counters.results_accepted, 3);
}

#[test]
fn replicas_never_share_a_subnet_under_the_subnet_rule() {
    let mut h = Harness::new();
    h.load(1, one_micro(), Vec::new());
    let a = h.connect_from(1, from(10, 7, 7, 1));
    let b = h.connect_from(2, from(10, 7, 7, 2));
    h.ready(a);
    h.ready(b);
    assert_eq!(h.leases_sent(b), 0, "one /24 never holds both replicas");
    let c = h.connect_from(3, from(10, 7, 8, 1));
    h.ready(c);
    assert_eq!(h.held(c).map(|l| l.micro), Some(0));
    // With placement off the same pair would have been paired.
    let mut off = Harness::with(|c| c.placement = Placement::Off);
    off.load(1, one_micro(), Vec::new());
    let a = off.connect_from(1, from(10, 7, 7, 1));
    let b = off.connect_from(2, from(10, 7, 7, 2));
    off.ready(a);
    off.ready(b);
    assert_eq!(off.leases_sent(b), 1);
}

#[test]
fn an_audit_no_auditor_takes_in_time_goes_to_the_coordinator() {
    let (mut h, c) = trusted(&[1, 2], 1, 1.0);
    h.ready(c[0]);
    h.honest_result(c[0]);
    // Worker 2 could audit but never asks for work: the step must not wait for it forever.
    assert!(h.recomputes.is_empty());
    h.advance(Duration::from_secs(3));
    let fx = h.st.tick();
    h.take(fx);
    assert_eq!(h.recomputes.len(), 1);
    assert_eq!(h.job(1).counters.audits_by_coordinator, 1);
    h.recompute_honestly();
    assert_eq!(h.job(1).step, 1);
}

#[test]
fn placement_prefers_partners_not_met_lately() {
    for seed in 0..8 {
        let mut h = Harness::with(|c| c.seed = Some(seed));
        h.load(
            1,
            Hyper {
                global_batch: 8,
                ..hyper()
            },
            Vec::new(),
        );
        let (a, b, c) = (h.connect(1), h.connect(2), h.connect(3));
        // Workers 1 and 3 were paired lately.
        h.st.met(WorkerId(1), &[WorkerId(3)]);
        h.ready(a);
        h.ready(b);
        h.ready(c);
        let (ma, mb, mc) = (
            h.held(a).expect("a").micro,
            h.held(b).expect("b").micro,
            h.held(c).expect("c").micro,
        );
        assert_ne!(ma, mb);
        assert_eq!(
            mc, mb,
            "seed {seed}: worker 3 joins the unit of the partner it has not met"
        );
    }
}
