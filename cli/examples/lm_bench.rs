//! The language-model benchmark (`cargo xtask bench lm`): issue 13's "Done when" run. The char-level Moby-Dick
//! LM trained two ways from the same seed for the same number of samples, side by side:
//!
//! - **single process**: `starling train --model char-lm`'s loop (`CpuEngine`, AdamW β₂ 0.99, a warm-up of
//!   `min(100, steps/10)` steps then cosine decay to a tenth, weight decay 0.1, `tokens::step_windows` batches);
//! - **served**: a real coordinator on 127.0.0.1:0 (its own runtime), the token dataset uploaded as `STK1` and the
//!   job created through the owner API, `--workers` native CPU workers and, with `--browser`, one headless Chromium
//!   tab on the volunteer page (the wasm CPU path; `cli/examples/lm_tab.mjs`), every micro-batch replicated R = 2.
//!
//! Both evaluate on the whole held-out text (its non-overlapping windows) every `--eval-every` steps. Prints the two
//! held-out curves in nats/char as a table, a sample of the served model, then one JSON line.
//!
//! The defaults are smaller than the model so that both arms (run at the same time) fit in well under 25
//! minutes on a loaded 2-core machine: 2 blocks, 4 heads, width 64, context 32 (107,456 parameters, ~1/8 of the
//! char-lm's compute per token), 3,000 steps of 12 windows: 654 s served and 126 s single-process here with a
//! Chromium tab (held-out 2.006 nats/char both). The full run is `--width 128 --layers 4 --context 64 --steps 2000
//! --eval-every 250` (hours here: every micro-batch is computed twice, and a share audited).
//!
//! Both arms draw the same windows (`tokens::step_windows`), start from the same initialisation and apply the same
//! optimizer, so the served curve differs from the single-process one only by the coordinator averaging two
//! micro-batch gradients of 6 windows where the reference takes the mean over 12 (float rounding).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use starling_coordinator::config::ServeConfig;
use starling_core::cpu::CpuEngine;
use starling_core::optim::{LrSchedule, Optimizer, OptimizerSpec};
use starling_core::tokens::{self, TokenStream};
use starling_core::transformer::LmSpec;
use starling_worker::engine::BackendChoice;
use starling_worker::native::{WorkerOptions, WorkerReport};

/// The run's configuration (flags `--steps`, `--width`, `--layers`, `--heads`, `--context`, `--batch`, `--micro`,
/// `--eval-every`, `--workers`, `--seed`, `--browser`, `--tolerance`).
#[derive(Debug, Clone)]
struct Run {
    steps: u64,
    lm: LmSpec,
    batch: u32,
    micro: u32,
    eval_every: u64,
    workers: usize,
    seed: u64,
    browser: bool,
    /// The job's agreement bound (`hyper.tolerance`); a tiny one makes every honest difference a logged disagreement,
    /// which is how the honest replica distance is measured (`--tolerance 1e-7`).
    tolerance: f64,
}

impl Run {
    fn warmup(&self) -> u64 {
        100.min(self.steps / 10)
    }
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The single-process reference: `(step, held-out nats/char)` at every evaluation.
fn single_process(
    run: &Run,
    train: &TokenStream,
    test: &TokenStream,
) -> anyhow::Result<Vec<(u64, f32)>> {
    let graph = run.lm.model_spec();
    let mut engine = CpuEngine::new(graph.clone());
    let mut params = graph.init_params(run.seed);
    let mut opt = Optimizer::new(
        OptimizerSpec::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        },
        params.len(),
    );
    let schedule = LrSchedule::Cosine {
        warmup_steps: run.warmup(),
        min_ratio: 0.1,
    };
    let features = |ids: Vec<u32>| ids.into_iter().map(|i| i as f32).collect::<Vec<f32>>();
    let (eval_ids, eval_targets) = test.gather(&test.eval_starts());
    let eval_x = features(eval_ids);
    let mut curve = Vec::new();
    for step in 0..run.steps {
        let starts = tokens::step_windows(train.windows(), run.batch as usize, run.seed, step);
        let (ids, targets) = train.gather(&starts);
        engine.load(&params)?;
        let out = engine.step(&features(ids), &targets)?;
        opt.step_scaled(
            &mut params,
            &out.grad,
            schedule.factor(step, run.steps),
            0.1,
        );
        let done = step + 1;
        if done % run.eval_every == 0 || done == run.steps {
            engine.load(&params)?;
            curve.push((done, engine.evaluate(&eval_x, &eval_targets)?.loss));
        }
    }
    Ok(curve)
}

fn spawn_worker(
    url: String,
    name: String,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(starling_worker::native::run(
            WorkerOptions {
                coordinator: url,
                backend: BackendChoice::Cpu,
                name: Some(name),
                token: None,
                max_leases: None,
                dataset_cache: None,
            },
            None,
        ))
    })
}

fn http(
    method: &str,
    url: &str,
    token: &str,
    body: Option<(&str, Vec<u8>)>,
) -> anyhow::Result<serde_json::Value> {
    let auth = format!("Bearer {token}");
    let mut reply = match (method, body) {
        ("POST", Some((ct, b))) => ureq::post(url)
            .header("Authorization", &auth)
            .header("Content-Type", ct)
            .config()
            .http_status_as_error(false)
            .build()
            .send(&b[..])?,
        _ => ureq::get(url)
            .header("Authorization", &auth)
            .config()
            .http_status_as_error(false)
            .build()
            .call()?,
    };
    let status = reply.status().as_u16();
    let json: serde_json::Value = reply.body_mut().read_json()?;
    anyhow::ensure!(status < 300, "{method} {url}: HTTP {status} {json}");
    Ok(json)
}

struct Served {
    curve: Vec<(u64, f32)>,
    sample: String,
    counters: serde_json::Value,
    browser_accepted: u64,
    honest_rejected: u64,
    wall_s: f64,
}

async fn served(run: &Run, stk1: Vec<u8>) -> anyhow::Result<Served> {
    let dir = std::env::temp_dir().join(format!("starling-lm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("starling.db");
    let token = {
        let store = starling_coordinator::store::Store::open(&db).await?;
        starling_coordinator::create_owner(&store, "bench").await?
    };
    let coord_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("coord")
        .enable_all()
        .build()?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig::for_tests(db.clone());
    let server = coord_rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        starling_coordinator::run(listener, config, async {
            let _ = stopped.await;
        })
        .await
    });
    let api = format!("http://{addr}/api/v1");
    let blocking = |f: Box<dyn FnOnce() -> anyhow::Result<serde_json::Value> + Send>| async move {
        tokio::task::spawn_blocking(f).await?
    };
    let up = blocking(Box::new({
        let (api, token) = (api.clone(), token.clone());
        move || {
            http(
                "POST",
                &format!("{api}/datasets?name=moby-dick"),
                &token,
                Some(("application/octet-stream", stk1)),
            )
        }
    }))
    .await?;
    let job = serde_json::json!({
        "name": "lm-bench", "spec": run.lm.model_spec(), "dataset": up["id"],
        "hyper": {
            "optimizer": {"kind": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
            "global_batch": run.batch, "micro_batch": run.micro, "steps": run.steps, "eval_every": run.eval_every,
            "seed": run.seed, "weight_decay": 0.1, "tolerance": run.tolerance,
            "lr_schedule": {"kind": "cosine", "warmup_steps": run.warmup(), "min_ratio": 0.1}}
    });
    let created = blocking(Box::new({
        let (api, token) = (api.clone(), token.clone());
        move || {
            http(
                "POST",
                &format!("{api}/jobs"),
                &token,
                Some(("application/json", job.to_string().into_bytes())),
            )
        }
    }))
    .await?;
    let id = created["id"].as_u64().context("job id")?;
    let started = Instant::now();
    let url = format!("ws://{addr}/ws");
    let workers: Vec<_> = (0..run.workers)
        .map(|i| spawn_worker(url.clone(), format!("native-{i}")))
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut tab = if run.browser {
        Some(
            std::process::Command::new("node")
                .arg(root.join("cli/examples/lm_tab.mjs"))
                .arg(format!("http://{addr}/"))
                .spawn()
                .context("starting node (the Chromium tab)")?,
        )
    } else {
        None
    };
    let mut browser_ids = std::collections::BTreeSet::new();
    let job = loop {
        let job = blocking(Box::new({
            let (api, token) = (api.clone(), token.clone());
            move || http("GET", &format!("{api}/jobs/{id}"), &token, None)
        }))
        .await?;
        for w in job["workers"].as_array().into_iter().flatten() {
            if w["platform"] == "browser" {
                browser_ids.insert(w["worker"].as_u64().unwrap_or(0));
            }
        }
        if job["status"] == "completed" && job["last_eval"]["step"] == run.steps {
            break job;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the served job did not complete: step {} status {}",
            job["step"],
            job["status"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let wall_s = started.elapsed().as_secs_f64();
    let get = |path: String| {
        let (api, token) = (api.clone(), token.clone());
        blocking(Box::new(move || {
            http("GET", &format!("{api}{path}"), &token, None)
        }))
    };
    let metrics = get(format!("/jobs/{id}/metrics")).await?;
    let curve = metrics
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["kind"] == "eval")
        .map(|m| {
            (
                m["step"].as_u64().unwrap_or(0),
                m["loss"].as_f64().unwrap_or(f64::NAN) as f32,
            )
        })
        .collect();
    let sample = get(format!(
        "/jobs/{id}/sample?prompt=Call%20me%20Ishmael.%20&tokens=200&temperature=0.5&seed=3"
    ))
    .await?;
    let listed = get("/workers".into()).await?;
    let mut browser_accepted = 0;
    let mut honest_rejected = 0;
    for w in listed.as_array().into_iter().flatten() {
        honest_rejected += w["rejected"].as_u64().unwrap_or(0);
        if browser_ids.contains(&w["id"].as_u64().unwrap_or(u64::MAX)) {
            browser_accepted += w["accepted"].as_u64().unwrap_or(0);
        }
    }
    if let Some(t) = tab.as_mut() {
        // SIGTERM, so the script closes its Chromium before it exits.
        let _ = std::process::Command::new("kill")
            .arg(t.id().to_string())
            .status();
        let _ = t.wait();
    }
    let _ = stop.send(());
    server.await.context("coordinator task")??;
    for h in workers {
        h.join()
            .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
    }
    coord_rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Served {
        curve,
        sample: format!("Call me Ishmael. {}", sample["text"].as_str().unwrap_or("")),
        counters: job["counters"].clone(),
        browser_accepted,
        honest_rejected,
        wall_s,
    })
}

fn main() -> anyhow::Result<()> {
    // Warnings only: disagreements (with their distance) and rejections are what a reader of the run needs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let defaults = LmSpec::char_lm(0);
    let run = Run {
        steps: arg("--steps", 3000),
        batch: arg("--batch", 12),
        micro: arg("--micro", 6),
        eval_every: arg("--eval-every", 500),
        workers: arg("--workers", 2),
        seed: arg("--seed", 1),
        browser: std::env::args().any(|a| a == "--browser"),
        tolerance: arg("--tolerance", 1e-3),
        lm: LmSpec {
            width: arg("--width", 64),
            layers: arg("--layers", 2),
            heads: arg("--heads", 4),
            context: arg("--context", 32),
            ..defaults
        },
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let ds = tokens::moby_dick_from_file(&root.join(tokens::MOBY_DICK_PATH), run.lm.context)
        .map_err(anyhow::Error::msg)?;
    let run = Run {
        lm: LmSpec {
            vocab: ds.vocab_size,
            ..run.lm
        },
        ..run
    };
    run.lm.validate()?;
    let (train, test) = ds.split(tokens::MOBY_DICK_HELD_OUT as f32)?;
    println!(
        "LM benchmark: {} blocks, {} heads, width {}, context {}, {} parameters; {} steps of {} windows ({} samples); \
         served with {} native CPU workers{}, R = 2",
        run.lm.layers,
        run.lm.heads,
        run.lm.width,
        run.lm.context,
        run.lm.param_count(),
        run.steps,
        run.batch,
        run.steps * run.batch as u64,
        run.workers,
        if run.browser {
            " and one Chromium tab (wasm CPU)"
        } else {
            ""
        },
    );
    let stk1 = tokens::encode_tokens(&ds, 2)?;
    let reference = std::thread::spawn({
        let (run, train, test) = (run.clone(), train.clone(), test.clone());
        move || {
            let t = Instant::now();
            single_process(&run, &train, &test).map(|c| (c, t.elapsed().as_secs_f64()))
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let served = rt.block_on(served(&run, stk1))?;
    let (single, single_s) = reference
        .join()
        .map_err(|_| anyhow::anyhow!("reference thread panicked"))??;
    println!("\n| step | single process (nats/char) | served (nats/char) | served − single |");
    println!("|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (step, a) in &single {
        let b = served
            .curve
            .iter()
            .find(|(s, _)| s == step)
            .map(|(_, l)| *l);
        let d = b.map(|b| b - a);
        println!(
            "| {step} | {a:.4} | {} | {} |",
            b.map_or("—".into(), |b| format!("{b:.4}")),
            d.map_or("—".into(), |d| format!("{d:+.4}"))
        );
        rows.push(serde_json::json!({"step": step, "single": a, "served": b}));
    }
    let last_gap = rows
        .last()
        .and_then(|r| Some(r["served"].as_f64()? - r["single"].as_f64()?));
    println!(
        "\nserved sample (temperature 0.5, seed 3):\n{}\n",
        served.sample
    );
    println!(
        "served: {:.0} s wall; browser tab's accepted results {}; rejected results of any worker {}; counters {}",
        served.wall_s, served.browser_accepted, served.honest_rejected, served.counters
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "lm", "params": run.lm.param_count(), "steps": run.steps, "batch": run.batch,
            "width": run.lm.width, "layers": run.lm.layers, "heads": run.lm.heads, "context": run.lm.context,
            "workers": run.workers, "browser": run.browser, "curve": rows, "final_gap": last_gap,
            "browser_accepted": served.browser_accepted, "rejected": served.honest_rejected,
            "served_s": served.wall_s, "single_s": single_s,
        })
    );
    Ok(())
}
