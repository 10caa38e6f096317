//! Elastic `local` rounds end to end: many real native CPU workers against a real coordinator on 127.0.0.1:0, each
//! timing its own leases (inner loop started → result computed) so the test measures every worker's idle share
//! between leases while the job has work. A round of four base shards grows a shard pair per idle pair of workers;
//! shards still out at a round's close carry on with bounded staleness, so nobody waits for a round to end.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starling_coordinator::job::{Hyper, Mode};
use starling_core::local::{LeasePlan, LocalOutput};
use starling_core::protocol::Quant;
use starling_tests::*;
use starling_worker::engine::BackendChoice;
use starling_worker::session::LocalLie;

use super::{assert_rounds_verified, spawn_liar};

/// Each lease's inner loop start and end, as one worker saw them.
type Spans = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// An honest worker's stopwatch: it changes nothing, it records when each lease's inner loop starts (the lease and
/// its rows are in hand) and when its output is ready (the result is encoded and sent right after).
struct Stopwatch {
    spans: Spans,
    started: Option<Instant>,
}

impl LocalLie for Stopwatch {
    fn plan(&mut self, _plan: &mut LeasePlan) {
        self.started = Some(Instant::now());
    }

    fn output(&mut self, _out: &mut LocalOutput) {
        if let Some(s) = self.started.take()
            && let Ok(mut spans) = self.spans.lock()
        {
            spans.push((s, Instant::now()));
        }
    }
}

/// What one worker's timestamps say.
#[derive(Debug)]
struct Busy {
    leases: usize,
    /// Share of the time from its first lease's start to its last result that it was not computing.
    idle: f64,
    compute_ms: f64,
    gap_ms: f64,
}

fn busy(spans: &[(Instant, Instant)]) -> Busy {
    let compute: f64 = spans.iter().map(|(s, e)| (*e - *s).as_secs_f64()).sum();
    let (first, last) = (spans[0].0, spans[spans.len() - 1].1);
    let span = (last - first).as_secs_f64().max(1e-9);
    let gaps = spans.len().saturating_sub(1).max(1) as f64;
    Busy {
        leases: spans.len(),
        idle: 1.0 - compute / span,
        compute_ms: 1000.0 * compute / spans.len() as f64,
        gap_ms: 1000.0 * (span - compute) / gaps,
    }
}

/// Runs a `local` job of `rounds` elastic rounds (H = `h` inner steps of 32 rows on 64-row shards, four base shards,
/// at most one shard pair per two workers) with `n` honest CPU workers, and returns each worker's busy figures.
async fn elastic_run(tag: &str, n: usize, h: u32, rounds: u64) -> anyhow::Result<Vec<Busy>> {
    init_tracing();
    let hyper = Hyper {
        mode: Mode::Local,
        h,
        inner_batch: 32,
        micro_batch: 64,
        global_batch: 4 * 64,
        steps: rounds,
        eval_every: rounds,
        quant: Quant::Int8,
        round_shards_max: Some(n as u32),
        ..Hyper::default()
    };
    let cluster = Cluster::builder(tag).hyper(hyper).start().await?;
    let logs: Vec<Spans> = (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let handles: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let watch = Stopwatch {
                spans: log.clone(),
                started: None,
            };
            spawn_liar(
                cluster.server.ws_url(),
                BackendChoice::Cpu,
                &format!("{tag}-{i}"),
                None,
                Some(Box::new(watch)),
            )
        })
        .collect();
    let started = Instant::now();
    let job = cluster
        .server
        .wait_job(1, Duration::from_secs(900), |j| j["status"] == "completed")
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let rounds_applied = assert_rounds_verified(&cluster.server, 1, 2).await?;
    let c = job["counters"].clone();
    cluster.finish().await?;
    for h in handles {
        join(h)?;
    }
    println!(
        "{tag}: {n} workers, H={h}: {rounds_applied} rounds in {wall:.1}s; leases {} accepted {} rejected {} late {} \
         elastic shards {} stale deltas applied {} shards dropped {}",
        c["leases_issued"],
        c["results_accepted"],
        c["results_rejected"],
        c["results_late"],
        c["elastic_shards"],
        c["stale_deltas_applied"],
        c["shards_dropped_stale"],
    );
    assert_eq!(
        c["results_rejected"], 0,
        "honest workers are never rejected"
    );
    assert!(
        c["elastic_shards"].as_u64().unwrap_or(0) > 0,
        "the rounds grew past their base shards: {c}"
    );
    let mut out = Vec::with_capacity(n);
    for (i, log) in logs.iter().enumerate() {
        let spans = log.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        anyhow::ensure!(
            spans.len() >= 2,
            "worker {i} computed {} leases: too few to measure idle time",
            spans.len()
        );
        out.push(busy(&spans));
    }
    let mut idle: Vec<f64> = out.iter().map(|b| b.idle).collect();
    idle.sort_by(f64::total_cmp);
    let mean = |f: fn(&Busy) -> f64| out.iter().map(f).sum::<f64>() / out.len() as f64;
    println!(
        "{tag}: idle share median {:.2}% max {:.2}%; per lease: compute {:.0} ms, gap to the next {:.0} ms; \
         leases per worker {}..{}",
        100.0 * idle[idle.len() / 2],
        100.0 * idle[idle.len() - 1],
        mean(|b| b.compute_ms),
        mean(|b| b.gap_ms),
        out.iter().map(|b| b.leases).min().unwrap_or(0),
        out.iter().map(|b| b.leases).max().unwrap_or(0),
    );
    Ok(out)
}

/// The done-when item: a job with 64 workers keeps all of them busy (no worker idle more than 10% of the
/// run while the job has work). A fixed round of four shards would keep 8 of them busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_workers_are_all_kept_busy_by_elastic_rounds() -> anyhow::Result<()> {
    let busy = elastic_run("elastic-64", 64, 16, 4).await?;
    for (i, b) in busy.iter().enumerate() {
        assert!(
            b.idle <= 0.10,
            "worker {i} idle {:.1}% of its run: {b:?}",
            100.0 * b.idle
        );
    }
    Ok(())
}
