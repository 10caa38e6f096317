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

use raw::{Raw, RawReport, Sent, Shared, raw_peer};

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

mod audited; // Audited mode: trusted results alone, audits by trusted workers, a sleeper caught; placement.
mod churn; // 30% of the workers vanish mid-run.
mod collusion; // Pairs that lie together: caught by arbitration, refused by audits.
mod lies; // Lying, stale, replaying and copying workers, and hand-driven peers.
mod raw; // Hand-driven protocol peers: non-finite, stale, replayed and copied results.
