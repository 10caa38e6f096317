//! A language-model job through the owner API (issue 13): upload an `STK1` token dataset (bad ones refused
//! clearly), create a transformer job on it, train it with two native CPU workers and a liar, check the
//! coordinator's CPU recomputation strikes the liar and accepts every honest result, the held-out loss (nats per
//! character) falls, a sample comes back as text, and the export carries the vocabulary; the same in `local` mode
//! over token windows, with `which=best` by held-out loss; `serve --demo-lm`.

use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_core::tokens::{TokenDataset, char_dataset, encode_tokens};
use starling_core::transformer::LmSpec;
use starling_core::transformer::export::from_safetensors;
use starling_tests::{Server, TempDir, create_owner, init_tracing, spawn_worker};
use starling_worker::engine::BackendChoice;

/// A small English-like text: a few sentences in a seeded order, so the model has something to learn.
fn text() -> String {
    let sentences = [
        "the cat sat on the mat. ",
        "a dog ran to the sea. ",
        "the whale swam far away. ",
        "call me ishmael. ",
    ];
    let mut rng = starling_core::rng::SplitMix64::new(7);
    (0..160)
        .map(|_| sentences[rng.below(sentences.len() as u64) as usize])
        .collect()
}

fn tiny_lm(vocab: u32) -> LmSpec {
    LmSpec {
        vocab,
        context: 12,
        width: 24,
        heads: 3,
        layers: 1,
        tied: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lm_job_trains_on_native_workers_strikes_a_liar_and_samples_text() -> anyhow::Result<()>
{
    init_tracing();
    let dir = TempDir::new("lm");
    let alice = create_owner(&dir.db(), "alice").await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let upload = |bytes: Vec<u8>| {
        let (server, alice) = (&server, &alice);
        async move {
            server
                .post_as(
                    alice,
                    "/api/v1/datasets?name=sentences&test_fraction=0.15",
                    "application/octet-stream",
                    &bytes,
                )
                .await
        }
    };

    // Bad token uploads are refused with the reason.
    let ds = char_dataset(&text(), 12, 0.0)?;
    let mut bytes = encode_tokens(&ds, 2)?;
    let at = bytes.len() - 2 * (ds.tokens.len() - 5);
    bytes[at..at + 2].copy_from_slice(&((ds.vocab_size + 3) as u16).to_le_bytes());
    let (status, err) = upload(bytes).await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("bad_dataset")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("token id") && m.contains("position 5")),
        "{err}"
    );
    let short = TokenDataset::new(
        ds.tokens[..20].to_vec(),
        ds.vocab_size,
        12,
        0,
        ds.vocab.clone(),
    )?;
    let (status, err) = upload(encode_tokens(&short, 4)?).await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("bad_dataset")),
        "{err}"
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("fewer than context + 1")),
        "{err}"
    );

    let (status, up) = upload(encode_tokens(&ds, 2)?).await?;
    assert_eq!(status, 201, "upload: {up}");
    let n = ds.tokens.len() as u64;
    let held = (0.15 * n as f64).ceil() as u64;
    assert_eq!(up["kind"], "tokens");
    assert_eq!(up["context"], 12);
    assert_eq!(up["vocab_size"], ds.vocab_size);
    assert_eq!(
        (up["train_tokens"].as_u64(), up["test_tokens"].as_u64()),
        (Some(n - held), Some(held))
    );
    assert_eq!(up["train_rows"].as_u64(), Some(n - held - 12), "windows");
    let dataset = up["id"].as_i64().expect("dataset id");
    let (_, listed) = server.get_as(&alice, "/api/v1/datasets").await?;
    assert_eq!(listed[0]["kind"], "tokens", "{listed}");
    assert_eq!(
        listed[0]["train_rows"].as_u64(),
        Some(n - held - 12),
        "{listed}"
    );
    assert_eq!(listed[0]["test_rows"].as_u64(), Some(held - 12), "{listed}");

    let lm = tiny_lm(ds.vocab_size);
    let job = |spec: serde_json::Value, mode: &str| {
        serde_json::json!({"name": "sentences-lm", "spec": spec, "dataset": dataset, "hyper": {
            "global_batch": 16, "micro_batch": 8, "steps": 30, "eval_every": 10, "audit": 1.0, "mode": mode,
            "optimizer": {"kind": "adam", "lr": 0.01}}})
        .to_string()
    };
    let create = |body: String| {
        let (server, alice) = (&server, &alice);
        async move {
            server
                .post_as(alice, "/api/v1/jobs", "application/json", body.as_bytes())
                .await
        }
    };
    // A context other than the dataset's, and a classifier on tokens, are refused.
    let wrong_context = LmSpec { context: 8, ..lm };
    let (status, err) = create(job(
        serde_json::to_value(wrong_context.model_spec())?,
        "sync",
    ))
    .await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("shape_mismatch")),
        "{err}"
    );
    let mlp =
        serde_json::json!({"input": 12, "layers": [{"type": "dense", "units": ds.vocab_size}]});
    let (status, err) = create(job(mlp, "sync")).await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("shape_mismatch")),
        "{err}"
    );

    let (status, created) = create(job(serde_json::to_value(lm.model_spec())?, "sync")).await?;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["language_model"], true);
    assert_eq!(
        created["param_count"].as_u64(),
        Some(lm.param_count() as u64)
    );
    let id = created["id"].as_u64().expect("job id");
    let honest: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("lm-{i}"),
                None,
                None,
                None,
            )
        })
        .collect();
    // A liar scales its gradient: only the coordinator's recomputation of the transformer can tell who is right.
    let liar = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "liar",
        None,
        None,
        Some(Box::new(|out: &mut starling_core::StepOutput| {
            out.grad.iter_mut().for_each(|g| *g *= 1.5)
        })),
    );
    let done = server
        .wait_job(id, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == 30
        })
        .await?;
    let counters = &done["counters"];
    assert!(
        counters["results_rejected"].as_u64() >= Some(1),
        "the liar was struck: {counters}"
    );
    assert!(counters["audits"].as_u64() >= Some(30), "{counters}");
    assert_eq!(counters["audit_failures"], 0, "{counters}");

    // The held-out loss (nats per character) fell from the uniform guess to well below it.
    let (_, metrics) = server
        .get_as(&alice, &format!("/api/v1/jobs/{id}/metrics"))
        .await?;
    let evals: Vec<(u64, f64)> = metrics
        .as_array()
        .expect("metrics")
        .iter()
        .filter(|m| m["kind"] == "eval")
        .map(|m| {
            (
                m["step"].as_u64().unwrap_or(0),
                m["loss"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    let uniform = (ds.vocab_size as f64).ln();
    let last = evals.last().expect("evaluated").1;
    assert!(
        evals.len() >= 3 && last < evals[0].1 && last < 0.8 * uniform,
        "held-out loss fell below ln(V) = {uniform:.3}: {evals:?}"
    );

    // A sample: text from the vocabulary, the same for the same seed; a bad prompt is refused.
    let client = server.client(Some(&alice));
    let ask = |q: &str| {
        let (client, path) = (&client, format!("/api/v1/jobs/{id}/sample?{q}"));
        async move { client.get(&path).await }
    };
    let a = ask("prompt=the%20&tokens=40&temperature=0.5&seed=3").await?;
    assert_eq!(a.status, 200, "{:?}", a.json());
    let sample = a.json();
    let text = sample["text"].as_str().expect("text");
    assert_eq!(text.chars().count(), 40, "{sample}");
    assert!(
        text.chars()
            .all(|c| c == ' ' || c == '.' || c.is_ascii_lowercase()),
        "{text:?}"
    );
    assert_eq!(
        ask("prompt=the%20&tokens=40&temperature=0.5&seed=3")
            .await?
            .json()["text"],
        text
    );
    let bad = ask("prompt=ZZ&tokens=5").await?;
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].as_str()),
        (422, Some("bad_request"))
    );
    assert_eq!(ask("tokens=0").await?.status, 422);

    // The export is an LM checkpoint with the vocabulary, as `starling job sample ID` reads it.
    let ckpt = client.get(&format!("/api/v1/jobs/{id}/checkpoint")).await?;
    assert_eq!(ckpt.status, 200);
    let ck = from_safetensors(&ckpt.body)?;
    assert_eq!(ck.spec, lm);
    assert_eq!(ck.vocab, ds.vocab);
    assert_eq!(ck.step, 30);

    server.stop().await?;
    for w in honest {
        let report = w.join().expect("worker thread")?;
        assert_eq!(
            report.stats.rejected, 0,
            "an honest LM result was rejected: {:?}",
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

/// `serve --demo-lm`: the Moby-Dick char-level LM job, `starling train --model char-lm`'s model and schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_demo_lm_offers_the_moby_dick_char_lm() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("demo-lm");
    let mut config = ServeConfig::for_tests(dir.db());
    config.demo_lm = true;
    let server = Server::start(config).await?;
    // The listener is bound before the demo job is created; the first answer comes once it is.
    let (status, _) = server.get("/api/v1/jobs").await?;
    assert_eq!(status, 200);
    let token = std::fs::read_to_string(dir.db().with_extension("demo-token"))?;
    let (status, jobs) = server.get_as(token.trim(), "/api/v1/jobs").await?;
    assert_eq!(status, 200, "{jobs}");
    let lm = jobs
        .as_array()
        .and_then(|j| {
            j.iter()
                .find(|j| j["name"] == starling_coordinator::DEMO_LM_JOB)
        })
        .expect("the demo LM job");
    assert_eq!(lm["language_model"], true);
    assert_eq!(
        lm["param_count"].as_u64(),
        Some(LmSpec::char_lm(83).param_count() as u64),
        "83 distinct characters in the corpus"
    );
    // 1,190,317 characters, the last 10% (rounded up) held out, windows of 64.
    let held = (0.1f64 * 1_190_317.0).ceil() as u64;
    assert_eq!(lm["train_rows"].as_u64(), Some(1_190_317 - held - 64));
    assert_eq!(lm["hyper"]["global_batch"], 12);
    let id = lm["id"].as_u64().expect("id");
    // The untrained model already samples (from its initial weights): 20 characters of the corpus's alphabet.
    let reply = server
        .client(Some(token.trim()))
        .get(&format!(
            "/api/v1/jobs/{id}/sample?tokens=20&prompt=Call%20me%20"
        ))
        .await?;
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    assert_eq!(
        reply.json()["text"].as_str().map(|t| t.chars().count()),
        Some(20)
    );
    server.stop().await
}

/// A slice of Moby-Dick (the npm package's text, as `serve --demo-lm` reads it).
fn moby_slice(from: usize, chars: usize) -> anyhow::Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(starling_core::tokens::MOBY_DICK_PATH);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run npm ci)", path.display()))?;
    Ok(text.chars().skip(from).take(chars).collect())
}

/// A scaled delta: the lie only a replay of the lease's H inner steps over its token windows can catch.
struct ScaledDelta;

impl starling_worker::session::LocalLie for ScaledDelta {
    fn output(&mut self, out: &mut starling_core::local::LocalOutput) {
        out.delta.iter_mut().for_each(|d| *d *= 1.5);
    }
}

/// `local` mode on a token dataset (issue 13): two honest native CPU workers and a liar train a small char LM on a
/// Moby-Dick slice with H-step leases over token windows (the stream fetched once as a `stk1_deflate` frame), every
/// honest result is accepted, the liar's scaled deltas are rejected by the coordinator's replay, the held-out loss
/// falls, and `which=best` exports the version with the lowest held-out loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_lm_job_trains_on_token_windows_rejects_a_scaled_delta_and_exports_its_lowest_loss()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("lm-local");
    let alice = create_owner(&dir.db(), "alice").await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let ds = char_dataset(&moby_slice(30_000, 12_000)?, 16, 0.0)?;
    let (status, up) = server
        .post_as(
            &alice,
            "/api/v1/datasets?name=moby-slice&test_fraction=0.1",
            "application/octet-stream",
            &encode_tokens(&ds, 2)?,
        )
        .await?;
    assert_eq!(status, 201, "upload: {up}");
    let lm = LmSpec {
        vocab: ds.vocab_size,
        context: 16,
        width: 32,
        heads: 2,
        layers: 1,
        tied: true,
    };
    let body = serde_json::json!({"name": "moby-local", "spec": lm.model_spec(), "dataset": up["id"],
        "hyper": {"mode": "local", "h": 8, "inner_batch": 8, "micro_batch": 32, "global_batch": 64,
            "steps": 16, "eval_every": 4, "quant": "int8",
            "inner_optimizer": {"kind": "adam", "lr": 0.01}}});
    let (status, created) = server
        .post_as(
            &alice,
            "/api/v1/jobs",
            "application/json",
            body.to_string().as_bytes(),
        )
        .await?;
    assert_eq!(status, 201, "a local LM job is accepted: {created}");
    let id = created["id"].as_u64().expect("job id");
    let honest: Vec<_> = (0..2)
        .map(|i| {
            crate::local::spawn_liar(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("lm-local-{i}"),
                None,
                None,
            )
        })
        .collect();
    let liar = crate::local::spawn_liar(
        server.ws_url(),
        BackendChoice::Cpu,
        "liar",
        None,
        Some(Box::new(ScaledDelta)),
    );
    let done = server
        .wait_job(id, Duration::from_secs(300), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == 16
        })
        .await?;
    let counters = &done["counters"];
    println!("local LM job: {counters}");
    assert!(
        counters["results_rejected"].as_u64() >= Some(1),
        "the liar was caught: {counters}"
    );

    let (_, metrics) = server
        .get_as(&alice, &format!("/api/v1/jobs/{id}/metrics"))
        .await?;
    let evals: Vec<(u64, f64)> = metrics
        .as_array()
        .expect("metrics")
        .iter()
        .filter(|m| m["kind"] == "eval")
        .map(|m| {
            (
                m["step"].as_u64().unwrap_or(0),
                m["loss"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    println!("held-out nats/char by round: {evals:?}");
    let uniform = (ds.vocab_size as f64).ln();
    let last = evals.last().expect("evaluated").1;
    assert!(
        evals.len() >= 4 && last < evals[0].1 && last < uniform - 0.5,
        "held-out loss fell below ln(V) = {uniform:.3}: {evals:?}"
    );

    // `which=best` is the evaluated version with the lowest held-out loss.
    let lowest = evals
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|e| e.0)
        .expect("evaluated");
    let client = server.client(Some(&alice));
    let best = client
        .get(&format!("/api/v1/jobs/{id}/checkpoint?which=best"))
        .await?;
    assert_eq!(best.status, 200);
    let ck = from_safetensors(&best.body)?;
    assert_eq!((ck.spec, ck.step), (lm, lowest), "{evals:?}");

    server.stop().await?;
    for w in honest {
        let report = w.join().expect("worker thread")?;
        println!("honest worker: {:?}", report.stats);
        assert!(
            report.stats.accepted > 0 && report.stats.rejected == 0,
            "an honest local LM result was rejected: {:?}",
            report.stats
        );
        assert_eq!(report.stats.datasets, 1, "the stream is fetched once");
    }
    let report = liar.join().expect("worker thread")?;
    assert!(
        report.stats.rejected >= 1 && report.stats.accepted == 0,
        "{:?}",
        report.stats
    );
    Ok(())
}
