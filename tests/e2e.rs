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
    let (_, after) = server.get("/api/v1/workers").await?;
    assert_eq!(
        after.as_array().unwrap().len(),
        2,
        "returning volunteers keep their identity"
    );
    server.stop().await?;
    let (a2, b2) = (join(a2)?, join(b2)?);
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
async fn bad_frames_close_only_the_offending_connection() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("frames");
    create_demo_job(
        &dir.db(),
        Hyper {
            steps: 100_000,
            ..Hyper::default()
        },
    )
    .await?;
    let mut config = ServeConfig::for_tests(dir.db());
    config.max_frame_bytes = 1024 * 1024;
    let server = Server::start(config).await?;
    let honest: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("h{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    server
        .wait_job(1, Duration::from_secs(60), |j| {
            j["step"].as_u64().unwrap() >= 5
        })
        .await?;

    async fn expect_error(
        server: &Server,
        frames: Vec<Message>,
        want: ErrorCode,
    ) -> anyhow::Result<()> {
        let mut c = RawClient::connect(&server.ws_url()).await?;
        for f in frames {
            c.send_raw(f).await?;
        }
        let code = c
            .recv_until(|m, _| {
                if let CoordinatorMsg::Error { code, .. } = m {
                    Some(*code)
                } else {
                    None
                }
            })
            .await?;
        assert_eq!(code, want);
        assert!(
            c.recv().await?.is_none(),
            "connection closed after the error"
        );
        Ok(())
    }
    let hello_text = match starling_core::protocol::encode(&hello(), &[]) {
        starling_core::protocol::WireFrame::Text(t) => t,
        _ => unreachable!(),
    };
    expect_error(
        &server,
        vec![Message::text("this is not json")],
        ErrorCode::BadFrame,
    )
    .await?;
    expect_error(
        &server,
        vec![Message::binary(vec![1u8, 2])],
        ErrorCode::BadFrame,
    )
    .await?;
    expect_error(
        &server,
        vec![Message::text(r#"{"type":"ready"}"#)],
        ErrorCode::OutOfProtocol,
    )
    .await?;
    expect_error(
        &server,
        vec![Message::text(
            r#"{"type":"hello","protocol":999,"backend":"cpu","adapter":"x","platform":"native"}"#,
        )],
        ErrorCode::ProtocolVersion,
    )
    .await?;
    expect_error(
        &server,
        vec![
            Message::text(hello_text.clone()),
            Message::text(r#"{"type":"result","lease":1,"loss":1,"correct":0}"#),
        ],
        ErrorCode::BadFrame,
    )
    .await?;

    // Oversized: the server cuts the connection (tungstenite enforces the limit while reading).
    let mut big = RawClient::connect(&server.ws_url()).await?;
    big.send(&hello(), &[]).await?;
    let _ = big
        .send_raw(Message::binary(vec![0u8; 2 * 1024 * 1024]))
        .await;
    let mut closed = false;
    for _ in 0..10 {
        match big.recv().await {
            Ok(Some((CoordinatorMsg::Error { code, .. }, _))) => assert_eq!(code, ErrorCode::Limit),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "oversized sender was disconnected");

    // A wrong-length and a NaN gradient are rejected (with a strike), not crashes.
    let mut liar = RawClient::connect(&server.ws_url()).await?;
    liar.send(&hello(), &[]).await?;
    liar.send(&WorkerMsg::Ready, &[]).await?;
    for bad in [f32_bytes(&[1.0; 10]), f32_bytes(&vec![f32::NAN; 101_770])] {
        let lease: LeaseId = liar
            .recv_until(|m, _| {
                if let CoordinatorMsg::Lease { lease, .. } = m {
                    Some(*lease)
                } else {
                    None
                }
            })
            .await?;
        liar.send(
            &WorkerMsg::Result {
                lease,
                loss: 0.5,
                correct: 1,
                commit: None,
            },
            &bad,
        )
        .await?;
        let outcome = liar
            .recv_until(|m, _| {
                if let CoordinatorMsg::Verdict { outcome, .. } = m {
                    Some(*outcome)
                } else {
                    None
                }
            })
            .await?;
        assert_eq!(outcome, Outcome::Rejected);
        liar.send(&WorkerMsg::Ready, &[]).await?;
    }

    // Honest workers kept training throughout; the API still answers.
    let (_, before) = server.get("/api/v1/jobs/1").await?;
    let s0 = before["step"].as_u64().unwrap();
    server
        .wait_job(1, Duration::from_secs(60), |j| {
            j["step"].as_u64().unwrap() >= s0 + 5
        })
        .await?;
    let (status, health) = server.get("/api/v1/health").await?;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    server.stop().await?;
    for h in honest {
        assert_eq!(join(h)?.stats.rejected, 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_upload_datasets_and_create_jobs_with_clear_errors() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("api");
    let token = create_owner(&dir.db(), "alice").await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    // A small separable problem: 2 features, 3 classes.
    let rows = 300;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for i in 0..rows {
        let c = (i % 3) as u32;
        features.extend_from_slice(&[
            c as f32 + 0.1 * ((i * 7 % 10) as f32 / 10.0),
            1.0 - c as f32,
        ]);
        labels.push(c);
    }
    let ds = Dataset::new(features, labels, 2).unwrap();
    let st = encode_safetensors(
        &[
            ("features", vec![rows, 2], TensorData::F32(&ds.features)),
            ("labels", vec![rows], TensorData::U32(&ds.labels)),
        ],
        &Default::default(),
    )?;
    let (code, up) = server
        .post_as(
            &token,
            "/api/v1/datasets?name=toy",
            "application/octet-stream",
            &st,
        )
        .await?;
    assert_eq!(code, 201, "{up}");
    assert_eq!(
        (
            up["train_rows"].as_u64(),
            up["test_rows"].as_u64(),
            up["classes"].as_u64()
        ),
        (Some(240), Some(60), Some(3))
    );
    let (code, raw) = server
        .post_as(
            &token,
            "/api/v1/datasets",
            "application/octet-stream",
            &encode_raw(&ds),
        )
        .await?;
    assert_eq!(code, 201, "{raw}");

    let (code, err) = server
        .post_as(
            &token,
            "/api/v1/datasets",
            "application/octet-stream",
            b"garbage!garbage!",
        )
        .await?;
    assert_eq!(
        (code, err["error"]["code"].as_str()),
        (422, Some("bad_dataset"))
    );

    let spec = serde_json::json!({"input": 2, "layers": [{"units": 16, "activation": "relu"}, {"units": 3, "activation": "none"}]});
    let job = |spec: serde_json::Value, dataset: i64, hyper: serde_json::Value| {
        serde_json::to_vec(
            &serde_json::json!({"name": "toy", "spec": spec, "dataset": dataset, "hyper": hyper}),
        )
        .unwrap()
    };
    let ok_hyper = serde_json::json!({"global_batch": 32, "micro_batch": 16, "steps": 20});
    let cases = [
        (
            job(
                serde_json::json!({"input": 2, "layers": []}),
                1,
                ok_hyper.clone(),
            ),
            "bad_spec",
        ),
        (
            job(
                serde_json::json!({"input": 2, "layers": [{"units": 3, "activation": "gelu"}]}),
                1,
                ok_hyper.clone(),
            ),
            "bad_spec",
        ),
        (job(spec.clone(), 99, ok_hyper.clone()), "unknown_dataset"),
        (
            job(
                serde_json::json!({"input": 5, "layers": [{"units": 3, "activation": "none"}]}),
                1,
                ok_hyper.clone(),
            ),
            "shape_mismatch",
        ),
        (
            job(
                serde_json::json!({"input": 2, "layers": [{"units": 2, "activation": "none"}]}),
                1,
                ok_hyper.clone(),
            ),
            "shape_mismatch",
        ),
        (
            job(spec.clone(), 1, serde_json::json!({"redundancy": 1})),
            "bad_hyper",
        ),
        (
            job(spec.clone(), 1, serde_json::json!({"global_batch": 10000})),
            "bad_hyper",
        ),
        (b"{not json".to_vec(), "bad_request"),
    ];
    for (body, want) in cases {
        let (code, err) = server
            .post_as(&token, "/api/v1/jobs", "application/json", &body)
            .await?;
        assert_eq!(
            (code, err["error"]["code"].as_str()),
            (422, Some(want)),
            "{err}"
        );
    }
    let (_, jobs) = server.get("/api/v1/jobs").await?;
    assert_eq!(
        jobs.as_array().unwrap().len(),
        0,
        "rejected requests create nothing"
    );

    // SGD with momentum here (the demo uses Adam), so both optimizers train end to end.
    let train_hyper = serde_json::json!({"global_batch": 32, "micro_batch": 16, "steps": 150, "eval_every": 50, "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9}});
    let (code, created) = server
        .post_as(
            &token,
            "/api/v1/jobs",
            "application/json",
            &job(spec, 1, train_hyper),
        )
        .await?;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let w: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("t{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    let done = server
        .wait_job(id, Duration::from_secs(60), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == 150
        })
        .await?;
    assert_eq!(done["step"], 150);
    assert!(
        done["last_eval"]["accuracy"].as_f64().unwrap() > 0.9,
        "{}",
        done["last_eval"]
    );
    let (code, _) = server.get("/api/v1/jobs/999").await?;
    assert_eq!(code, 404);
    server.stop().await?;
    for h in w {
        join(h)?;
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
