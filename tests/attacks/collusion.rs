//! Colluding pairs: lies that pass only when the pair forms the quorum, arbitration, and random audits.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colluding_pair_gets_lies_through_only_when_it_forms_the_quorum_and_is_then_caught()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("collude");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 4);
    // Both flip every gradient's sign: deterministic and identical, so two of them on one micro-batch agree.
    let pair: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("colluder{i}"),
                None,
                None,
                Some(scale(-1.0)),
            )
        })
        .collect();
    let job = server
        .wait_job(1, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == STEPS
        })
        .await?;
    server.stop().await?;
    let honest = honest
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pair = pair
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;

    let ids: Vec<u64> = pair.iter().map(|r| r.stats.worker.unwrap()).collect();
    let credits = credit_rows(&dir.db()).await?;
    let credited = |w: u64| -> std::collections::BTreeSet<(u64, u32)> {
        credits
            .iter()
            .filter(|c| c.0 == w)
            .map(|c| (c.1, c.2))
            .collect()
    };
    let (a, b) = (credited(ids[0]), credited(ids[1]));
    let honest_rejected: u64 = honest.iter().map(|h| h.stats.rejected).sum();
    println!(
        "colluders: {:?} / {:?}; bad micro-batches accepted: {}; honest results rejected by the pair: {honest_rejected}; accuracy {} ; counters {}",
        pair[0].stats,
        pair[1].stats,
        a.len(),
        job["last_eval"]["accuracy"],
        job["counters"]
    );
    // Every lie that got through was backed by both colluders on the same micro-batch: no single liar's result
    // was ever accepted, and the coordinator cannot tell two identical lies from two honest results.
    assert_eq!(a, b, "a colluder's result was accepted without its partner");
    // Their every other result met an honest majority, so both end refused.
    for r in &pair {
        assert!(refused(r), "colluder not refused: {:?}", r.closed_by);
    }
    // Disagreements are settled by the coordinator's own recomputation, never by a volunteer tie-breaker the
    // partner could be: the pair cannot outvote an honest replica, so no honest result is ever rejected.
    assert_eq!(honest_rejected, 0, "the pair outvoted an honest worker");
    let store = Store::open(&dir.db()).await?;
    let train: Vec<_> = store
        .metrics(JobId(1))
        .await?
        .into_iter()
        .filter(|m| m.kind == "train")
        .collect();
    assert!(train.len() as u64 == STEPS && train.iter().all(|m| m.min_agreeing >= 2));
    store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// One of a colluding pair that forms every quorum: it flips the sign of every gradient, as its partner does.
fn lie_together(lies: Arc<Mutex<u64>>) -> SendTamper {
    Box::new(move |out: &mut StepOutput| {
        out.grad.iter_mut().for_each(|g| *g = -*g);
        *lies.lock().unwrap() += 1;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_forms_every_quorum_and_lies_together_is_refused_by_audits()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("audit");
    // A higher audit share than the default, so the pair is caught within this short run with near certainty
    // ((1 - 0.25)^k for k lies that both got through).
    create_demo_job(
        &dir.db(),
        Hyper {
            audit: 0.25,
            ..short(STEPS)
        },
    )
    .await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;

    let lies = Arc::new(Mutex::new(0u64));
    let pair: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("colluder{i}"),
                None,
                None,
                Some(lie_together(lies.clone())),
            )
        })
        .collect();
    // The pair alone first: every micro-batch's quorum is the pair, both send the same sign-flipped gradient, the
    // replicas agree, and only an audit can see it. (A pair that lies only when it happens to meet beside faster
    // honest workers rarely meets: least-replicated-first placement gives each micro-batch one honest and one
    // colluding replica, and those disagreements go to arbitration, which the other tests cover.)
    server
        .wait_job(1, Duration::from_secs(120), |j| {
            j["counters"]["audit_failures"].as_u64() >= Some(1)
        })
        .await?;
    // Honest volunteers then finish the job.
    let honest = spawn_honest(&server, 2);
    let run = finish(server, &dir.db(), STEPS, 2, honest).await?;
    let pair = pair
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let counters = &run.job["counters"];
    println!(
        "pair: {:?} / {:?}; lies sent {}; counters {counters}; accuracy {}",
        pair[0].stats,
        pair[1].stats,
        lies.lock().unwrap(),
        run.accuracy
    );
    assert!(
        *lies.lock().unwrap() > 0,
        "the pair met and lied at least once"
    );
    assert!(counters["audit_failures"].as_u64() >= Some(1));
    for r in &pair {
        assert!(refused(r), "colluder not refused: {:?}", r.closed_by);
    }
    // `finish` checked that no honest result was rejected and that the ledger (clawbacks included) verifies.
    Ok(())
}
