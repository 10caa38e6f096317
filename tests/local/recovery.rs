//! A `local` job across a coordinator restart (the round in progress resumes from its durable leases; workers that
//! reconnect get the full model, then deltas again), and a v1 worker on a `sync` job beside a `local` job.

use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_core::ModelSpec;
use starling_core::protocol::{
    Backend, CoordinatorMsg, PROTOCOL_VERSION, Platform, Quant, WorkerMsg,
};
use starling_tests::*;
use starling_worker::engine::BackendChoice;

use super::{assert_rounds_verified, local_hyper};

fn cpu_workers(
    server: &Server,
    tag: &str,
    n: usize,
) -> Vec<std::thread::JoinHandle<anyhow::Result<starling_worker::native::WorkerReport>>> {
    (0..n)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("{tag}-{i}"),
                None,
                None,
                None,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_round_resumes_the_round() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("local-restart");
    let mut hyper = local_hyper(8, 16, Quant::Int8);
    hyper.eval_every = 4;
    create_demo_job(&dir.db(), hyper).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let first = cpu_workers(&server, "before", 2);
    let before = server
        .wait_job(1, Duration::from_secs(300), |j| {
            j["step"].as_u64() >= Some(6)
        })
        .await?;
    server.stop().await?;
    for h in first {
        let r = join(h)?;
        assert_eq!(r.stats.rejected, 0, "{:?}", r.stats);
    }
    let stopped_at = before["step"].as_u64().unwrap_or(0);
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let (_, resumed) = server.get("/api/v1/jobs/1").await?;
    assert!(
        resumed["step"].as_u64() >= Some(stopped_at),
        "resumed at {} after stopping at {stopped_at}",
        resumed["step"]
    );
    let second = cpu_workers(&server, "after", 2);
    let job = server
        .wait_job(1, Duration::from_secs(300), |j| j["status"] == "completed")
        .await?;
    let rounds = assert_rounds_verified(&server, 1, 2).await?;
    assert_eq!(rounds, 16, "every round applied once, across the restart");
    assert_eq!(job["counters"]["results_rejected"], 0);
    let acc = job["best_test_accuracy"].as_f64().unwrap_or(0.0);
    println!(
        "resumed at {} of 16 rounds; best accuracy {acc}",
        resumed["step"]
    );
    assert!(acc > 0.85, "best accuracy {acc}");
    server.stop().await?;
    for h in second {
        let r = join(h)?;
        assert_eq!(r.stats.rejected, 0, "{:?}", r.stats);
        assert!(
            r.stats.full_models >= 1,
            "a reconnecting worker gets the full model first"
        );
    }
    Ok(())
}

/// A v1 worker (it names protocol 1) is welcomed with 1 and only ever leased the `sync` job's micro-batches, while
/// v2 workers train the `local` job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_worker_gets_sync_leases_beside_a_local_job() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("local-v1");
    let token = create_demo_job(&dir.db(), local_hyper(8, 200, Quant::Int8)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let spec = serde_json::to_value(ModelSpec::mnist_mlp())?;
    let body = serde_json::json!({"name": "sync-beside", "spec": spec, "dataset": 1, "hyper": {"steps": 200}});
    let (status, created) = server
        .post_as(
            &token,
            "/api/v1/jobs",
            "application/json",
            body.to_string().as_bytes(),
        )
        .await?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "job creation: {status} {created}"
    );
    let sync_job = created["id"].as_u64().unwrap_or(0);
    let v2 = cpu_workers(&server, "v2", 2);
    let mut raw = RawClient::connect(&server.ws_url()).await?;
    raw.send(
        &WorkerMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: None,
            name: Some("v1".into()),
            backend: Backend::Cpu,
            adapter: "test".into(),
            platform: Platform::Native,
        },
        &[],
    )
    .await?;
    let picked = raw
        .recv_until(|m, _| match m {
            CoordinatorMsg::Welcome { protocol, .. } => Some(*protocol),
            _ => None,
        })
        .await?;
    assert_eq!(picked, PROTOCOL_VERSION);
    raw.send(&WorkerMsg::Ready, &[]).await?;
    let leased = raw
        .recv_until(|m, _| match m {
            CoordinatorMsg::Lease { job, .. } => Some(job.0),
            CoordinatorMsg::LocalLease { .. } | CoordinatorMsg::ModelDelta { .. } => Some(u64::MAX),
            _ => None,
        })
        .await?;
    assert_eq!(leased, sync_job, "a v1 worker is leased only the sync job");
    server
        .wait_job(1, Duration::from_secs(300), |j| {
            j["step"].as_u64() >= Some(3)
        })
        .await?;
    drop(raw);
    server.stop().await?;
    for h in v2 {
        let r = join(h)?;
        assert_eq!(r.stats.protocol, 2);
        assert_eq!(r.stats.rejected, 0, "{:?}", r.stats);
    }
    Ok(())
}
