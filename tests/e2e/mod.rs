//! End-to-end: a real coordinator on 127.0.0.1:0, real WebSocket workers with real engines (one on the WGSL
//! engine on lavapipe), training the demo MNIST job; plus cheaters, disconnects, restarts and bad frames.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_core::data::{Dataset, TensorData, encode_raw, encode_safetensors};
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, LeaseId, Outcome, PROTOCOL_VERSION, Platform, WorkerMsg,
    f32_bytes,
};
use starling_tests::*;
use starling_worker::engine::BackendChoice;
use tokio_tungstenite::tungstenite::Message;

mod inputs; // Bad frames and bad uploads: clear errors, nothing lost, only the offender closed.
mod operations; // Storage failures, the demo schedule, fair shares among workers and jobs.

fn demo_hyper() -> Hyper {
    Hyper {
        target_accuracy: Some(0.95),
        ..Hyper::default()
    }
}

fn hello() -> WorkerMsg {
    WorkerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        name: Some("raw".into()),
        backend: Backend::Cpu,
        adapter: "test".into(),
        platform: Platform::Native,
    }
}

/// Every applied step's training metric must come from micro-batches with at least `min` agreeing workers.
async fn assert_all_steps_verified(server: &Server, job: u64, min: u64) -> anyhow::Result<usize> {
    let (_, metrics) = server.get(&format!("/api/v1/jobs/{job}/metrics")).await?;
    let rows = metrics
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("metrics is not a list: {metrics}"))?;
    let train: Vec<&serde_json::Value> = rows.iter().filter(|m| m["kind"] == "train").collect();
    assert!(!train.is_empty());
    for m in &train {
        assert!(
            m["min_agreeing"].as_u64().unwrap_or(0) >= min,
            "step {} applied with fewer than {min} agreeing workers",
            m["step"]
        );
    }
    Ok(train.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_train_the_demo_job_to_95_percent() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("train");
    create_demo_job(&dir.db(), demo_hyper()).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let started = Instant::now();
    let gpu = spawn_worker(
        server.ws_url(),
        BackendChoice::Gpu,
        "gpu-lavapipe",
        None,
        None,
        None,
    );
    let cpus: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("cpu-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let job = server
        .wait_job(1, Duration::from_secs(600), |j| j["status"] == "completed")
        .await?;
    let elapsed = started.elapsed();
    let acc = job["best_test_accuracy"].as_f64().unwrap();
    let steps = assert_all_steps_verified(&server, 1, 2).await?;
    let c = &job["counters"];
    println!(
        "trained to {:.2}% test accuracy in {:.1}s, {steps} verified steps; results accepted {} rejected {} late {}; workers: {}",
        100.0 * acc,
        elapsed.as_secs_f64(),
        c["results_accepted"],
        c["results_rejected"],
        c["results_late"],
        job["workers"]
    );
    assert!(acc >= 0.95, "best test accuracy {acc}");
    assert_eq!(
        c["results_rejected"], 0,
        "honest workers must never be rejected"
    );
    server.stop().await?;
    let gpu = join(gpu)?;
    println!("gpu worker: {:?}", gpu.stats);
    assert!(
        gpu.stats.accepted > 0,
        "the WGSL worker contributed accepted results"
    );
    for h in cpus {
        let r = join(h)?;
        assert!(
            r.stats.accepted > 0 && r.stats.rejected == 0,
            "{:?}",
            r.stats
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_workers_are_outvoted_and_refused() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("liars");
    create_demo_job(&dir.db(), demo_hyper()).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest: Vec<_> = (0..3)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("honest-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let flip: SendTamper = Box::new(|out| out.grad.iter_mut().for_each(|g| *g = -*g));
    let mut k = 0u32;
    let noise: SendTamper = Box::new(move |out| {
        for g in out.grad.iter_mut() {
            k = k.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *g += 1e-2 * ((k >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
        }
    });
    let flipper = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "sign-flipper",
        None,
        None,
        Some(flip),
    );
    let noiser = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "noiser",
        None,
        None,
        Some(noise),
    );
    let job = server
        .wait_job(1, Duration::from_secs(600), |j| j["status"] == "completed")
        .await?;
    assert!(job["best_test_accuracy"].as_f64().unwrap() >= 0.95);
    assert_all_steps_verified(&server, 1, 2).await?;
    for (name, h) in [("sign-flipper", flipper), ("noiser", noiser)] {
        let r = join(h)?;
        println!("{name}: {:?} closed by {:?}", r.stats, r.closed_by);
        assert_eq!(r.stats.accepted, 0, "{name} had a result accepted");
        assert!(
            r.closed_by.as_deref().unwrap_or("").contains("Refused"),
            "{name} was not refused: {:?}",
            r.closed_by
        );
    }
    let (_, workers) = server.get("/api/v1/workers").await?;
    for w in workers.as_array().unwrap() {
        let liar = ["sign-flipper", "noiser"].contains(&w["name"].as_str().unwrap_or(""));
        assert_eq!(w["refused"].as_bool().unwrap(), liar, "{w}");
        if liar {
            assert_eq!(w["credits"].as_f64().unwrap(), 0.0);
        }
    }
    server.stop().await?;
    for h in honest {
        assert_eq!(join(h)?.stats.rejected, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_and_expired_leases_are_reassigned_and_late_results_ignored() -> anyhow::Result<()>
{
    init_tracing();
    let dir = TempDir::new("churn");
    create_demo_job(
        &dir.db(),
        Hyper {
            steps: 30,
            lease_timeout_ms: 1000,
            ..Hyper::default()
        },
    )
    .await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;

    // A worker that takes a lease and vanishes (tab closed mid-lease).
    let mut vanisher = RawClient::connect(&server.ws_url()).await?;
    vanisher.send(&hello(), &[]).await?;
    vanisher.send(&WorkerMsg::Ready, &[]).await?;
    vanisher
        .recv_until(|m, _| matches!(m, CoordinatorMsg::Lease { .. }).then_some(()))
        .await?;
    drop(vanisher);

    // A worker that takes a lease, sits on it past its deadline, then answers late.
    let mut sleeper = RawClient::connect(&server.ws_url()).await?;
    sleeper.send(&hello(), &[]).await?;
    sleeper.send(&WorkerMsg::Ready, &[]).await?;
    let lease = sleeper
        .recv_until(|m, _| {
            if let CoordinatorMsg::Lease { lease, .. } = m {
                Some(*lease)
            } else {
                None
            }
        })
        .await?;

    let workers: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("steady-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let job = server
        .wait_job(1, Duration::from_secs(120), |j| j["status"] == "completed")
        .await?;
    assert_eq!(job["step"], 30);
    assert!(
        job["counters"]["leases_expired"].as_u64().unwrap() >= 1,
        "{}",
        job["counters"]
    );
    assert_all_steps_verified(&server, 1, 2).await?;

    sleeper
        .send(
            &WorkerMsg::Result {
                lease,
                loss: 1.0,
                correct: 0,
                commit: None,
            },
            &f32_bytes(&vec![0.0; 101_770]),
        )
        .await?;
    let outcome = sleeper
        .recv_until(|m, _| {
            if let CoordinatorMsg::Verdict { outcome, .. } = m {
                Some(*outcome)
            } else {
                None
            }
        })
        .await?;
    assert_eq!(outcome, Outcome::Late);
    server.stop().await?;
    for w in workers {
        join(w)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_checkpoint_with_credits_intact()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("restart");
    create_demo_job(
        &dir.db(),
        Hyper {
            steps: 120,
            ..Hyper::default()
        },
    )
    .await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let a = spawn_worker(server.ws_url(), BackendChoice::Cpu, "a", None, None, None);
    let b = spawn_worker(server.ws_url(), BackendChoice::Cpu, "b", None, None, None);
    server
        .wait_job(1, Duration::from_secs(120), |j| {
            j["step"].as_u64().unwrap() >= 40
        })
        .await?;
    server.stop().await?;
    let (a, b) = (join(a)?, join(b)?);
    // The worker saw the coordinator go: told so (`shutting_down`), or its in-flight write hit the closed socket.
    assert!(a.closed_by.is_some(), "{:?}", a.closed_by);

    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let (_, job) = server.get("/api/v1/jobs/1").await?;
    let resumed = job["step"].as_u64().unwrap();
    assert!(resumed >= 40, "resumed at step {resumed}");
    let (_, before) = server.get("/api/v1/workers").await?;
    let credits_of = |ws: &serde_json::Value, name: &str| {
        ws.as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap()["credits"]
            .as_f64()
            .unwrap()
    };
    // Credits are durable before their verdict is sent, so the worker's last-seen balance can only trail the store.
    assert!(
        credits_of(&before, "a") + 1e-9 >= a.stats.credits && a.stats.credits > 0.0,
        "credits survive the restart"
    );

    // The same volunteers come back with their tokens and finish the job.
    let a2 = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "a",
        a.token.clone(),
        None,
        None,
    );
    let b2 = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "b",
        b.token.clone(),
        None,
        None,
    );
    let job = server
        .wait_job(1, Duration::from_secs(120), |j| j["status"] == "completed")
        .await?;
    assert_eq!(job["step"], 120);
    assert_eq!(
        job["counters"]["steps_applied"].as_u64().unwrap(),
        120 - resumed,
        "no step was redone"
    );
    server.stop().await?;
    let (a2, b2) = (join(a2)?, join(b2)?);
    // Balances from the durable state, as a coordinator started on it again shows them: a running one's
    // `/workers` reads the store, whose last credit writes can still be in flight when the job shows
    // `completed` (the verdicts, sent after those writes, then carried more than the store had yet).
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let (_, after) = server.get("/api/v1/workers").await?;
    server.stop().await?;
    assert_eq!(
        after.as_array().unwrap().len(),
        2,
        "returning volunteers keep their identity"
    );
    for (w, r) in [("a", &a2), ("b", &b2)] {
        assert!(credits_of(&after, w) > credits_of(&before, w));
        assert!(credits_of(&after, w) + 1e-9 >= r.stats.credits);
    }
    // Every credit row is one accepted (worker, micro-batch). With two workers every micro-batch is computed by
    // both, so exactly 120 steps × 4 micro-batches × 2 workers: none lost, none doubled across the restart.
    let store = starling_coordinator::store::Store::open(&dir.db()).await?;
    let entries = store.credit_entries().await?;
    let total_rows: i64 = entries.iter().map(|e| e.1).sum();
    assert_eq!(total_rows, 120 * 4 * 2, "credit entries");
    for (w, _, flops) in &entries {
        let name = if after
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == w.0 && x["name"] == "a")
        {
            "a"
        } else {
            "b"
        };
        assert!(
            (credits_of(&after, name) - *flops as f64 / 1e9).abs() < 1e-6,
            "ledger and balance agree for {name}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_speculatively_cover_a_straggler() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("straggler");
    create_demo_job(
        &dir.db(),
        Hyper {
            steps: 12,
            ..Hyper::default()
        },
    )
    .await?;
    let mut config = ServeConfig::for_tests(dir.db());
    config.speculate_after_ms = 300;
    let server = Server::start(config).await?;
    // An honest but very slow volunteer: every result takes 2 s more than it should.
    let slow: SendTamper = Box::new(|_| std::thread::sleep(Duration::from_secs(2)));
    let straggler = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "straggler",
        None,
        None,
        Some(slow),
    );
    // The straggler takes the first lease before the fast workers arrive (12 steps pass in well under a second).
    server
        .wait_job(1, Duration::from_secs(30), |j| {
            j["counters"]["leases_issued"].as_u64().unwrap_or(0) >= 1
        })
        .await?;
    let fast: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("fast-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let job = server
        .wait_job(1, Duration::from_secs(120), |j| j["status"] == "completed")
        .await?;
    let c = &job["counters"];
    println!("straggler run: {c}");
    assert!(c["speculative_leases"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["results_rejected"], 0);
    assert_all_steps_verified(&server, 1, 2).await?;
    server.stop().await?;
    let s = join(straggler)?;
    assert!(
        s.stats.rejected == 0,
        "a slow honest worker is never penalised: {:?}",
        s.stats
    );
    for h in fast {
        join(h)?;
    }
    Ok(())
}
