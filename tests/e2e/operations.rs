//! Running a coordinator: a store that refuses writes, the demo schedule against overfitting, and fair shares of
//! leases among workers and jobs.

use super::*;

/// Durable or silent: while another process holds the database's write lock, the coordinator's writes fail. Nothing
/// those writes would have reported may reach a worker (no verdict, no credit, no step), the job is paused with the
/// error in its status, and once the lock is gone and the owner resumes it, the job finishes with every credit a
/// worker was told about in the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_writes_pauses_the_job_and_sends_nothing_unwritten()
-> anyhow::Result<()> {
    use sqlx::Connection as _;
    init_tracing();
    let cluster = Cluster::builder("store-fails")
        .hyper(Hyper {
            steps: 100,
            eval_every: 50,
            ..Hyper::default()
        })
        .worker("a", BackendChoice::Cpu, None)
        .worker("b", BackendChoice::Cpu, None)
        .start()
        .await?;
    let (server, token) = (&cluster.server, &cluster.token);
    server
        .wait_job(1, Duration::from_secs(60), |j| {
            j["step"].as_u64().unwrap() >= 10
        })
        .await?;
    // Another connection takes the write lock and holds it: every write of the coordinator times out and fails.
    let mut locker =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", cluster.dir.db().display()))
            .await?;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await?;
    let paused = server
        .wait_job(1, Duration::from_secs(60), |j| j["status"] == "paused")
        .await?;
    let error = paused["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("durable write failed"),
        "the job says why: {paused}"
    );
    let halted_at = paused["step"].as_u64().unwrap();
    sqlx::query("ROLLBACK").execute(&mut locker).await?;
    drop(locker);
    let (status, _) = server
        .post_as(token, "/api/v1/jobs/1/resume", "application/json", b"")
        .await?;
    assert_eq!(
        status, 200,
        "the owner resumes the job once storage works again"
    );
    let job = server
        .wait_job(1, Duration::from_secs(120), |j| j["status"] == "completed")
        .await?;
    assert!(job["error"].is_null(), "resuming clears the error: {job}");
    assert_eq!(job["step"], 100);
    let (dir, reports) = cluster.finish().await?;
    let (a, b) = (&reports[0], &reports[1]);
    let store = starling_coordinator::store::Store::open(&dir.db()).await?;
    store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("ledger: {e}"))?;
    let ledger = store.ledger(None).await?;
    let workers = store.workers().await?;
    for (name, r) in [("a", a), ("b", b)] {
        let id = workers
            .iter()
            .find(|w| w.name.as_deref() == Some(name))
            .map(|w| w.id.0)
            .ok_or_else(|| anyhow::anyhow!("worker {name} not in the store"))?;
        let durable = ledger.iter().filter(|e| e.worker == id).count() as u64;
        // Every `accepted` verdict a worker got is a durable ledger entry (verdicts lost in the final shutdown
        // only make the worker's count smaller).
        assert!(
            r.stats.accepted <= durable,
            "worker {id} was told of {} accepted results, the ledger holds {durable} (halted at step {halted_at})",
            r.stats.accepted
        );
        assert!(durable > 0);
    }
    Ok(())
}

/// The demo schedule (`demo_hyper`) on the real MNIST digits, single process, with the coordinator's update rule
/// (full-batch mean gradient, learning-rate schedule, weight decay) and its early-stopping rule: the run stops near
/// its held-out optimum instead of overfitting for most of its steps.
#[test]
fn the_demo_schedule_stops_before_its_held_out_loss_climbs() -> anyhow::Result<()> {
    use starling_core::cpu::CpuEngine;
    use starling_core::{ModelSpec, data, optim::Optimizer, schedule};
    let hyper = starling_coordinator::demo_hyper();
    let patience = hyper.patience.context("the demo stops early")?;
    let all = data::mnist_from_dir(&mnist_dir()).map_err(anyhow::Error::msg)?;
    let (train, test) = data::mnist_split(&all);
    let spec = ModelSpec::mnist_mlp();
    let mut params = spec.init_params(hyper.seed);
    let mut opt = Optimizer::new(hyper.optimizer, params.len());
    let mut engine = CpuEngine::new(spec);
    let (mut best, mut since, mut curve) = (f32::INFINITY, 0u32, Vec::new());
    let mut best_acc = 0.0f32;
    for step in 0..hyper.steps {
        let rows = schedule::step_rows(train.rows(), hyper.global_batch as usize, hyper.seed, step);
        let (x, y) = train.gather(&rows);
        engine.load(&params)?;
        let out = engine.step(&x, &y)?;
        let scale = hyper.lr_schedule.factor(step, hyper.steps);
        opt.step_scaled(&mut params, &out.grad, scale, hyper.weight_decay);
        if (step + 1) % hyper.eval_every == 0 {
            engine.load(&params)?;
            let ev = engine.evaluate(&test.features, &test.labels)?;
            curve.push((step + 1, ev.loss));
            best_acc = best_acc.max(ev.accuracy());
            if ev.loss < best {
                (best, since) = (ev.loss, 0);
            } else {
                since += 1;
                if since >= patience {
                    break;
                }
            }
        }
    }
    let (stop, last) = *curve.last().context("evaluated")?;
    let at_best = curve
        .iter()
        .find(|(_, l)| *l == best)
        .map_or(0, |(s, _)| *s);
    println!(
        "demo schedule: stopped at step {stop} (of {}); held-out loss lowest {best:.4} at step {at_best}, {last:.4} at the stop; best accuracy {best_acc:.4}",
        hyper.steps
    );
    assert!(best_acc >= 0.95, "the demo still trains to 95%: {best_acc}");
    assert!(
        last <= 1.15 * best,
        "stopped near the optimum: {last} vs {best}"
    );
    assert!(
        ((stop - at_best) as f64) <= 0.3 * stop as f64,
        "the held-out loss climbs for at most the last 30% of the run (lowest at {at_best}, stop at {stop}): {curve:?}"
    );
    Ok(())
}

/// Fair scheduling with real workers: 16 native workers on one job whose steps have only 8 leases each — every
/// worker gets accepted results and the least-served gets at least half the mean; then two jobs with weights 1 and
/// 3 share 4 workers in a 1:3 ratio of leases (±20%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_jobs_share_leases_fairly() -> anyhow::Result<()> {
    init_tracing();
    let cluster = Cluster::builder("fair")
        .hyper(Hyper {
            steps: 150,
            eval_every: 1_000,
            ..Hyper::default()
        })
        .workers(16)
        .start()
        .await?;
    cluster
        .server
        .wait_job(1, Duration::from_secs(120), |j| j["status"] == "completed")
        .await?;
    let (dir, _) = cluster.finish().await?;
    let store = starling_coordinator::store::Store::open(&dir.db()).await?;
    let mut per_worker: std::collections::BTreeMap<u64, usize> = Default::default();
    for w in store.workers().await? {
        per_worker.insert(w.id.0, 0);
    }
    for e in store.ledger(None).await? {
        *per_worker.entry(e.worker).or_default() += 1;
    }
    let counts: Vec<usize> = per_worker.values().copied().collect();
    assert_eq!(counts.len(), 16);
    let mean = counts.iter().sum::<usize>() as f64 / 16.0;
    let least = *counts.iter().min().context("workers")? as f64;
    println!("accepted results per worker over 150 steps: {counts:?} (mean {mean:.1})");
    assert!(
        least > 0.0 && least >= mean / 2.0,
        "least-served {least} vs mean {mean}: {counts:?}"
    );

    // Two jobs, weights 1 and 3, on 4 workers.
    let dir = TempDir::new("weights");
    create_demo_job(
        &dir.db(),
        Hyper {
            steps: 10_000,
            eval_every: 10_000,
            weight: 1.0,
            ..Hyper::default()
        },
    )
    .await?;
    {
        let store = starling_coordinator::store::Store::open(&dir.db()).await?;
        let first = store.jobs().await?.into_iter().next().context("demo job")?;
        let hyper = Hyper {
            steps: 10_000,
            eval_every: 10_000,
            weight: 3.0,
            ..Hyper::default()
        };
        store
            .insert_job(
                "heavy",
                &first.spec,
                &serde_json::to_string(&hyper)?,
                first.dataset_id,
                first.owner,
            )
            .await?;
    }
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let workers: Vec<_> = (0..4)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("v{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let heavy = server
        .wait_job(2, Duration::from_secs(120), |j| {
            j["counters"]["leases_issued"].as_u64().unwrap_or(0) >= 1_200
        })
        .await?;
    let (_, light) = server.get("/api/v1/jobs/1").await?;
    server.stop().await?;
    for w in workers {
        join(w)?;
    }
    let (a, b) = (
        light["counters"]["leases_issued"]
            .as_f64()
            .context("leases")?,
        heavy["counters"]["leases_issued"]
            .as_f64()
            .context("leases")?,
    );
    println!(
        "leases issued, weight 1 : weight 3 = {a} : {b} ({:.2})",
        b / a
    );
    assert!(
        (2.4..=3.6).contains(&(b / a)),
        "lease shares {a}:{b}, want 1:3 ± 20%"
    );
    Ok(())
}
