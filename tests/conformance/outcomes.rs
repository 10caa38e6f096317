//! docs/PROTOCOL.md, "What a result gets": one test per outcome, in raw frames.

use super::*;

/// Two raw workers holding the two replicas of step 0's only micro-batch.
async fn two_replicas(server: &Server) -> anyhow::Result<((Peer, Lease), (Peer, Lease))> {
    let mut a = Peer::join(server, None).await?;
    let mut b = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    b.ready().await?;
    let lb = b.lease().await?;
    Ok(((a, la), (b, lb)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_when_replicas_agree() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("accepted", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    a.honest(&la).await?;
    b.honest(&lb).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_it_loses_arbitration() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("arbitrated", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    let flipped: Vec<f32> = rb.grad.iter().map(|g| -g).collect();
    b.submit(lb.id, rb.loss, rb.correct, &flipped).await?;
    assert_eq!(
        a.verdict(la.id).await?,
        Outcome::Accepted,
        "agrees with the coordinator's recomputation"
    );
    assert_eq!(b.verdict(lb.id).await?, Outcome::Rejected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_invalid() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("invalid", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    a.submit(la.id, 1.0, 0, &[0.0; 3]).await?; // wrong length
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected, "wrong length");
    let mut nan = b.compute(&lb)?;
    nan.grad[0] = f32::NAN;
    b.submit(lb.id, nan.loss, nan.correct, &nan.grad).await?;
    assert_eq!(
        b.verdict(lb.id).await?,
        Outcome::Rejected,
        "NaN in the gradient"
    );
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    let lc = c.lease().await?;
    let rc = c.compute(&lc)?;
    c.submit(lc.id, rc.loss, 5, &rc.grad).await?; // correct > rows
    assert_eq!(c.verdict(lc.id).await?, Outcome::Rejected, "correct > rows");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_the_commit_does_not_match() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("commit", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), _) = two_replicas(server).await?;
    let r = a.compute(&la)?;
    let msg = WorkerMsg::Result {
        lease: la.id,
        loss: r.loss,
        correct: r.correct,
        commit: Some("0".repeat(64)),
    };
    send(&mut a.ws, &msg, &f32_bytes(&r.grad)).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_for_a_lease_the_connection_does_not_hold() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("foreign", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let r = a.compute(&la)?;
    // b answers a's lease, and a lease that never existed: both late, and b's own lease is unaffected.
    b.submit(la.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(b.verdict(la.id).await?, Outcome::Late);
    b.submit(LeaseId(999_999), r.loss, r.correct, &r.grad)
        .await?;
    assert_eq!(b.verdict(LeaseId(999_999)).await?, Outcome::Late);
    a.submit(la.id, r.loss, r.correct, &r.grad).await?;
    b.honest(&lb).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_after_the_lease_expired() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("expired", |_| ()).await?;
    let http = Http::new(server);
    let mut hyper = one_micro(2);
    hyper["lease_timeout_ms"] = 1000.into();
    let (_, job) = create_job(&http, alice, hyper).await?;
    let mut a = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    // Wait for the reaper to expire the lease (a condition, polled), then answer it.
    let start = std::time::Instant::now();
    loop {
        let (_, view) = http.get(&format!("/api/v1/jobs/{job}"), None).await?;
        if view["counters"]["leases_expired"].as_u64() >= Some(1) {
            break;
        }
        anyhow::ensure!(start.elapsed() < WAIT, "lease never expired: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.honest(&la).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Late);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_for_a_near_miss() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("nearmiss", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    // Same loss and correct count, gradient 1% off: outside the tolerance, inside the near-miss band (0.05).
    let off: Vec<f32> = rb.grad.iter().map(|g| g * 1.01).collect();
    b.submit(lb.id, rb.loss, rb.correct, &off).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Late);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_r3_every_replica_is_accepted_once_all_three_agree() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("quorum", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(3)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    let lc = c.lease().await?;
    a.honest(&la).await?;
    b.honest(&lb).await?;
    // Two agreeing replicas of three are no proof (they could be a colluding pair): the micro-batch settles only
    // when the third agrees too, and then none of the three is wasted as `late`.
    c.honest(&lc).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    assert_eq!(c.verdict(lc.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_still_stands_after_waiting() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("waiting", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    c.expect_waiting().await?;
    a.honest(&la).await?;
    b.honest(&lb).await?;
    // The next step opens: c gets a lease without asking again.
    let lc = c.lease().await?;
    assert_eq!(lc.version, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_releases_the_lease_without_a_verdict() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("failed", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    c.expect_waiting().await?;
    send(
        &mut a.ws,
        &WorkerMsg::Failed {
            lease: la.id,
            reason: "device lost".into(),
        },
        &[],
    )
    .await?;
    // The released replica goes to c at once; it and b agree, and a hears nothing about its lease.
    let lc = c.lease().await?;
    assert_eq!(lc.version, 0);
    b.honest(&lb).await?;
    c.honest(&lc).await?;
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    assert_eq!(c.verdict(lc.id).await?, Outcome::Accepted);
    a.ready().await?;
    let next = a.lease().await?;
    assert_eq!(
        next.version, 1,
        "a's next message is a lease of the next step, not a verdict"
    );
    Ok(())
}

/// The job's counters, as its public status shows them.
async fn counters(http: &Http, job: u64) -> anyhow::Result<serde_json::Value> {
    let (status, view) = http.get(&format!("/api/v1/jobs/{job}"), None).await?;
    anyhow::ensure!(status == 200, "job status: {status} {view}");
    Ok(view["counters"].clone())
}

/// Adaptive replication: two honest raw workers agree step after step (one micro-batch, R = 2) until `a`, now
/// trusted, is leased a micro-batch alone, which `b` sees as `waiting` for its `ready` (the only micro-batch wants
/// no second replica). Returns `a` with its solo lease and `b`, whose `ready` still stands.
async fn solo_lease(server: &Server) -> anyhow::Result<(Peer, Lease, Peer)> {
    let mut a = Peer::join(server, None).await?;
    let mut b = Peer::join(server, None).await?;
    // With a record r >= the trust threshold a lease is solo with probability 1 - max(0.05, 1/r).
    for _ in 0..50 {
        a.ready().await?;
        let la = a.lease().await?;
        b.ready().await?;
        let Some(lb) = b.lease_or_waiting().await? else {
            return Ok((a, la, b));
        };
        anyhow::ensure!(
            la.micro == lb.micro && la.version == lb.version,
            "R = 2 replicas of one micro-batch"
        );
        a.honest(&la).await?;
        b.honest(&lb).await?;
        assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
        assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    }
    bail!("no solo lease in 50 steps of agreed results")
}

/// Trusted after 2 agreed results; no speculative replica while a test runs, so the only second replica of a solo
/// micro-batch is the one a failed spot check sends back to replication.
fn trusted_after_2(c: &mut ServeConfig) {
    c.trust_threshold = 2;
    c.speculate_after_ms = 60_000;
}

/// An adaptive job of one 4-row micro-batch per step, R = 2.
fn adaptive() -> serde_json::Value {
    let mut hyper = one_micro(2);
    hyper["adaptive"] = true.into();
    hyper
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_by_a_spot_check() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("spot-ok", trusted_after_2).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, adaptive()).await?;
    let (mut a, la, _b) = solo_lease(server).await?;
    let before = counters(&http, job).await?;
    a.honest(&la).await?;
    assert_eq!(
        a.verdict(la.id).await?,
        Outcome::Accepted,
        "agrees with the coordinator's recomputation"
    );
    let after = counters(&http, job).await?;
    assert_eq!(
        (&before["spot_checks"], &after["spot_checks"]),
        (&0.into(), &1.into()),
        "{after}"
    );
    assert_eq!(after["spot_check_failures"], 0, "{after}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_by_a_failed_spot_check() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("spot-bad", trusted_after_2).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, adaptive()).await?;
    let (mut a, la, mut b) = solo_lease(server).await?;
    let r = a.compute(&la)?;
    let flipped: Vec<f32> = r.grad.iter().map(|g| -g).collect();
    a.submit(la.id, r.loss, r.correct, &flipped).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected);
    let after = counters(&http, job).await?;
    assert_eq!(
        (&after["spot_checks"], &after["spot_check_failures"]),
        (&1.into(), &1.into()),
        "{after}"
    );
    // The micro-batch goes back to R-fold replication: b's standing `ready` gets a replica of the same step.
    let lb = b.lease().await?;
    assert_eq!((lb.version, lb.micro), (la.version, la.micro));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_for_a_speculative_replica_while_the_step_is_open() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("speculative", |c| c.speculate_after_ms = 200).await?;
    // Two micro-batches per step, R = 2: four workers hold every replica, a fifth waits.
    let hyper = serde_json::json!({"global_batch": 8, "micro_batch": 4, "steps": 1000, "redundancy": 2, "eval_every": 1000});
    let (_, job) = create_job(&Http::new(server), alice, hyper).await?;
    let mut peers = Vec::new();
    for _ in 0..4 {
        let mut p = Peer::join(server, None).await?;
        p.ready().await?;
        let l = p.lease().await?;
        peers.push((p, l));
    }
    let mut extra = Peer::join(server, None).await?;
    extra.ready().await?;
    assert!(
        extra.lease_or_waiting().await?.is_none(),
        "every replica is leased: waiting"
    );
    // Its `ready` stands; once the leases are outstanding for --speculate-after-ms, the lease reaper hands it a
    // speculative replica of one of them.
    let le = extra.lease().await?;
    assert_eq!(le.version, 0);
    let mut pair: Vec<_> = peers
        .iter_mut()
        .filter(|(_, l)| l.micro == le.micro)
        .collect();
    assert_eq!(
        pair.len(),
        2,
        "R = 2 replicas of the speculated micro-batch"
    );
    for (p, l) in &mut pair {
        let r = p.compute(l)?;
        p.submit(l.id, r.loss, r.correct, &r.grad).await?;
    }
    for (p, l) in &mut pair {
        assert_eq!(p.verdict(l.id).await?, Outcome::Accepted);
    }
    // That micro-batch is accepted; the step still waits for the other one. The speculative replica agrees.
    extra.honest(&le).await?;
    assert_eq!(extra.verdict(le.id).await?, Outcome::Accepted);
    let c = counters(&Http::new(server), job).await?;
    assert_eq!(
        (
            &c["speculative_leases"],
            &c["results_accepted"],
            &c["steps_applied"]
        ),
        (&1.into(), &3.into(), &0.into()),
        "{c}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_for_the_third_near_miss_in_a_row() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("nearmiss3", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let (mut a, mut b) = (
        Peer::join(server, None).await?,
        Peer::join(server, None).await?,
    );
    for (n, expected) in [
        (1, Outcome::Late),
        (2, Outcome::Late),
        (3, Outcome::Rejected),
    ] {
        a.ready().await?;
        let la = a.lease().await?;
        b.ready().await?;
        let lb = b.lease().await?;
        let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
        a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
        // Same loss and correct count, gradient 1% off: a near miss of the coordinator's recomputation.
        let off: Vec<f32> = rb.grad.iter().map(|g| g * 1.01).collect();
        b.submit(lb.id, rb.loss, rb.correct, &off).await?;
        assert_eq!(a.verdict(la.id).await?, Outcome::Accepted, "step {n}");
        assert_eq!(b.verdict(lb.id).await?, expected, "near miss {n}");
    }
    // The third one is the strike; the first two were not.
    let (_, workers) = http.get("/api/v1/workers", None).await?;
    let strikes: Vec<_> = workers
        .as_array()
        .context("a list")?
        .iter()
        .map(|w| (w["id"].as_u64(), w["strikes"].as_u64()))
        .collect();
    assert!(strikes.contains(&(Some(b.worker), Some(1))), "{workers}");
    assert!(strikes.contains(&(Some(a.worker), Some(0))), "{workers}");
    assert_eq!(counters(&http, job).await?["near_misses"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_after_its_job_was_cancelled() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("cancelled", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let mut a = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    let (status, view) = http
        .post(&format!("/api/v1/jobs/{job}/cancel"), Some(alice), b"")
        .await?;
    assert_eq!((status, &view["status"]), (200, &"cancelled".into()));
    a.honest(&la).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Late);
    // Cancelling dropped the lease, so the result belongs to no job: docs/API.md does not count it in `results_late`.
    let c = counters(&http, job).await?;
    assert_eq!(
        (&c["results_late"], &c["results_accepted"]),
        (&0.into(), &0.into()),
        "{c}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_when_its_micro_batch_is_abandoned() -> anyhow::Result<()> {
    // A model too large for the coordinator to recompute: disagreements get volunteer tie-breakers, up to 6.
    let Env { server, alice, .. } = &start("abandoned", |c| c.spot_check_max_params = 1).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    // Each `ready` is answered (a lease for the first two, `waiting` for the rest) before the next peer asks: the
    // coordinator serves waiting workers in the order their `ready` arrived, and messages on different connections
    // have no order of their own.
    let mut peers = Vec::new();
    let mut first = Vec::new();
    for _ in 0..6 {
        let mut p = Peer::join(server, None).await?;
        p.ready().await?;
        first.push(p.lease_or_waiting().await?);
        peers.push(p);
    }
    // Each replica's gradient is the honest one scaled by a different factor (1, 2, …, 6): no two agree.
    let mut leases = Vec::new();
    for (k, (p, early)) in peers.iter_mut().zip(first).enumerate() {
        let l = match early {
            Some(l) => l,
            None => p.lease().await?,
        };
        anyhow::ensure!(
            (l.version, l.micro) == (0, 0),
            "replica {k} of step 0's micro-batch"
        );
        let r = p.compute(&l)?;
        let scaled: Vec<f32> = r.grad.iter().map(|g| g * (k + 1) as f32).collect();
        p.submit(l.id, r.loss, r.correct, &scaled).await?;
        leases.push(l.id);
    }
    for (p, l) in peers.iter_mut().zip(leases) {
        assert_eq!(p.verdict(l).await?, Outcome::Late);
    }
    let c = counters(&http, job).await?;
    assert_eq!(
        (
            &c["micro_batches_abandoned"],
            &c["results_late"],
            &c["results_rejected"]
        ),
        (&1.into(), &6.into(), &0.into()),
        "{c}"
    );
    Ok(())
}
