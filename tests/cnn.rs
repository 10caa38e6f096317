//! A CNN job through the owner API: upload an image dataset, create a job with a spec v2 layer graph (bad specs
//! refused with the layer named), train it with native CPU workers and one liar, check the coordinator's own CPU
//! recomputation (arbitration and audits) accepts every honest result and strikes the liar, and download the
//! checkpoint with each layer's tensors in their documented shapes.

use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_core::rng::SplitMix64;
use starling_tests::{Server, TempDir, create_owner, init_tracing, spawn_worker};
use starling_worker::engine::BackendChoice;

/// 3×7×7 images in 3 classes: class `c` has a bright 3×3 blob in channel `c` at a random position, on noise.
fn images(rows: u32, seed: u64) -> Vec<u8> {
    let (c, h, w) = (3usize, 7usize, 7usize);
    let mut rng = SplitMix64::new(seed);
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..rows {
        let class = rng.below(3) as usize;
        let (y0, x0) = (rng.below(5) as usize, rng.below(5) as usize);
        let mut img: Vec<f32> = (0..c * h * w).map(|_| 0.2 * rng.normal() as f32).collect();
        for y in y0..y0 + 3 {
            for x in x0..x0 + 3 {
                img[(class * h + y) * w + x] += 1.0;
            }
        }
        features.extend(img);
        labels.push(class as u32);
    }
    let mut b = b"SDS1".to_vec();
    b.extend_from_slice(&rows.to_le_bytes());
    b.extend_from_slice(&((c * h * w) as u32).to_le_bytes());
    for v in features {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for l in labels {
        b.extend_from_slice(&l.to_le_bytes());
    }
    b
}

/// Odd channels, stride 2, padding, both pools and both norms, gelu: every layer kind a worker must run.
const SPEC: &str = r#"{"input": [3, 7, 7], "layers": [
    {"type": "conv2d", "out_channels": 5, "kernel": 3, "padding": 1}, {"type": "group_norm", "groups": 5},
    {"type": "relu"}, {"type": "max_pool2d", "kernel": 2, "stride": 1},
    {"type": "conv2d", "out_channels": 7, "kernel": 3, "stride": 2, "padding": 1}, {"type": "gelu"},
    {"type": "avg_pool2d", "kernel": 2}, {"type": "flatten"},
    {"type": "dense", "units": 16}, {"type": "layer_norm"}, {"type": "relu"}, {"type": "dense", "units": 3}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cnn_job_trains_on_native_workers_and_exports_its_layers() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("cnn");
    let alice = create_owner(&dir.db(), "alice").await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let (status, ds) = server
        .post_as(
            &alice,
            "/api/v1/datasets?name=blobs&test_fraction=0.25",
            "application/octet-stream",
            &images(400, 1),
        )
        .await?;
    assert_eq!(status, 201, "upload: {ds}");
    assert_eq!(ds["dim"], 147);
    let dataset = ds["id"].as_i64().expect("dataset id");
    let spec: serde_json::Value = serde_json::from_str(SPEC)?;
    let job = |spec: &serde_json::Value| {
        serde_json::json!({"name": "blobs-cnn", "spec": spec, "dataset": dataset, "hyper": {
            "global_batch": 32, "micro_batch": 16, "steps": 40, "eval_every": 10, "audit": 1.0,
            "optimizer": {"kind": "adam", "lr": 0.01}}})
        .to_string()
    };

    // Bad specs are refused before anything is stored, naming the layer and the reason.
    let mut dense_on_image = spec.clone();
    dense_on_image["layers"]
        .as_array_mut()
        .expect("layers")
        .remove(7);
    let (status, err) = server
        .post_as(
            &alice,
            "/api/v1/jobs",
            "application/json",
            job(&dense_on_image).as_bytes(),
        )
        .await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("bad_spec")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("message")
            .contains("layer 7 (dense): dense needs a flat input"),
        "{err}"
    );
    let mut wrong_input = spec.clone();
    wrong_input["input"] = serde_json::json!([1, 12, 12]);
    let (status, err) = server
        .post_as(
            &alice,
            "/api/v1/jobs",
            "application/json",
            job(&wrong_input).as_bytes(),
        )
        .await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("shape_mismatch")),
        "{err}"
    );

    let (status, created) = server
        .post_as(
            &alice,
            "/api/v1/jobs",
            "application/json",
            job(&spec).as_bytes(),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().expect("job id");
    assert_eq!(
        created["param_count"],
        140 + 10 + 322 + 16 * 7 + 16 + 32 + 51
    );
    let honest: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("cnn-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    // A liar sends the negated gradient: only the coordinator's recomputation of the CNN can tell who is right.
    let liar = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "liar",
        None,
        None,
        Some(Box::new(|out: &mut starling_core::StepOutput| {
            out.grad.iter_mut().for_each(|g| *g = -*g)
        })),
    );
    let done = server
        // The last step's evaluation runs off the scheduler's lock: wait for it too, not just for the last step.
        .wait_job(id, Duration::from_secs(120), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == 40
        })
        .await?;
    let counters = &done["counters"];
    assert!(
        counters["results_rejected"].as_u64() >= Some(1),
        "the liar was struck: {counters}"
    );
    assert!(counters["arbitrations"].as_u64() >= Some(1), "{counters}");
    // With `audit: 1`, every micro-batch the honest pair settled alone was recomputed too, and none failed.
    assert!(counters["audits"].as_u64() >= Some(40), "{counters}");
    assert_eq!(counters["audit_failures"], 0, "{counters}");
    assert!(
        counters["micro_batches_accepted"].as_u64() >= Some(2 * 40),
        "{counters}"
    );
    let accuracy = done["best_test_accuracy"].as_f64().expect("evaluated");
    assert!(accuracy > 0.8, "the CNN learned the blobs: {accuracy}");

    // The checkpoint: each layer's tensors in their documented shapes, the conv weight [out_c, in_c, k, k].
    let ckpt = server
        .client(Some(&alice))
        .get(&format!("/api/v1/jobs/{id}/checkpoint"))
        .await?;
    assert_eq!(ckpt.status, 200);
    let header_len = u64::from_le_bytes(ckpt.body[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&ckpt.body[8..8 + header_len])?;
    for (name, shape) in [
        ("layers.0.weight", vec![5, 3, 3, 3]),
        ("layers.0.bias", vec![5]),
        ("layers.1.weight", vec![5]),
        ("layers.1.bias", vec![5]),
        ("layers.4.weight", vec![7, 5, 3, 3]),
        ("layers.4.bias", vec![7]),
        ("layers.8.weight", vec![7, 16]),
        ("layers.8.bias", vec![16]),
        ("layers.9.weight", vec![16]),
        ("layers.9.bias", vec![16]),
        ("layers.11.weight", vec![16, 3]),
        ("layers.11.bias", vec![3]),
    ] {
        assert_eq!(
            header[name]["shape"],
            serde_json::json!(shape),
            "{name} in {header}"
        );
        assert_eq!(header[name]["dtype"], "F32");
    }
    let names = header
        .as_object()
        .expect("header")
        .keys()
        .filter(|k| *k != "__metadata__")
        .count();
    assert_eq!(names, 12, "no tensors for parameter-free layers: {header}");
    let meta_spec: serde_json::Value = serde_json::from_str(
        header["__metadata__"]["starling.spec"]
            .as_str()
            .expect("spec"),
    )?;
    assert_eq!(meta_spec["layers"][0]["type"], "conv2d");
    // γ of the group norm moved away from its initial 1 (so the tensors are the trained ones, in place).
    let [start, end] = [0, 1].map(|i| {
        header["layers.1.weight"]["data_offsets"][i]
            .as_u64()
            .expect("offset") as usize
    });
    let gamma: Vec<f32> = ckpt.body[8 + header_len + start..8 + header_len + end]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    assert!(gamma.iter().any(|g| (g - 1.0).abs() > 1e-3), "{gamma:?}");
    server.stop().await?;
    for w in honest {
        let report = w.join().expect("worker thread")?;
        assert_eq!(
            report.stats.rejected, 0,
            "an honest CNN result was rejected: {:?}",
            report.stats
        );
        assert!(report.stats.accepted > 0);
    }
    let report = liar.join().expect("worker thread")?;
    assert!(
        report.stats.rejected >= 1 && report.stats.accepted == 0,
        "{:?}",
        report.stats
    );
    Ok(())
}

/// `serve --demo --demo-cnn`: both demo jobs, on one stored copy of the digits, the CNN with its documented size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_cnn_offers_the_cnn_job_beside_the_mlp() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("demo-cnn");
    let mut config = ServeConfig::for_tests(dir.db());
    (config.demo, config.demo_cnn) = (true, true);
    let server = Server::start(config).await?;
    // The listener is bound before the demo jobs are created; the first answer comes once they are.
    let (status, _) = server.get("/api/v1/jobs").await?;
    assert_eq!(status, 200);
    let token = std::fs::read_to_string(dir.db().with_extension("demo-token"))?;
    let (status, jobs) = server.get_as(token.trim(), "/api/v1/jobs").await?;
    assert_eq!(status, 200, "{jobs}");
    let jobs = jobs.as_array().expect("a list");
    let by_name = |name: &str| jobs.iter().find(|j| j["name"] == name).expect(name);
    let (mlp, cnn) = (
        by_name(starling_coordinator::DEMO_JOB),
        by_name(starling_coordinator::DEMO_CNN_JOB),
    );
    assert_eq!(mlp["param_count"], 101_770);
    assert_eq!(cnn["param_count"], 218_490);
    assert_eq!(
        (cnn["train_rows"].as_u64(), cnn["test_rows"].as_u64()),
        (Some(8000), Some(2000))
    );
    assert_eq!(cnn["spec"]["input"], serde_json::json!([1, 28, 28]));
    assert_eq!(cnn["hyper"]["global_batch"], 64);
    let (_, datasets) = server.get_as(token.trim(), "/api/v1/datasets").await?;
    assert_eq!(
        datasets.as_array().map(Vec::len),
        Some(1),
        "one stored copy of the digits: {datasets}"
    );
    server.stop().await
}
