//! The failover test's probes of the durable state (PostgreSQL queries, the nodes' `/metrics`) and its check of the
//! workers' lease log against the nodes' leaderships.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sqlx::Row as _;

use super::{INCARNATIONS, Node};

pub async fn scalar(pool: &sqlx::PgPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query(sql)
        .fetch_optional(pool)
        .await?
        .map_or(-1, |r| r.get::<i64, _>(0)))
}

pub async fn leader(pool: &sqlx::PgPool) -> anyhow::Result<(i64, Option<String>)> {
    let r = sqlx::query("SELECT leader_epoch, leader_node FROM jobs WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok((r.get(0), r.get(1)))
}

pub async fn step(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    scalar(pool, "SELECT step FROM checkpoints WHERE job_id = 1").await
}

/// Workers connected to each node, from their `/metrics`.
pub fn connected(nodes: &[Node]) -> u64 {
    nodes
        .iter()
        .filter_map(|n| ureq::get(&format!("{}/metrics", n.url)).call().ok())
        .filter_map(|mut r| r.body_mut().read_to_string().ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.starts_with("starling_workers_connected"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum::<f64>() as u64
}

/// Waits until the job's checkpoint passes `at_least`, returning the step.
pub async fn wait_step(
    pool: &sqlx::PgPool,
    at_least: i64,
    deadline: Instant,
) -> anyhow::Result<i64> {
    loop {
        let s = step(pool).await?;
        if s >= at_least {
            return Ok(s);
        }
        ensure!(
            Instant::now() < deadline,
            "job stuck at step {s} (wanted {at_least})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kill (or stop) at `t0`; returns (seconds to the new leader's first step, seconds to 95% of workers connected).
pub async fn failover_figures(
    pool: &sqlx::PgPool,
    nodes: &[Node],
    t0: Instant,
    epoch_before: i64,
    step_before: i64,
    workers: u64,
) -> anyhow::Result<(f64, f64)> {
    let deadline = t0 + Duration::from_secs(60);
    let first_step = loop {
        let (epoch, _) = leader(pool).await?;
        if epoch > epoch_before && step(pool).await? > step_before {
            break t0.elapsed().as_secs_f64();
        }
        ensure!(
            Instant::now() < deadline,
            "no new leader stepped within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let reconnected = loop {
        if connected(nodes) * 100 >= workers * 95 {
            break t0.elapsed().as_secs_f64();
        }
        ensure!(
            Instant::now() < deadline,
            "workers did not come back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok((first_step, reconnected))
}

/// (worker, step, micro-batch).
pub type Slot = (u64, u64, u64);

/// A lease may reach a worker a little before its node's "took over" line is stamped (another connection's task
/// can lease as soon as the job is loaded): a takeover this soon after a lease still counts as before it.
const TAKEOVER_SLACK_US: u64 = 100_000;

/// What the lease log (every lease every worker received, `STARLING_LEASE_LOG` in `native.rs`) says, checked
/// against the nodes' own record of the leaderships they took ("took over … epoch=N"). Each lease belongs to the
/// node incarnation that was running at its URL when it arrived, and to the epoch that incarnation took last
/// before it. Asserts: every epoch was taken by one incarnation only; every lease came from a node that had taken
/// the job over; within one epoch all leases came from that one incarnation and no lease id was granted twice (to
/// two workers or to one twice). A micro-batch leased again in a later epoch (the new leader reloads the step:
/// re-issue after a failover), to another worker, or to the same worker after it lost its lease (counted and
/// printed) is legitimate; that no worker got two results of one micro-batch accepted is checked on the credits.
/// Returns the number of leases the three nodes granted and the (worker, step, micro-batch) triples they granted.
pub fn check_leases(
    log: &Path,
    node_urls: &BTreeSet<String>,
) -> anyhow::Result<(u64, BTreeSet<Slot>)> {
    let incarnations = INCARNATIONS.lock().unwrap_or_else(|e| e.into_inner());
    let mut taken_by: BTreeMap<i64, String> = BTreeMap::new();
    for inc in incarnations.iter() {
        let key = format!("{}@{}", inc.node, inc.spawned_us);
        for &(_, epoch) in inc
            .takeovers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Some(other) = taken_by.insert(epoch, key.clone()) {
                bail!("epoch {epoch} was taken by two node processes: {other} and {key}");
            }
        }
    }
    // epoch → (incarnation, lease ids, (worker, step, micro)).
    type Epoch = (String, BTreeSet<u64>, BTreeSet<Slot>);
    let mut epochs: BTreeMap<i64, Epoch> = BTreeMap::new();
    let mut granted = BTreeSet::new();
    let (mut count, mut again) = (0, 0);
    for line in std::fs::read_to_string(log)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let url = v["url"].as_str().context("url")?;
        if !node_urls.contains(url) {
            // The single-node reference run, in the same process.
            continue;
        }
        let num = |k: &str| v[k].as_u64().with_context(|| format!("{k} in {line}"));
        let (t, lease, worker, step, micro) = (
            num("t_us")?,
            num("lease")?,
            num("worker")?,
            num("step")?,
            num("micro")?,
        );
        let inc = incarnations
            .iter()
            .filter(|i| i.url == url && i.spawned_us <= t)
            .max_by_key(|i| i.spawned_us)
            .with_context(|| format!("a lease from no node process of ours: {line}"))?;
        let key = format!("{}@{}", inc.node, inc.spawned_us);
        let epoch = inc
            .takeovers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(at, _)| *at <= t + TAKEOVER_SLACK_US)
            .max_by_key(|(at, _)| *at)
            .map(|&(_, e)| e)
            .with_context(|| format!("{key} granted a lease without leading the job: {line}"))?;
        let e = epochs
            .entry(epoch)
            .or_insert_with(|| (key.clone(), BTreeSet::new(), BTreeSet::new()));
        ensure!(
            e.0 == key,
            "epoch {epoch}: leases from {} and from {key}",
            e.0
        );
        ensure!(
            e.1.insert(lease),
            "epoch {epoch}: lease {lease} granted twice ({line})"
        );
        if !e.2.insert((worker, step, micro)) {
            // Legitimate only after the worker lost its earlier lease of it (a closed connection or a passed
            // deadline: `State::lose_lease`); the credits check shows it never got two results accepted.
            again += 1;
        }
        granted.insert((worker, step, micro));
        count += 1;
    }
    ensure!(
        epochs.len() >= 3,
        "leases in only {} epochs: {:?}",
        epochs.len(),
        epochs.keys()
    );
    println!(
        "lease log: {count} leases in epochs {:?}, each epoch from one node process, no lease id twice; \
         {again} re-leased to the same worker after a lost lease in the same epoch",
        epochs.keys().collect::<Vec<_>>()
    );
    Ok((count, granted))
}
