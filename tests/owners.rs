//! Owners over the real HTTP API: tokens are required and scoped, the job lifecycle works, checkpoints export,
//! live events push, and `/metrics` speaks Prometheus.

use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_tests::*;
use starling_worker::engine::BackendChoice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scope_jobs_and_the_lifecycle_works() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("owners");
    let demo = create_demo_job(
        &dir.db(),
        Hyper {
            steps: 400,
            ..Hyper::default()
        },
    )
    .await?;
    let mallory = create_owner(&dir.db(), "mallory").await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;

    // No token: public progress only. Wrong token: 401. Another owner's job: 404 (its existence does not leak).
    let (code, public) = server.get("/api/v1/jobs/1").await?;
    assert_eq!(code, 200);
    assert_eq!(public["owned"], false);
    assert!(
        public.get("hyper").is_none() && public.get("spec").is_none(),
        "{public}"
    );
    let (code, err) = server.get_as("stk_wrong", "/api/v1/jobs/1").await?;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = server.get_as(&mallory, "/api/v1/jobs/1").await?;
    assert_eq!(code, 404);
    let (_, mine) = server.get_as(&mallory, "/api/v1/jobs").await?;
    assert_eq!(
        mine.as_array().unwrap().len(),
        0,
        "mallory sees none of demo's jobs"
    );
    for action in ["pause", "resume", "cancel"] {
        let (code, _) = server
            .post(&format!("/api/v1/jobs/1/{action}"), "application/json", b"")
            .await?;
        assert_eq!(code, 401, "{action} without a token");
        let (code, _) = server
            .post_as(
                &mallory,
                &format!("/api/v1/jobs/1/{action}"),
                "application/json",
                b"",
            )
            .await?;
        assert_eq!(code, 404, "{action} by another owner");
    }
    let (code, _) = server.get_as(&mallory, "/api/v1/jobs/1/checkpoint").await?;
    assert_eq!(code, 404);
    let (code, _) = server
        .post("/api/v1/datasets", "application/octet-stream", b"SDS1")
        .await?;
    assert_eq!(code, 401, "uploads need a token");
    // Oversized bodies are refused (413). One byte over the 1 MiB limit: the coordinator answers as soon as the
    // limit is passed and closes the connection, so a client still writing a much larger body can see a broken
    // pipe instead of the answer (a race in the test, not in the coordinator).
    let (code, _) = server
        .post_as(
            &demo,
            "/api/v1/jobs",
            "application/json",
            &vec![b' '; 1024 * 1024 + 1],
        )
        .await?;
    assert_eq!(code, 413);
    let (code, owned) = server.get_as(&demo, "/api/v1/jobs/1").await?;
    assert_eq!((code, &owned["owned"]), (200, &serde_json::json!(true)));
    assert_eq!(owned["hyper"]["steps"], 400);

    // Live events: subscribe before training starts and see the step advance without asking again.
    let client = server.client(Some(&demo));
    // The token in the query, as a browser's EventSource (which cannot set headers) sends it.
    let events = tokio::task::spawn_blocking({
        let (sse, path) = (
            server.client(None),
            format!("/api/v1/jobs/1/events?token={demo}"),
        );
        move || read_sse_steps(&sse, &path, 3)
    });
    let workers: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("w{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    server
        .wait_job(1, Duration::from_secs(60), |j| {
            j["step"].as_u64().unwrap() >= 30
        })
        .await?;
    let steps = tokio::time::timeout(Duration::from_secs(30), events).await???;
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]) && steps.last() > steps.first(),
        "pushed steps {steps:?}"
    );

    // Pause: no new leases. Resume: training continues. Cancel: terminal.
    let r = client
        .post("/api/v1/jobs/1/pause", "application/json", b"")
        .await?;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("paused"))
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, a) = server.get("/api/v1/jobs/1").await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, b) = server.get("/api/v1/jobs/1").await?;
    assert_eq!(
        a["counters"]["leases_issued"], b["counters"]["leases_issued"],
        "no leases while paused"
    );
    let r = client
        .post("/api/v1/jobs/1/resume", "application/json", b"")
        .await?;
    assert_eq!(r.json()["status"], "running");
    let s = b["step"].as_u64().unwrap();
    server
        .wait_job(1, Duration::from_secs(60), |j| {
            j["step"].as_u64().unwrap() >= s + 20
        })
        .await?;

    // Metrics history, Prometheus text, and the checkpoint download.
    let (_, metrics) = server.get_as(&demo, "/api/v1/jobs/1/metrics").await?;
    assert!(
        metrics
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["kind"] == "eval")
    );
    let prom = server.client(None).get("/metrics").await?;
    let text = String::from_utf8(prom.body)?;
    for needle in [
        "starling_workers_connected{backend=\"cpu\"} 2",
        "starling_results_accepted_total{job=\"1\"}",
        "starling_step_duration_seconds_bucket{le=\"+Inf\"}",
        "starling_leases_expired_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let ckpt = client.get("/api/v1/jobs/1/checkpoint?which=latest").await?;
    assert_eq!(ckpt.status, 200);
    let header_len = u64::from_le_bytes(ckpt.body[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&ckpt.body[8..8 + header_len])?;
    assert_eq!(
        header["layers.0.weight"]["shape"],
        serde_json::json!([784, 128])
    );
    assert_eq!(header["layers.1.bias"]["shape"], serde_json::json!([10]));
    assert!(
        header["__metadata__"]["starling.spec"]
            .as_str()
            .unwrap()
            .contains("relu")
    );
    let best = client.get("/api/v1/jobs/1/checkpoint?which=best").await?;
    assert_eq!(best.status, 200, "an evaluated version exists by now");
    let bad = client.get("/api/v1/jobs/1/checkpoint?which=oldest").await?;
    assert_eq!(bad.status, 422);

    let r = client
        .post("/api/v1/jobs/1/cancel", "application/json", b"")
        .await?;
    assert_eq!(r.json()["status"], "cancelled");
    let r = client
        .post("/api/v1/jobs/1/resume", "application/json", b"")
        .await?;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    let (_, after) = server.get("/api/v1/jobs/1").await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, later) = server.get("/api/v1/jobs/1").await?;
    assert_eq!(
        after["counters"]["leases_issued"], later["counters"]["leases_issued"],
        "a cancelled job leases nothing"
    );
    server.stop().await?;
    for w in workers {
        join(w)?;
    }
    // The status survives a restart.
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let (_, j) = server.get("/api/v1/jobs/1").await?;
    assert_eq!(j["status"], "cancelled");
    server.stop().await?;
    Ok(())
}

/// Reads `n` `job` events from the SSE stream and returns their (distinct) steps.
fn read_sse_steps(client: &Client, path: &str, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut steps = Vec::new();
    for data in client.events(path)? {
        let v: serde_json::Value = serde_json::from_str(&data?)?;
        let step = v["step"].as_u64().unwrap_or(0);
        if steps.last() != Some(&step) {
            steps.push(step);
            if steps.len() == n {
                return Ok(steps);
            }
        }
    }
    anyhow::bail!("event stream ended after steps {steps:?}")
}
