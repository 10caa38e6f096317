//! One training scenario: a fresh coordinator with the demo job, N volunteers on one link profile with log-normal
//! device speeds and churn, run until the held-out accuracy reaches the target or the time cap; and its figures.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use starling_core::rng::SplitMix64;

use crate::coordinator::{Coordinator, Launch, usage};
use crate::link::Link;
use crate::volunteer::{Command, Handle, Shards, Spec};

/// The job a scenario trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobMode {
    /// The demo job as `serve --demo` creates it (protocol v1, a gradient per 32-row micro-batch).
    Sync,
    /// The same model and dataset as a `local` job (protocol v2): leases of [`LOCAL_H`] inner steps, int8 deltas
    /// both ways.
    Local,
}

/// Inner steps per lease of the `local` scenarios.
pub const LOCAL_H: u32 = 16;
/// Base shards (leases, each replicated R = 2 times) per outer round of the `local` scenarios.
pub const LOCAL_LEASES: u32 = 8;
/// Most shards an elastic round of the `local` scenarios grows to while volunteers are idle.
pub const LOCAL_MAX_SHARDS: u32 = 128;

impl JobMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sync" => Some(Self::Sync),
            "local" => Some(Self::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Local => "local",
        }
    }

    /// The hyperparameters of the job replacing the demo job (`None`: keep the demo job).
    fn hyper(self, elastic: bool) -> Option<serde_json::Value> {
        match self {
            Self::Sync => None,
            // A lease walks its own 512 rows (H × inner batch) once; the round's 8 leases are a 4,096-row shard of
            // the training set; held-out accuracy after every round, as the target needs.
            Self::Local => {
                let lease_rows = LOCAL_H * 32;
                Some(serde_json::json!({
                    "mode": "local", "h": LOCAL_H, "inner_batch": 32, "quant": "int8",
                    "micro_batch": lease_rows, "global_batch": LOCAL_LEASES * lease_rows,
                    "redundancy": 2, "steps": 1000, "eval_every": 1,
                    // `--elastic`: a round grows a shard (leased R-fold) whenever a volunteer is idle, up to 128,
                    // and closes at its base shards' worth of verified samples; the shards still out carry into
                    // the next rounds (bounded staleness, weighted 1/(1+s)). Otherwise 8 fixed shards per round.
                    "round_shards_max": elastic.then_some(LOCAL_MAX_SHARDS),
                }))
            }
        }
    }
}

/// Knobs shared by every scenario of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub launch: Launch,
    /// Held-out accuracy that ends a scenario.
    pub target: f32,
    /// Wall-clock cap per scenario.
    pub cap: Duration,
    /// Volunteers leaving (and as many joining) per minute, as a share of those connected.
    pub churn_per_min: f64,
    /// Share of leavers that vanish without closing.
    pub vanish_share: f64,
    /// Share of joiners that return with a departed volunteer's token.
    pub return_share: f64,
    /// Ratio of the 95th to the 5th percentile device slow-down (log-normal; the 5th percentile is 1×).
    pub speed_spread: f64,
    /// Volunteer shard threads.
    pub threads: usize,
    /// `local` scenarios: elastic rounds (up to [`LOCAL_MAX_SHARDS`] shards) instead of [`LOCAL_LEASES`] fixed ones.
    pub elastic: bool,
    pub seed: u64,
}

/// A scenario's figures (the JSON line's fields, plus a few for the table).
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    pub mode: &'static str,
    pub volunteers: usize,
    /// `None` when the cap was hit first.
    pub time_to_target_s: Option<f64>,
    pub vs_lan: Option<f64>,
    pub samples_per_s: f64,
    pub utilisation: f64,
    pub bytes_up_per_sample: f64,
    pub bytes_down_per_sample: f64,
    pub leases_lost: u64,
    pub coord_cpu_share: f64,
    pub coord_rss_mib: f64,
    #[serde(skip)]
    pub extra: Extra,
}

/// Table-only figures.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub wall_s: f64,
    pub steps: u64,
    pub accuracy: Option<f32>,
    pub leases_expired: u64,
    pub speculative: u64,
    pub left: u64,
    pub joined: u64,
    /// Coordinator RSS growth per connected volunteer.
    pub kib_per_conn: f64,
    pub driver_cpu_share: f64,
    pub errors: usize,
    pub first_error: Option<String>,
}

struct Member {
    handle: Handle,
    joined: Instant,
    left: Option<Instant>,
}

/// Log-normal slow-down with the 5th percentile at 1× and the 95th at `spread`×.
fn slowdown(rng: &mut SplitMix64, spread: f64) -> f64 {
    const Z95: f64 = 1.644_853_6;
    let sigma = spread.max(1.0).ln() / (2.0 * Z95);
    (sigma * Z95 + sigma * rng.normal()).exp().max(1.0)
}

/// Runs one scenario.
pub fn run(
    name: &str,
    link: Link,
    volunteers: usize,
    mode: JobMode,
    opts: &Options,
) -> anyhow::Result<Figures> {
    let coord = Coordinator::start(&opts.launch, name)?;
    let job_id = match mode.hyper(opts.elastic) {
        None => 1,
        Some(h) => coord
            .replace_demo_job(&format!("swarm-{}", mode.as_str()), h)
            .context("creating the scenario's job")?,
    };
    let job = coord.job(job_id).context("the scenario's job")?;
    let base = coord.usage()?;
    let me = std::process::id();
    let driver0 = usage(me)?;
    let mut rng = SplitMix64::new(opts.seed ^ (volunteers as u64) << 32 ^ name.len() as u64);
    let mut shards = Shards::start(opts.threads)?;
    let mut members: Vec<Member> = Vec::new();
    let mut next_index = 0u64;
    let mut tokens: Vec<String> = Vec::new();
    let mut join = |shards: &mut Shards, token: Option<String>, rng: &mut SplitMix64| {
        let spec = Spec {
            index: next_index,
            coordinator: coord.addr,
            link,
            slowdown: slowdown(rng, opts.speed_spread),
            token,
        };
        next_index += 1;
        Member {
            handle: shards.spawn(spec),
            joined: Instant::now(),
            left: None,
        }
    };

    let t0 = Instant::now();
    let t0_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for _ in 0..volunteers {
        members.push(join(&mut shards, None, &mut rng));
    }
    let (mut reached, mut last) = (None, job);
    let (mut churn_due, mut left, mut joined) = (0.0f64, 0u64, 0u64);
    let tick = Duration::from_millis(500);
    let mut last_tick = t0;
    while t0.elapsed() < opts.cap {
        std::thread::sleep(tick);
        match coord.job(job_id) {
            Ok(j) => last = j,
            Err(e) => eprintln!("swarm: polling the job: {e:#}"),
        }
        if let Some(e) = last
            .last_eval
            .as_ref()
            .filter(|e| e.accuracy >= opts.target)
        {
            // The evaluation's own timestamp, not this poll's: the poll interval would quantise short runs.
            reached = Some(match e.at_ms {
                Some(at) if at >= t0_ms => Duration::from_millis(at - t0_ms).min(t0.elapsed()),
                _ => t0.elapsed(),
            });
            break;
        }
        if last.status != "running" {
            eprintln!("swarm: the job is {}, not running", last.status);
            break;
        }
        // Churn: leavers at the set rate, each replaced at once by a newcomer or a returning volunteer.
        let dt = last_tick.elapsed().as_secs_f64();
        last_tick = Instant::now();
        let mut live: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].left.is_none())
            .collect();
        churn_due += live.len() as f64 * opts.churn_per_min / 100.0 / 60.0 * dt;
        while churn_due >= 1.0 && !live.is_empty() {
            churn_due -= 1.0;
            let victim = live.swap_remove(rng.below(live.len() as u64) as usize);
            let m = &mut members[victim];
            let how = if rng.next_f64() < opts.vanish_share {
                Command::Vanish
            } else {
                Command::Close
            };
            let _ = m.handle.cmd.send(how);
            m.left = Some(Instant::now());
            if let Ok(Some(t)) = m.handle.shared.token.lock().map(|t| t.clone()) {
                tokens.push(t);
            }
            left += 1;
            let token = (rng.next_f64() < opts.return_share && !tokens.is_empty())
                .then(|| tokens.swap_remove(rng.below(tokens.len() as u64) as usize));
            members.push(join(&mut shards, token, &mut rng));
            joined += 1;
        }
    }
    let wall = reached.unwrap_or_else(|| t0.elapsed());
    let end = Instant::now();
    let used = coord.usage()?;
    let driver1 = usage(me)?;
    let (mut up, mut down, mut compute_ns, mut alive_ns, mut lost) =
        (0u64, 0u64, 0u64, 0u128, 0u64);
    let mut errors = Vec::new();
    for m in &members {
        let s = &m.handle.shared;
        up += s.meter.up.load(Ordering::Relaxed);
        down += s.meter.down.load(Ordering::Relaxed);
        compute_ns += s.compute_ns.load(Ordering::Relaxed);
        lost += s.lost.load(Ordering::Relaxed);
        alive_ns += (m.left.unwrap_or(end) - m.joined).as_nanos();
        if let Ok(Some(e)) = s.error.lock().map(|e| e.clone()) {
            errors.push(e);
        }
    }
    for m in &members {
        let _ = m.handle.cmd.send(Command::End);
    }
    shards.join();
    drop(coord);

    let steps = last.step;
    let samples = last.samples();
    let secs = wall.as_secs_f64();
    let per = |bytes: u64| {
        if samples > 0.0 {
            bytes as f64 / samples
        } else {
            0.0
        }
    };
    Ok(Figures {
        name: name.to_string(),
        mode: mode.as_str(),
        volunteers,
        time_to_target_s: reached.map(|d| d.as_secs_f64()),
        vs_lan: None,
        samples_per_s: samples / secs,
        utilisation: compute_ns as f64 / alive_ns.max(1) as f64,
        bytes_up_per_sample: per(up),
        bytes_down_per_sample: per(down),
        leases_lost: lost,
        coord_cpu_share: (used.cpu_s - base.cpu_s) / secs,
        coord_rss_mib: used.peak_kib as f64 / 1024.0,
        extra: Extra {
            wall_s: secs,
            steps,
            accuracy: last.last_eval.as_ref().map(|e| e.accuracy),
            leases_expired: last.counters.leases_expired,
            speculative: last.counters.speculative_leases,
            left,
            joined,
            kib_per_conn: used.rss_kib.saturating_sub(base.rss_kib) as f64
                / volunteers.max(1) as f64,
            driver_cpu_share: (driver1.cpu_s - driver0.cpu_s)
                / end.duration_since(t0).as_secs_f64(),
            errors: errors.len(),
            first_error: errors.into_iter().next(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowdowns_span_the_spread() {
        let mut rng = SplitMix64::new(7);
        let mut s: Vec<f64> = (0..20_000).map(|_| slowdown(&mut rng, 10.0)).collect();
        s.sort_by(f64::total_cmp);
        let p = |q: f64| s[(q * s.len() as f64) as usize];
        assert!((p(0.05) - 1.0).abs() < 0.05, "p5 {}", p(0.05));
        assert!((p(0.95) / p(0.05) - 10.0).abs() < 1.0, "p95 {}", p(0.95));
    }
}
