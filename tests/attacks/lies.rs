//! Workers that lie about their gradients (sign flip, ×10, noise, zeros) and hand-driven peers, all in one run.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_replaying_stale_and_copying_workers_never_reach_the_model() -> anyhow::Result<()> {
    init_tracing();
    let clean = clean_accuracy(STEPS).await?;

    let dir = TempDir::new("attacks");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 3);
    let liars: Vec<(&str, _)> = [
        ("sign-flip", scale(-1.0)),
        ("x10", scale(10.0)),
        ("noise", noise(7, 0.05)),
        ("zeros", zeros()),
    ]
    .into_iter()
    .map(|(name, t)| {
        (
            name,
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                name,
                None,
                None,
                Some(t),
            ),
        )
    })
    .collect();
    let shared: Shared = Arc::default();
    let raws: Vec<_> = [
        ("nan-inf", Raw::NonFinite),
        ("stale", Raw::Stale),
        ("replay", Raw::Replay),
        ("bad-commit", Raw::BadCommit),
        ("publisher", Raw::Publisher(shared.clone())),
        ("copier", Raw::Copier(shared.clone())),
    ]
    .into_iter()
    .map(|(name, how)| {
        let report = Arc::new(Mutex::new(RawReport::default()));
        let task = tokio::spawn(raw_peer(server.ws_url(), name, how, report.clone()));
        (name, report, task)
    })
    .collect();

    let run = finish(server, &dir.db(), STEPS, 2, honest).await?;
    println!(
        "attacked run: {}; held-out accuracy {:.4} (clean {clean:.4})",
        run.job["counters"], run.accuracy
    );
    assert!(
        (run.accuracy - clean).abs() <= 0.01,
        "attacked accuracy {} vs clean {clean}",
        run.accuracy
    );
    assert!(run.honest.iter().all(|h| h.stats.accepted > 0));

    for (name, h) in liars {
        let r = join(h)?;
        println!("{name:>10}: {:?}, closed by {:?}", r.stats, r.closed_by);
        assert_eq!(
            r.stats.accepted, 0,
            "{name}: a tampered result was accepted"
        );
        assert!(
            refused(&r),
            "{name} keeps lying and must end refused: {:?}",
            r.closed_by
        );
    }
    for (name, report, task) in raws {
        task.abort();
        let r = report.lock().unwrap();
        println!(
            "{name:>10}: sent {} honest / {} lies / {} copies; accepted {} honest / {} lies / {} copies; refused {}",
            r.count(Sent::Honest),
            r.count(Sent::Lie),
            r.count(Sent::Copy),
            r.accepted(Sent::Honest),
            r.accepted(Sent::Lie),
            r.accepted(Sent::Copy),
            r.refused
        );
        assert_eq!(r.accepted(Sent::Lie), 0, "{name}: a lie was accepted");
        match name {
            "publisher" => assert!(
                !r.refused && r.verdicts.values().all(|o| *o != Outcome::Rejected),
                "the publisher computes honestly"
            ),
            // The copier answers with honest bytes when its partner had the same micro-batch, else with the
            // partner's result for another micro-batch; only exact copies may pass, and the rest get it refused.
            _ => {
                assert!(r.count(Sent::Lie) > 0, "{name} never got to lie");
                assert!(r.refused, "{name} must end refused");
            }
        }
    }
    Ok(())
}
