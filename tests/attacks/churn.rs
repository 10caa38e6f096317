//! Churn: 30% of the workers vanish mid-run and no accepted result is lost.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_30_percent_of_the_workers_loses_no_accepted_result() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("churn");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let mut rng = SplitMix64::new(2026);
    // 7 stay; 3 leave after a random number of leases, each closing its connection right after a result (and
    // its next `ready`, so a fresh lease may be in flight to it when it goes).
    let stay = spawn_honest(&server, 7);
    let leave: Vec<_> = (0..3)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("leaver{i}"),
                None,
                Some(2 + rng.below(40)),
                None,
            )
        })
        .collect();
    // And two peers that take a lease and vanish without answering, at random moments.
    let mut grabbers = Vec::new();
    for _ in 0..2 {
        let url = server.ws_url();
        let wait = Duration::from_millis(rng.below(1500));
        grabbers.push(tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut c = RawClient::connect(&url).await?;
            let hello = WorkerMsg::Hello {
                protocol: PROTOCOL_VERSION,
                token: None,
                name: Some("grabber".into()),
                backend: Backend::Cpu,
                adapter: "raw".into(),
                platform: Platform::Native,
            };
            c.send(&hello, &[]).await?;
            c.send(&WorkerMsg::Ready, &[]).await?;
            let lease = c
                .recv_until(|m, _| matches!(m, CoordinatorMsg::Lease { .. }).then_some(()))
                .await;
            drop(c);
            anyhow::Ok(lease.is_ok())
        }));
    }
    let job = server
        .wait_job(1, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == STEPS
        })
        .await?;
    let counters = job["counters"].clone();
    server.stop().await?;
    for g in grabbers {
        assert!(g.await??, "a grabber got its lease before vanishing");
    }
    for h in leave {
        let r = join(h)?;
        assert_eq!(r.stats.rejected, 0);
        assert!(
            r.closed_by.is_none(),
            "a leaver left by itself: {:?}",
            r.closed_by
        );
    }
    for h in stay {
        assert_eq!(join(h)?.stats.rejected, 0);
    }
    println!("churn run: {counters}");
    assert_eq!(counters["micro_batches_abandoned"], 0);

    let credits = credit_rows(&dir.db()).await?;
    let distinct: std::collections::BTreeSet<(u64, u32)> =
        credits.iter().map(|c| (c.1, c.2)).collect();
    let unique: std::collections::BTreeSet<(u64, u64, u32)> = credits.iter().copied().collect();
    // Every micro-batch of every step was accepted once, its credits written once per agreeing worker, and every
    // accepted result the coordinator counted is in the ledger.
    assert_eq!(
        distinct.len() as u64,
        STEPS * MICROS_PER_STEP,
        "an accepted micro-batch is missing from the ledger"
    );
    assert_eq!(unique.len(), credits.len(), "a credit was written twice");
    assert_eq!(
        credits.len() as u64,
        counters["results_accepted"].as_u64().unwrap()
    );
    for &(s, m) in &distinct {
        let n = credits.iter().filter(|c| (c.1, c.2) == (s, m)).count();
        assert!(
            (2..=6).contains(&n),
            "step {s} micro {m}: {n} credited workers"
        );
    }
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
