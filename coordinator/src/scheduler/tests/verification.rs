//! Results to verdicts: quorum, arbitration by recomputation, near misses, spot checks, refusal, invalid results.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, Platform, WorkerId,
};
use tokio::sync::mpsc::unbounded_channel;

use super::*;
use crate::job::Hyper;

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
    h.load(1, one_micro(), Vec::new());
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
    h.load(1, one_micro(), Vec::new());
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
    h.load(1, one_micro(), Vec::new());
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
fn an_extra_replica_of_an_accepted_micro_batch_is_credited_if_it_agrees_and_rejected_if_not() {
    let mut h = Harness::new();
    // Two micro-batches per step; micro-batch 1 stays open so the step does not advance.
    h.load(
        1,
        Hyper {
            global_batch: 8,
            ..hyper()
        },
        Vec::new(),
    );
    let conns: Vec<ConnId> = (1..=4).map(|w| h.connect(w)).collect();
    for &c in &conns {
        h.ready(c);
    }
    let on = |h: &Harness, micro: u32| -> Vec<ConnId> {
        conns
            .iter()
            .copied()
            .filter(|c| h.held(*c).is_some_and(|l| l.micro == micro))
            .collect()
    };
    let (zero, one) = (on(&h, 0), on(&h, 1));
    assert_eq!(
        (zero.len(), one.len()),
        (2, 2),
        "least-replicated first spreads R = 2 over both"
    );
    // One replica of micro-batch 0 arrives; the other straggles, so a spare worker gets a speculative replica.
    h.honest_result(zero[0]);
    let (spare, liar) = (h.connect(5), h.connect(6));
    h.advance(Duration::from_secs(3));
    h.ready(spare);
    assert_eq!(
        h.held(spare).map(|l| l.micro),
        Some(0),
        "speculative replica"
    );
    h.honest_result(spare);
    assert_eq!(h.last_verdict(spare), Some(Outcome::Accepted));
    assert_eq!(h.job(1).step, 0, "micro-batch 1 is still open");
    // The straggler's honest result now meets an accepted micro-batch: compared with it and credited.
    h.honest_result(zero[1]);
    assert_eq!(h.last_verdict(zero[1]), Some(Outcome::Accepted));
    assert!(
        h.ops
            .iter()
            .any(|o| matches!(o, StoreOp::Credit { micro: 0, .. })),
        "the extra replica's credit is its own write"
    );
    // A speculative liar on micro-batch 1's straggler is compared with micro-batch 1's accepted result.
    h.honest_result(one[0]);
    // Speculation waits for three times the typical result latency (now 3 s, the straggler's).
    h.advance(Duration::from_secs(6));
    h.ready(liar);
    assert_eq!(h.held(liar).map(|l| l.micro), Some(1));
    h.honest_result(one[1]);
    assert_eq!(
        h.job(1).step,
        1,
        "both micro-batches accepted: the step advanced"
    );
    h.submit(liar, flip);
    assert_eq!(
        h.last_verdict(liar),
        Some(Outcome::Late),
        "a replica of a superseded step is late"
    );
}

#[test]
fn a_trusted_worker_is_spot_checked_instead_of_replicated() {
    let mut h = Harness::with(|c| c.trust_threshold = 2);
    h.load(
        1,
        Hyper {
            adaptive: true,
            ..one_micro()
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
            adaptive: true,
            ..one_micro()
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
fn a_refused_worker_gets_its_verdict_then_the_close_and_no_more_work() {
    let mut h = Harness::with(|c| c.strike_limit = 1);
    h.load(1, one_micro(), Vec::new());
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
    let late: usize = conns
        .iter()
        .map(|c| {
            h.verdicts(*c)
                .iter()
                .filter(|v| **v == Outcome::Late)
                .count()
        })
        .sum();
    assert_eq!(
        late, 6,
        "each of the six replicas of the abandoned micro-batch is answered late"
    );
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
    h.load(1, one_micro(), Vec::new());
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

/// Three workers on the one micro-batch of a job with R = 3: (honest, colluder, colluder).
fn r3(tune: impl FnOnce(&mut SchedulerConfig)) -> (Harness, ConnId, ConnId, ConnId) {
    let mut h = Harness::with(tune);
    h.load(
        1,
        Hyper {
            global_batch: 4,
            redundancy: 3,
            ..hyper()
        },
        Vec::new(),
    );
    let (good, c1, c2) = (h.connect(1), h.connect(2), h.connect(3));
    for c in [good, c1, c2] {
        h.ready(c);
        assert_eq!(h.held(c).map(|l| l.micro), Some(0));
    }
    (h, good, c1, c2)
}

#[test]
fn at_r3_a_colluding_pair_that_answers_first_cannot_outvote_the_honest_replica() {
    let (mut h, good, c1, c2) = r3(|_| {});
    h.submit(c1, flip);
    h.submit(c2, flip);
    assert!(
        !h.ops.iter().any(|o| matches!(o, StoreOp::Accepted { .. })),
        "two of three agreeing replicas are not yet an acceptance"
    );
    assert_eq!(h.last_verdict(c1), None);
    h.honest_result(good);
    assert_eq!(
        h.recomputes.len(),
        1,
        "the disagreement goes to recomputation"
    );
    assert_eq!(h.recomputes[0].kind, CheckKind::Arbitrate);
    h.recompute_honestly();
    assert_eq!(h.last_verdict(good), Some(Outcome::Accepted));
    assert_eq!(h.last_verdict(c1), Some(Outcome::Rejected));
    assert_eq!(h.last_verdict(c2), Some(Outcome::Rejected));
    assert_eq!(h.st.worker(WorkerId(1)).map(|w| w.strikes), Some(0));
    for op in &h.ops {
        if let StoreOp::Accepted { row, credits, .. } = op {
            assert_eq!(
                row.grad,
                honest(JobId(1), 0, 0).2,
                "the lie never reaches the model"
            );
            assert_eq!(credits.len(), 1);
        }
    }
}

#[test]
fn at_r3_three_agreeing_replicas_are_all_accepted_and_none_is_late() {
    let (mut h, a, b, c) = r3(|_| {});
    for w in [a, b, c] {
        h.honest_result(w);
    }
    for w in [a, b, c] {
        assert_eq!(h.verdicts(w), vec![Outcome::Accepted]);
    }
    assert!(h.recomputes.is_empty());
    assert_eq!(h.job(1).counters.results_late, 0);
    assert!(
        h.ops
            .iter()
            .any(|o| matches!(o, StoreOp::Accepted { row, credits, .. } if row.agreeing == 3 && credits.len() == 3))
    );
}

#[test]
fn without_recomputation_a_colluding_majority_strikes_nobody() {
    // The model is too large to recompute: the pair's quorum is used (audits are what catch it), but the honest
    // minority is late, never struck by vote.
    let (mut h, good, c1, c2) = r3(|c| c.spot_check_max_params = 1);
    h.honest_result(good);
    h.submit(c1, flip);
    h.submit(c2, flip);
    assert!(h.recomputes.is_empty());
    assert_eq!(h.last_verdict(good), Some(Outcome::Late));
    assert_eq!(h.st.worker(WorkerId(1)).map(|w| w.strikes), Some(0));
    assert_eq!(h.job(1).counters.results_rejected, 0);
    assert_eq!(h.job(1).step, 1);
}

#[test]
fn a_near_miss_among_r3_replicas_is_never_struck() {
    let (mut h, a, b, close) = r3(|_| {});
    h.honest_result(a);
    h.honest_result(b);
    h.submit(close, nudge);
    h.recompute_honestly();
    assert_eq!(h.last_verdict(a), Some(Outcome::Accepted));
    assert_eq!(h.last_verdict(close), Some(Outcome::Late));
    assert_eq!(h.st.worker(WorkerId(3)).map(|w| w.strikes), Some(0));
}

/// One micro-batch per step, R = 2, every replica-only acceptance audited.
fn audited() -> (Harness, ConnId, ConnId) {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            audit: 1.0,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    h.ready(a);
    h.ready(b);
    (h, a, b)
}

#[test]
fn a_failed_audit_refuses_every_voucher_and_claws_back_their_credits() {
    let (mut h, a, b) = audited();
    // A colluding pair returns the same lie: the replicas agree, so it is accepted and credited...
    h.submit(a, flip);
    h.submit(b, flip);
    assert_eq!(h.last_verdict(a), Some(Outcome::Accepted));
    let granted = h.st.worker(WorkerId(1)).map(|w| w.credits_flops);
    assert!(granted.is_some_and(|f| f > 0));
    assert_eq!(h.job(1).step, 1, "the lie reached step 0's model");
    // ...and the audit, drawn after acceptance, recomputes it.
    assert_eq!(h.recomputes.len(), 1);
    assert_eq!(h.recomputes[0].kind, CheckKind::Audit);
    assert_eq!(h.job(1).counters.audits, 1);
    h.recompute_honestly();
    let c = &h.job(1).counters;
    assert_eq!(c.audit_failures, 1);
    assert_eq!(h.job(1).last_bad_step, Some(0));
    for (conn, w) in [(a, 1), (b, 2)] {
        assert_eq!(h.closed.get(&conn), Some(&ErrorCode::Refused));
        let info = h.st.worker(WorkerId(w)).expect("worker");
        assert!(info.refused);
        assert_eq!((info.credits_flops, info.accepted), (0, 0));
        assert!(h.ops.iter().any(|o| matches!(o,
            StoreOp::Clawback { step: 0, micro: 0, credit, .. }
                if credit.worker == WorkerId(w) && Some(credit.flops) == granted)));
    }
}

#[test]
fn a_passed_audit_changes_nothing_and_audit_zero_audits_nothing() {
    let (mut h, a, b) = audited();
    h.honest_result(a);
    h.honest_result(b);
    assert_eq!(h.recomputes.len(), 1);
    h.recompute_honestly();
    assert_eq!(h.job(1).counters.audit_failures, 0);
    assert!(!h.ops.iter().any(|o| matches!(o, StoreOp::Clawback { .. })));
    assert!(h.closed.is_empty());

    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            audit: 0.0,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    for _ in 0..20 {
        h.ready(a);
        h.ready(b);
        h.honest_result(a);
        h.honest_result(b);
    }
    assert_eq!(h.job(1).step, 20);
    assert!(h.recomputes.is_empty());
}

#[test]
fn audits_sample_about_their_share_of_accepted_micro_batches() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            global_batch: 4,
            audit: 0.25,
            ..hyper()
        },
        Vec::new(),
    );
    let (a, b) = (h.connect(1), h.connect(2));
    for _ in 0..400 {
        h.ready(a);
        h.ready(b);
        h.honest_result(a);
        h.honest_result(b);
    }
    let audits = h.job(1).counters.audits;
    assert_eq!(audits as usize, h.recomputes.len());
    assert!((60..=140).contains(&audits), "{audits} audits of 400");
}
