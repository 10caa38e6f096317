//! The attack suite: one real coordinator on 127.0.0.1:0, honest native CPU workers, and attackers — real workers
//! whose results are altered before sending (sign flip, ×10, noise, zeros, a colluding pair) and hand-driven
//! protocol peers (NaN/Inf, a stale model, replayed and copied results) — plus churn (30% of the workers vanish
//! mid-run). Each test asserts that no lie reaches the model, liars end refused, honest workers are never
//! rejected, and every applied step was verified.

// The helpers below are test code too (clippy.toml: a panic in a test is a failure with a location).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_coordinator::ledger::sha256_hex;
use starling_coordinator::store::Store;
use starling_core::cpu::CpuEngine;
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, PROTOCOL_VERSION, Platform,
    WorkerMsg, f32_bytes, f32s, split_lease_payload,
};
use starling_core::rng::SplitMix64;
use starling_core::{ModelSpec, StepOutput};
use starling_tests::*;
use starling_worker::engine::BackendChoice;
use starling_worker::native::WorkerReport;

/// The demo job (784-128-10 on the MNIST split, 4 micro-batches of 32 rows per step, R = 2) for `steps` steps, with
/// one held-out evaluation at the end.
fn short(steps: u64) -> Hyper {
    Hyper {
        steps,
        eval_every: steps,
        ..Hyper::default()
    }
}

const STEPS: u64 = 150;
const MICROS_PER_STEP: u64 = 4;

/// What a job run left behind that the assertions need.
struct Run {
    job: serde_json::Value,
    accuracy: f64,
    honest: Vec<WorkerReport>,
}

/// Waits for the job to complete and its final evaluation to land, checks every applied step was verified by at
/// least `min_agreeing` workers, stops the server and joins the honest workers.
async fn finish(
    server: Server,
    db: &std::path::Path,
    steps: u64,
    min_agreeing: u32,
    honest: Vec<std::thread::JoinHandle<anyhow::Result<WorkerReport>>>,
) -> anyhow::Result<Run> {
    let job = server
        .wait_job(1, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == steps
        })
        .await?;
    let accuracy = job["last_eval"]["accuracy"].as_f64().unwrap();
    server.stop().await?;
    let honest = honest
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let store = Store::open(db).await?;
    let train: Vec<_> = store
        .metrics(JobId(1))
        .await?
        .into_iter()
        .filter(|m| m.kind == "train")
        .collect();
    assert_eq!(
        train.len() as u64,
        steps,
        "one training metric per applied step"
    );
    assert!(
        train.iter().all(|m| m.min_agreeing >= min_agreeing),
        "a step was applied with fewer than {min_agreeing} agreeing workers"
    );
    store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for h in &honest {
        assert_eq!(
            h.stats.rejected, 0,
            "an honest worker was rejected: {:?}",
            h.stats
        );
    }
    Ok(Run {
        job,
        accuracy,
        honest,
    })
}

fn spawn_honest(
    server: &Server,
    n: usize,
) -> Vec<std::thread::JoinHandle<anyhow::Result<WorkerReport>>> {
    (0..n)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("honest{i}"),
                None,
                None,
                None,
            )
        })
        .collect()
}

/// A clean run of the same schedule: the reference the attacked runs must match.
async fn clean_accuracy(steps: u64) -> anyhow::Result<f64> {
    let dir = TempDir::new("attacks-clean");
    create_demo_job(&dir.db(), short(steps)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 3);
    let run = finish(server, &dir.db(), steps, 2, honest).await?;
    Ok(run.accuracy)
}

/// How a hand-driven peer answers its leases.
#[derive(Clone)]
enum Raw {
    /// Computes honestly, then puts a NaN or an Inf into the gradient.
    NonFinite,
    /// Keeps the first model it is sent and answers every lease at least 3 versions later with a gradient computed
    /// on that stale model (earlier leases are declined with `failed`).
    Stale,
    /// Answers its first lease honestly and every later lease with the bytes it sent for the first.
    Replay,
    /// Computes honestly and publishes each result for its partner (version, micro-batch) → result.
    Publisher(Shared),
    /// Computes honestly but sends a `commit` that is not the hash of the payload it sends.
    BadCommit,
    /// Never computes: sends the partner's result for the same (version, micro-batch) when there is one, otherwise
    /// the partner's latest result for any other micro-batch.
    Copier(Shared),
}

type Shared = Arc<Mutex<HashMap<(u64, u32), (f32, u32, Vec<u8>)>>>;

/// What kind of answer a raw peer sent for a lease.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sent {
    Honest,
    Lie,
    /// An exact copy of another worker's honest result for the same micro-batch and version.
    Copy,
}

#[derive(Debug, Default)]
struct RawReport {
    sent: HashMap<LeaseId, Sent>,
    verdicts: HashMap<LeaseId, Outcome>,
    refused: bool,
}

impl RawReport {
    fn accepted(&self, kind: Sent) -> usize {
        self.verdicts
            .iter()
            .filter(|(l, o)| **o == Outcome::Accepted && self.sent.get(l) == Some(&kind))
            .count()
    }
    fn count(&self, kind: Sent) -> usize {
        self.sent.values().filter(|k| **k == kind).count()
    }
}

/// Runs a raw peer until the coordinator closes it or `report` is read after the job; returns when closed.
async fn raw_peer(
    url: String,
    name: &str,
    how: Raw,
    report: Arc<Mutex<RawReport>>,
) -> anyhow::Result<()> {
    let mut c = RawClient::connect(&url).await?;
    let hello = WorkerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        name: Some(name.into()),
        backend: Backend::Cpu,
        adapter: "raw".into(),
        platform: Platform::Native,
    };
    c.send(&hello, &[]).await?;
    c.send(&WorkerMsg::Ready, &[]).await?;
    let mut engine: Option<(ModelSpec, CpuEngine, u64)> = None;
    let mut first_version = None;
    let mut first_result: Option<(f32, u32, Vec<u8>)> = None;
    let mut flips = 0u32;
    while let Some((msg, payload)) = c.recv().await? {
        match msg {
            CoordinatorMsg::Model { version, spec, .. } => {
                if matches!(how, Raw::Stale) && engine.is_some() {
                    continue; // keeps computing on the first model it was sent
                }
                let mut e = CpuEngine::new(spec.clone());
                e.load(&f32s(&payload))?;
                first_version.get_or_insert(version);
                engine = Some((spec, e, version));
            }
            CoordinatorMsg::Lease {
                lease,
                version,
                micro_batch,
                rows,
                ..
            } => {
                let Some((spec, e, _)) = engine.as_mut() else {
                    anyhow::bail!("lease before model")
                };
                let (x, y) = split_lease_payload(&payload, rows as usize, spec.input_len())?;
                let mut honest = || -> anyhow::Result<StepOutput> { Ok(e.step(&x, &y)?) };
                let (answer, kind) = match &how {
                    Raw::NonFinite => {
                        let mut out = honest()?;
                        flips += 1;
                        let i = (flips as usize * 7919) % out.grad.len();
                        out.grad[i] = if flips.is_multiple_of(2) {
                            f32::NAN
                        } else {
                            f32::INFINITY
                        };
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Stale if version < first_version.unwrap_or(0) + 3 => (None, Sent::Honest),
                    Raw::Stale => {
                        let out = honest()?;
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Replay => match &first_result {
                        Some(r) => (Some(r.clone()), Sent::Lie),
                        None => {
                            let out = honest()?;
                            let r = (out.loss, out.correct, f32_bytes(&out.grad));
                            first_result = Some(r.clone());
                            (Some(r), Sent::Honest)
                        }
                    },
                    Raw::BadCommit => {
                        let out = honest()?;
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Publisher(shared) => {
                        let out = honest()?;
                        let r = (out.loss, out.correct, f32_bytes(&out.grad));
                        shared
                            .lock()
                            .unwrap()
                            .insert((version, micro_batch), r.clone());
                        (Some(r), Sent::Honest)
                    }
                    Raw::Copier(shared) => {
                        // Give the partner a moment, as a colluder with a side channel would.
                        let mut copy = None;
                        for _ in 0..10 {
                            copy = shared.lock().unwrap().get(&(version, micro_batch)).cloned();
                            if copy.is_some() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        match copy {
                            Some(r) => (Some(r), Sent::Copy),
                            None => {
                                let any = shared.lock().unwrap().values().next().cloned();
                                (
                                    Some(any.unwrap_or_else(|| {
                                        (1.0, 0, f32_bytes(&vec![0.0; spec.param_count()]))
                                    })),
                                    Sent::Lie,
                                )
                            }
                        }
                    }
                };
                match answer {
                    Some((loss, correct, bytes)) => {
                        report.lock().unwrap().sent.insert(lease, kind);
                        // The publisher commits to its payload as `Session` does; the others send no commit
                        // (older workers) except the one whose commit is wrong.
                        let commit = match how {
                            Raw::Publisher(_) => Some(sha256_hex(&bytes)),
                            Raw::BadCommit => Some(sha256_hex(&[&bytes[..], b"x"].concat())),
                            _ => None,
                        };
                        c.send(
                            &WorkerMsg::Result {
                                lease,
                                loss,
                                correct,
                                commit,
                            },
                            &bytes,
                        )
                        .await?;
                    }
                    None => {
                        c.send(
                            &WorkerMsg::Failed {
                                lease,
                                reason: "declined".into(),
                            },
                            &[],
                        )
                        .await?
                    }
                }
                c.send(&WorkerMsg::Ready, &[]).await?;
            }
            CoordinatorMsg::Verdict { lease, outcome, .. } => {
                report.lock().unwrap().verdicts.insert(lease, outcome);
            }
            CoordinatorMsg::Error { code, .. } => {
                report.lock().unwrap().refused = code == ErrorCode::Refused;
                break;
            }
            // v2 messages: never sent to this v1 client.
            CoordinatorMsg::Welcome { .. }
            | CoordinatorMsg::Waiting { .. }
            | CoordinatorMsg::ModelDelta { .. }
            | CoordinatorMsg::LocalLease { .. }
            | CoordinatorMsg::Dataset { .. }
            | CoordinatorMsg::Redirect { .. } => {}
        }
    }
    Ok(())
}

fn scale(k: f32) -> SendTamper {
    Box::new(move |out: &mut StepOutput| out.grad.iter_mut().for_each(|g| *g *= k))
}

fn noise(seed: u64, fraction: f64) -> SendTamper {
    let mut rng = SplitMix64::new(seed);
    Box::new(move |out: &mut StepOutput| {
        let rms = (out.grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>()
            / out.grad.len() as f64)
            .sqrt();
        out.grad
            .iter_mut()
            .for_each(|g| *g += (fraction * rms * rng.normal()) as f32);
    })
}

fn zeros() -> SendTamper {
    Box::new(|out: &mut StepOutput| out.grad.iter_mut().for_each(|g| *g = 0.0))
}

fn refused(r: &WorkerReport) -> bool {
    r.closed_by.as_deref().unwrap_or("").contains("Refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_replaying_stale_and_copying_workers_never_reach_the_model() -> anyhow::Result<()> {
    init_tracing();
    let clean = clean_accuracy(STEPS).await?;

    let dir = TempDir::new("attacks");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 3);
    let liars: Vec<(&str, _)> = [
        ("sign-flip", scale(-1.0)),
        ("x10", scale(10.0)),
        ("noise", noise(7, 0.05)),
        ("zeros", zeros()),
    ]
    .into_iter()
    .map(|(name, t)| {
        (
            name,
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                name,
                None,
                None,
                Some(t),
            ),
        )
    })
    .collect();
    let shared: Shared = Arc::default();
    let raws: Vec<_> = [
        ("nan-inf", Raw::NonFinite),
        ("stale", Raw::Stale),
        ("replay", Raw::Replay),
        ("bad-commit", Raw::BadCommit),
        ("publisher", Raw::Publisher(shared.clone())),
        ("copier", Raw::Copier(shared.clone())),
    ]
    .into_iter()
    .map(|(name, how)| {
        let report = Arc::new(Mutex::new(RawReport::default()));
        let task = tokio::spawn(raw_peer(server.ws_url(), name, how, report.clone()));
        (name, report, task)
    })
    .collect();

    let run = finish(server, &dir.db(), STEPS, 2, honest).await?;
    println!(
        "attacked run: {}; held-out accuracy {:.4} (clean {clean:.4})",
        run.job["counters"], run.accuracy
    );
    assert!(
        (run.accuracy - clean).abs() <= 0.01,
        "attacked accuracy {} vs clean {clean}",
        run.accuracy
    );
    assert!(run.honest.iter().all(|h| h.stats.accepted > 0));

    for (name, h) in liars {
        let r = join(h)?;
        println!("{name:>10}: {:?}, closed by {:?}", r.stats, r.closed_by);
        assert_eq!(
            r.stats.accepted, 0,
            "{name}: a tampered result was accepted"
        );
        assert!(
            refused(&r),
            "{name} keeps lying and must end refused: {:?}",
            r.closed_by
        );
    }
    for (name, report, task) in raws {
        task.abort();
        let r = report.lock().unwrap();
        println!(
            "{name:>10}: sent {} honest / {} lies / {} copies; accepted {} honest / {} lies / {} copies; refused {}",
            r.count(Sent::Honest),
            r.count(Sent::Lie),
            r.count(Sent::Copy),
            r.accepted(Sent::Honest),
            r.accepted(Sent::Lie),
            r.accepted(Sent::Copy),
            r.refused
        );
        assert_eq!(r.accepted(Sent::Lie), 0, "{name}: a lie was accepted");
        match name {
            "publisher" => assert!(
                !r.refused && r.verdicts.values().all(|o| *o != Outcome::Rejected),
                "the publisher computes honestly"
            ),
            // The copier answers with honest bytes when its partner had the same micro-batch, else with the
            // partner's result for another micro-batch; only exact copies may pass, and the rest get it refused.
            _ => {
                assert!(r.count(Sent::Lie) > 0, "{name} never got to lie");
                assert!(r.refused, "{name} must end refused");
            }
        }
    }
    Ok(())
}

/// `(worker, step, micro)` of every credit-ledger entry of job 1.
async fn credit_rows(db: &std::path::Path) -> anyhow::Result<Vec<(u64, u64, u32)>> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    let rows: Vec<(i64, i64, i64)> =
        sqlx::query_as("SELECT worker_id, step, micro FROM credits WHERE job_id = 1 ORDER BY id")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    Ok(rows
        .into_iter()
        .map(|(w, s, m)| (w as u64, s as u64, m as u32))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_colluding_pair_gets_lies_through_only_when_it_forms_the_quorum_and_is_then_caught()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("collude");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 4);
    // Both flip every gradient's sign: deterministic and identical, so two of them on one micro-batch agree.
    let pair: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("colluder{i}"),
                None,
                None,
                Some(scale(-1.0)),
            )
        })
        .collect();
    let job = server
        .wait_job(1, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == STEPS
        })
        .await?;
    server.stop().await?;
    let honest = honest
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pair = pair
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;

    let ids: Vec<u64> = pair.iter().map(|r| r.stats.worker.unwrap()).collect();
    let credits = credit_rows(&dir.db()).await?;
    let credited = |w: u64| -> std::collections::BTreeSet<(u64, u32)> {
        credits
            .iter()
            .filter(|c| c.0 == w)
            .map(|c| (c.1, c.2))
            .collect()
    };
    let (a, b) = (credited(ids[0]), credited(ids[1]));
    let honest_rejected: u64 = honest.iter().map(|h| h.stats.rejected).sum();
    println!(
        "colluders: {:?} / {:?}; bad micro-batches accepted: {}; honest results rejected by the pair: {honest_rejected}; accuracy {} ; counters {}",
        pair[0].stats,
        pair[1].stats,
        a.len(),
        job["last_eval"]["accuracy"],
        job["counters"]
    );
    // Every lie that got through was backed by both colluders on the same micro-batch: no single liar's result
    // was ever accepted, and the coordinator cannot tell two identical lies from two honest results.
    assert_eq!(a, b, "a colluder's result was accepted without its partner");
    // Their every other result met an honest majority, so both end refused.
    for r in &pair {
        assert!(refused(r), "colluder not refused: {:?}", r.closed_by);
    }
    // Disagreements are settled by the coordinator's own recomputation, never by a volunteer tie-breaker the
    // partner could be: the pair cannot outvote an honest replica, so no honest result is ever rejected.
    assert_eq!(honest_rejected, 0, "the pair outvoted an honest worker");
    let store = Store::open(&dir.db()).await?;
    let train: Vec<_> = store
        .metrics(JobId(1))
        .await?
        .into_iter()
        .filter(|m| m.kind == "train")
        .collect();
    assert!(train.len() as u64 == STEPS && train.iter().all(|m| m.min_agreeing >= 2));
    store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_30_percent_of_the_workers_loses_no_accepted_result() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("churn");
    create_demo_job(&dir.db(), short(STEPS)).await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let mut rng = SplitMix64::new(2026);
    // 7 stay; 3 leave after a random number of leases, each closing its connection right after a result (and
    // its next `ready`, so a fresh lease may be in flight to it when it goes).
    let stay = spawn_honest(&server, 7);
    let leave: Vec<_> = (0..3)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("leaver{i}"),
                None,
                Some(2 + rng.below(40)),
                None,
            )
        })
        .collect();
    // And two peers that take a lease and vanish without answering, at random moments.
    let mut grabbers = Vec::new();
    for _ in 0..2 {
        let url = server.ws_url();
        let wait = Duration::from_millis(rng.below(1500));
        grabbers.push(tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut c = RawClient::connect(&url).await?;
            let hello = WorkerMsg::Hello {
                protocol: PROTOCOL_VERSION,
                token: None,
                name: Some("grabber".into()),
                backend: Backend::Cpu,
                adapter: "raw".into(),
                platform: Platform::Native,
            };
            c.send(&hello, &[]).await?;
            c.send(&WorkerMsg::Ready, &[]).await?;
            let lease = c
                .recv_until(|m, _| matches!(m, CoordinatorMsg::Lease { .. }).then_some(()))
                .await;
            drop(c);
            anyhow::Ok(lease.is_ok())
        }));
    }
    let job = server
        .wait_job(1, Duration::from_secs(240), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == STEPS
        })
        .await?;
    let counters = job["counters"].clone();
    server.stop().await?;
    for g in grabbers {
        assert!(g.await??, "a grabber got its lease before vanishing");
    }
    for h in leave {
        let r = join(h)?;
        assert_eq!(r.stats.rejected, 0);
        assert!(
            r.closed_by.is_none(),
            "a leaver left by itself: {:?}",
            r.closed_by
        );
    }
    for h in stay {
        assert_eq!(join(h)?.stats.rejected, 0);
    }
    println!("churn run: {counters}");
    assert_eq!(counters["micro_batches_abandoned"], 0);

    let credits = credit_rows(&dir.db()).await?;
    let distinct: std::collections::BTreeSet<(u64, u32)> =
        credits.iter().map(|c| (c.1, c.2)).collect();
    let unique: std::collections::BTreeSet<(u64, u64, u32)> = credits.iter().copied().collect();
    // Every micro-batch of every step was accepted once, its credits written once per agreeing worker, and every
    // accepted result the coordinator counted is in the ledger.
    assert_eq!(
        distinct.len() as u64,
        STEPS * MICROS_PER_STEP,
        "an accepted micro-batch is missing from the ledger"
    );
    assert_eq!(unique.len(), credits.len(), "a credit was written twice");
    assert_eq!(
        credits.len() as u64,
        counters["results_accepted"].as_u64().unwrap()
    );
    for &(s, m) in &distinct {
        let n = credits.iter().filter(|c| (c.1, c.2) == (s, m)).count();
        assert!(
            (2..=6).contains(&n),
            "step {s} micro {m}: {n} credited workers"
        );
    }
    let store = Store::open(&dir.db()).await?;
    let train: Vec<_> = store
        .metrics(JobId(1))
        .await?
        .into_iter()
        .filter(|m| m.kind == "train")
        .collect();
    assert!(train.len() as u64 == STEPS && train.iter().all(|m| m.min_agreeing >= 2));
    store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// One of a colluding pair that forms every quorum: it flips the sign of every gradient, as its partner does.
fn lie_together(lies: Arc<Mutex<u64>>) -> SendTamper {
    Box::new(move |out: &mut StepOutput| {
        out.grad.iter_mut().for_each(|g| *g = -*g);
        *lies.lock().unwrap() += 1;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_forms_every_quorum_and_lies_together_is_refused_by_audits()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("audit");
    // A higher audit share than the default, so the pair is caught within this short run with near certainty
    // ((1 - 0.25)^k for k lies that both got through).
    create_demo_job(
        &dir.db(),
        Hyper {
            audit: 0.25,
            ..short(STEPS)
        },
    )
    .await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;

    let lies = Arc::new(Mutex::new(0u64));
    let pair: Vec<_> = (0..2)
        .map(|i| {
            spawn_worker(
                server.ws_url(),
                BackendChoice::Cpu,
                &format!("colluder{i}"),
                None,
                None,
                Some(lie_together(lies.clone())),
            )
        })
        .collect();
    // The pair alone first: every micro-batch's quorum is the pair, both send the same sign-flipped gradient, the
    // replicas agree, and only an audit can see it. (A pair that lies only when it happens to meet beside faster
    // honest workers rarely meets: least-replicated-first placement gives each micro-batch one honest and one
    // colluding replica, and those disagreements go to arbitration, which the other tests cover.)
    server
        .wait_job(1, Duration::from_secs(120), |j| {
            j["counters"]["audit_failures"].as_u64() >= Some(1)
        })
        .await?;
    // Honest volunteers then finish the job.
    let honest = spawn_honest(&server, 2);
    let run = finish(server, &dir.db(), STEPS, 2, honest).await?;
    let pair = pair
        .into_iter()
        .map(join)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let counters = &run.job["counters"];
    println!(
        "pair: {:?} / {:?}; lies sent {}; counters {counters}; accuracy {}",
        pair[0].stats,
        pair[1].stats,
        lies.lock().unwrap(),
        run.accuracy
    );
    assert!(
        *lies.lock().unwrap() > 0,
        "the pair met and lied at least once"
    );
    assert!(counters["audit_failures"].as_u64() >= Some(1));
    for r in &pair {
        assert!(refused(r), "colluder not refused: {:?}", r.closed_by);
    }
    // `finish` checked that no honest result was rejected and that the ledger (clawbacks included) verifies.
    Ok(())
}
