//! Elastic `local` rounds and bounded staleness in the state machine: a round grows past its base shards while
//! workers are idle, closes at its sample target or at its deadline (not without a verified delta), carries the
//! shards still out into the next round, applies a stale-by-one delta at half weight, and answers a delta staler
//! than the bound `late`.

use super::local::{held_local, honest_local, local, send_local, v2};
use super::*;
use crate::scheduler::micro::Phase;

/// Two 8-row base shards per round (H = 2 inner steps of 4 rows: 8 samples a shard), R = 2.
fn elastic(max: u32, samples: Option<u64>) -> Hyper {
    Hyper {
        round_shards_max: Some(max),
        round_samples: samples,
        ..local()
    }
}

/// Connects and readies v2 workers `from..from + n`.
fn workers(h: &mut Harness, from: u64, n: u64) -> Vec<ConnId> {
    (from..from + n)
        .map(|w| {
            let c = v2(h, w);
            h.ready(c);
            c
        })
        .collect()
}

/// The round (base version) and shard of the last local lease `conn` was sent.
fn lease_of(h: &Harness, conn: ConnId) -> Option<(u64, u32)> {
    h.inbox.get(&conn)?.iter().rev().find_map(|m| match m {
        CoordinatorMsg::LocalLease { round, shard, .. } => Some((*round, *shard)),
        _ => None,
    })
}

/// The connections holding a lease of (round, shard).
fn holders(h: &Harness, conns: &[ConnId], of: (u64, u32)) -> Vec<ConnId> {
    conns
        .iter()
        .copied()
        .filter(|c| lease_of(h, *c) == Some(of))
        .collect()
}

/// Both replicas of (round, shard) answer honestly.
fn settle(h: &mut Harness, conns: &[ConnId], of: (u64, u32)) {
    let pair = holders(h, conns, of);
    assert_eq!(pair.len(), 2, "shard {of:?} is leased to two workers");
    for c in pair {
        send_local(h, c, &honest_local(of.0, of.1));
    }
}

#[test]
fn an_elastic_round_leases_a_shard_pair_to_every_idle_worker_up_to_its_limit() {
    // A fixed round (the default): two shards, four leases, whatever the number of workers.
    let mut h = Harness::new();
    h.load(1, local(), vec![]);
    let conns = workers(&mut h, 1, 8);
    let busy = conns
        .iter()
        .filter(|c| held_local(&h, **c).is_some())
        .count();
    assert_eq!(busy, 4, "a fixed round has R × base shards leases");

    let mut h = Harness::new();
    h.load(1, elastic(5, None), vec![]);
    let conns = workers(&mut h, 1, 12);
    let busy: Vec<ConnId> = conns
        .iter()
        .copied()
        .filter(|c| held_local(&h, *c).is_some())
        .collect();
    assert_eq!(busy.len(), 10, "five shards, each leased twice");
    for shard in 0..5 {
        assert_eq!(holders(&h, &conns, (0, shard)).len(), 2, "shard {shard}");
    }
    assert_eq!(h.job(1).counters.elastic_shards, 3);
    // Elastic shards have their own rows, a function of (seed, round, index) only.
    let job = h.job(1);
    assert_eq!(job.micros[3].rows, job.shard_rows(0, 3));
    assert_ne!(job.micros[3].rows, job.micros[4].rows);
    assert!(job.micros[2..].iter().all(|m| m.rows.len() == 8));
    // The two left over wait: the round is at its limit.
    assert!(conns.iter().any(|c| held_local(&h, *c).is_none()));
}

#[test]
fn a_round_closes_at_its_sample_target_and_carries_the_shards_still_out() {
    let mut h = Harness::new();
    // Four shards may be out, two verified shards (16 samples) close the round.
    h.load(1, elastic(4, Some(16)), vec![]);
    let conns = workers(&mut h, 1, 8);
    settle(&mut h, &conns, (0, 0));
    assert_eq!(h.job(1).step, 0, "one shard of two is not the target");
    settle(&mut h, &conns, (0, 2));
    assert_eq!(h.job(1).step, 1, "two verified shards reach the target");
    let job = h.job(1);
    let carried: Vec<(u64, u32)> = job.micros.iter().filter_map(|m| m.origin).collect();
    assert_eq!(
        carried,
        vec![(0, 1), (0, 3)],
        "the shards still out carry on"
    );
    assert_eq!(
        job.micros.len(),
        4,
        "two fresh base shards, then the carried ones"
    );
    // A carried shard's replicas are still valid: accepted, credited, not late.
    settle(&mut h, &conns, (0, 1));
    for c in holders(&h, &conns, (0, 1)) {
        assert_eq!(h.last_verdict(c), Some(Outcome::Accepted));
    }
    assert!(matches!(h.job(1).micros[2].phase, Phase::Accepted(_)));
    assert_eq!(
        h.job(1).step,
        1,
        "a carried shard does not count toward the new round's target"
    );
}

#[test]
fn a_stale_by_one_delta_is_applied_at_half_weight() {
    let mut h = Harness::new();
    h.load(1, elastic(3, Some(16)), vec![]);
    let conns = workers(&mut h, 1, 6);
    settle(&mut h, &conns, (0, 0));
    settle(&mut h, &conns, (0, 1));
    assert_eq!(h.job(1).step, 1);
    // Shard 2 of round 0 is carried; its replicas answer during round 1 (based on θ_0: stale by one there).
    settle(&mut h, &conns, (0, 2));
    // Round 1's two base shards go to four fresh workers.
    let more = workers(&mut h, 7, 4);
    let (master, u) = {
        let l = h.job(1).local.as_ref().expect("local");
        (l.master.clone(), l.outer.u.clone())
    };
    settle(&mut h, &more, (1, 0));
    settle(&mut h, &more, (1, 1));
    assert_eq!(h.job(1).step, 2);
    assert_eq!(h.job(1).counters.stale_deltas_applied, 1);
    // Expected: Nesterov over (Δ(1,0) + Δ(1,1) + ½·Δ(0,2)) / 2.5, the deltas as their int8 encoding decodes.
    let d = |round, shard| {
        starling_core::quant::round_trip(&honest_local(round, shard).delta).expect("finite")
    };
    let (a, b, s) = (d(1, 0), d(1, 1), d(0, 2));
    let mean: Vec<f32> = (0..PARAMS)
        .map(|i| ((a[i] as f64 + b[i] as f64 + 0.5 * s[i] as f64) / 2.5) as f32)
        .collect();
    let mut want = master.clone();
    let hyper = &h.job(1).hyper;
    let mut outer =
        starling_core::optim::Nesterov::new(hyper.outer_lr, hyper.outer_momentum, PARAMS);
    outer.u = u;
    outer.step(&mut want, &mean);
    let got = &h.job(1).local.as_ref().expect("local").master;
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "master {got:?}, expected {want:?}"
        );
    }
    // And not the unweighted mean (the weighting is visible).
    let flat: Vec<f32> = (0..PARAMS).map(|i| (a[i] + b[i] + s[i]) / 3.0).collect();
    assert_ne!(mean, flat);
}

#[test]
fn a_round_closes_at_its_deadline_with_what_was_verified_and_never_empty() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            round_deadline_ms: Some(1_000),
            ..local()
        },
        vec![],
    );
    let conns = workers(&mut h, 1, 4);
    settle(&mut h, &conns, (0, 0));
    h.advance(Duration::from_millis(900));
    let fx = h.st.tick();
    h.take(fx);
    assert_eq!(
        h.job(1).step,
        0,
        "before the deadline the round waits for its shards"
    );
    h.advance(Duration::from_millis(200));
    let fx = h.st.tick();
    h.take(fx);
    assert_eq!(
        h.job(1).step,
        1,
        "at the deadline the round closes with one verified shard of two"
    );
    assert_eq!(
        h.job(1).micros[2].origin,
        Some((0, 1)),
        "the unfinished shard carries on"
    );
    // Round 1: past its deadline with nothing verified, it does not step...
    h.advance(Duration::from_millis(5_000));
    let fx = h.st.tick();
    h.take(fx);
    assert_eq!(
        h.job(1).step,
        1,
        "a round with nothing verified does not step at its deadline"
    );
    // ... until its first verified delta (here the carried shard's), which closes it at once.
    settle(&mut h, &conns, (0, 1));
    assert_eq!(h.job(1).step, 2);
    assert_eq!(h.job(1).counters.stale_deltas_applied, 1);
}

#[test]
fn a_delta_staler_than_the_bound_is_late_without_credit_or_strike() {
    let mut h = Harness::new();
    h.load(
        1,
        Hyper {
            staleness: 1,
            ..elastic(3, Some(8))
        },
        vec![],
    );
    let conns = workers(&mut h, 1, 6);
    settle(&mut h, &conns, (0, 0));
    assert_eq!(h.job(1).step, 1, "one verified shard closes a round");
    let old: Vec<ConnId> = holders(&h, &conns, (0, 1));
    // One replica of the carried shard answers during round 1; its twin is still computing.
    send_local(&mut h, old[0], &honest_local(0, 1));
    assert_eq!(h.last_verdict(old[0]), None, "waiting for its twin");
    let worker = WorkerId(
        conns
            .iter()
            .position(|c| *c == old[0])
            .expect("one of them") as u64
            + 1,
    );
    let credits = h.st.worker(worker).map(WorkerInfo::credits);
    let more = workers(&mut h, 7, 4);
    settle(&mut h, &more, (1, 0));
    assert_eq!(h.job(1).step, 2);
    // Round 2 would apply a delta based on θ_0: staleness 2 > 1, so shards 1 and 2 of round 0 are dropped.
    assert_eq!(h.job(1).counters.shards_dropped_stale, 2);
    let origins: Vec<_> = h.job(1).micros.iter().filter_map(|m| m.origin).collect();
    assert_eq!(
        origins,
        vec![(1, 1)],
        "only round 1's unfinished shard carries on"
    );
    assert_eq!(
        h.last_verdict(old[0]),
        Some(Outcome::Late),
        "the waiting replica is late"
    );
    send_local(&mut h, old[1], &honest_local(0, 1));
    assert_eq!(
        h.last_verdict(old[1]),
        Some(Outcome::Late),
        "its twin is late too"
    );
    assert_eq!(h.job(1).counters.results_rejected, 0, "late is no strike");
    assert_eq!(h.st.worker(worker).map(WorkerInfo::credits), credits);
}

#[test]
fn a_carried_shard_under_replay_is_replayed_again_from_its_own_base_version() {
    let mut h = Harness::new();
    h.load(1, elastic(3, Some(16)), vec![]);
    let conns = workers(&mut h, 1, 6);
    let theta0 = h.job(1).params();
    // Shard 2's replicas disagree on their trace: the coordinator replays it.
    let pair = holders(&h, &conns, (0, 2));
    send_local(&mut h, pair[0], &honest_local(0, 2));
    let mut lie = honest_local(0, 2);
    lie.losses[0] *= 2.0;
    send_local(&mut h, pair[1], &lie);
    assert_eq!(h.recomputes.len(), 1);
    let first = h.recomputes.remove(0);
    settle(&mut h, &conns, (0, 0));
    settle(&mut h, &conns, (0, 1));
    assert_eq!(
        h.job(1).step,
        1,
        "the round closes while shard 2 is being replayed"
    );
    // The carried shard is asked again under its new index, from θ_0 and its round-0 plan.
    let again = h.recomputes.remove(0);
    assert_eq!((again.step, again.micro), (1, 2));
    assert_eq!(
        again.params, theta0,
        "replayed from its base version, not θ_1"
    );
    let plan = again.local.as_ref().expect("a replay").plan;
    assert_eq!(plan, crate::scheduler::round::plan(&h.job(1).hyper, 0, 2));
    // The answer to the first request names the old step and is ignored; the second settles the shard.
    let mut reference = honest_local(0, 2);
    reference.delta = starling_core::quant::round_trip(&reference.delta).expect("finite");
    let fx =
        h.st.replayed(first.job, first.step, first.micro, Some(reference.clone()));
    h.take(fx);
    assert_eq!(
        h.last_verdict(pair[0]),
        None,
        "an answer for the old step settles nothing"
    );
    let fx =
        h.st.replayed(again.job, again.step, again.micro, Some(reference));
    h.take(fx);
    assert_eq!(h.last_verdict(pair[0]), Some(Outcome::Accepted));
    assert_eq!(h.last_verdict(pair[1]), Some(Outcome::Rejected));
}
