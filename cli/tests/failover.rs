//! Failover with the real binary on PostgreSQL: three `starling serve` nodes on one throwaway PostgreSQL, native
//! workers spread over them (each knowing the other nodes as fallbacks) and one lying worker. Mid-training the node
//! leading the job is killed (`kill -9`) and restarted, later a node that does not lead it is killed and restarted,
//! and then the leader is stopped (`SIGSTOP`) for longer than the lease and continued. Afterwards, from the durable
//! state: the ledger verifies and equals the workers' balances, every step's micro-batches were accepted and
//! credited (no gap in the model versions, one train metric per step), every verdict `accepted` a worker was told
//! is in the ledger, the lie was never credited, and the job ends at the accuracy of the same job on one SQLite
//! node. Prints the failover figures (kill → new leader's first step, → 95% of workers reconnected) and
//! PostgreSQL's transaction rate over the run.

// Not every helper there is needed here (each test binary compiles its own copy).
#[path = "failover/checks.rs"]
mod checks;
#[allow(dead_code)]
mod common;
#[path = "../../coordinator/tests/pg/mod.rs"]
mod pg;

use checks::{check_leases, failover_figures, leader, scalar, step, wait_step};
use common::{BIN, temp_dir};
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sqlx::Row as _;
use starling_core::data::{TensorData, encode_safetensors};
use starling_worker::engine::{BackendChoice, Device};
use starling_worker::native::{Reconnect, WorkerOptions, WorkerReport, run_reconnecting};

const STEPS: u64 = 240;
const LEASE_MS: u64 = 1500;
const HONEST: usize = 5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn starling(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    if !out.status.success() {
        bail!(
            "starling {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A `starling serve` node; killed (SIGKILL, after SIGCONT) when dropped.
struct Node {
    id: String,
    child: Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        signal(&self.child, "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .stderr(Stdio::null())
        .status();
}

/// One run of a node process (a restarted node is a new incarnation at the same address), with the job
/// leaderships it took: (wall-clock µs of its "took over" log line, epoch).
struct Incarnation {
    node: String,
    url: String,
    spawned_us: u64,
    takeovers: Arc<Mutex<Vec<(u64, i64)>>>,
}

/// Every node process this test started, in order.
static INCARNATIONS: Mutex<Vec<Incarnation>> = Mutex::new(Vec::new());

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Microseconds since the Unix epoch of a log line's leading `YYYY-MM-DDTHH:MM:SS.ffffffZ` (tracing's timestamp).
fn log_time_us(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let (&[y, m, day], &[hh, mm, ss]) = (d.as_slice(), t.as_slice()) else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000 + micros) as u64)
}

/// Starts node `node` on `addr` (a restarted node comes back where its workers know it).
fn serve(db: &str, node: &str, addr: &str) -> anyhow::Result<Node> {
    let spawned_us = now_us();
    let takeovers = Arc::new(Mutex::new(Vec::new()));
    let mut child = Command::new(BIN)
        .args(["serve", "--addr", addr, "--db", db, "--node-id", node])
        .args(["--lease-ms", &LEASE_MS.to_string(), "--www"])
        .arg(root().join("www"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let tag = node.to_string();
    let took = takeovers.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("took over the job's leadership")
                && let Some(epoch) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("epoch=")?.parse::<i64>().ok())
                && let Some(t) = log_time_us(&line)
            {
                took.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((t, epoch));
            }
            if line.contains("took over")
                || line.contains("lost")
                || line.contains("fenced")
                || line.contains("WARN")
                || line.contains("ERROR")
                || line.contains("worker connected")
            {
                eprintln!("[{tag}] {line}");
            }
            if let Some(rest) = line.split("volunteer page http://").nth(1) {
                let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .context("node did not report its address")?;
    INCARNATIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Incarnation {
            node: node.to_string(),
            url: ws(&format!("http://{addr}")),
            spawned_us,
            takeovers,
        });
    Ok(Node {
        id: node.to_string(),
        child,
        url: format!("http://{addr}"),
    })
}

fn ws(url: &str) -> String {
    format!("{}/ws", url.replace("http://", "ws://"))
}

/// Three overlapping blobs in 6-D (as in cli.rs): learnable, not perfectly.
fn blobs(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = starling_core::rng::SplitMix64::new(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = (i % 3) as u32;
        for d in 0..6 {
            let centre = if d % 3 == c as usize { 1.0 } else { 0.0 };
            x.push(centre + 0.8 * rng.normal() as f32);
        }
        y.push(c);
    }
    (x, y)
}

fn write_job(dir: &Path) -> anyhow::Result<PathBuf> {
    let (x, y) = blobs(900, 1);
    let (tx, ty) = blobs(300, 2);
    let data = encode_safetensors(
        &[
            ("features", vec![900, 6], TensorData::F32(&x)),
            ("labels", vec![900], TensorData::U32(&y)),
            ("test_features", vec![300, 6], TensorData::F32(&tx)),
            ("test_labels", vec![300], TensorData::U32(&ty)),
        ],
        &Default::default(),
    )?;
    std::fs::write(dir.join("blobs.safetensors"), data)?;
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "blobs"
dataset = "blobs.safetensors"

[spec]
input = 6
layers = [ {{ units = 16, activation = "relu" }}, {{ units = 3, activation = "none" }} ]

[hyper]
global_batch = 64
micro_batch = 16
steps = {STEPS}
eval_every = 40
optimizer = {{ kind = "adam", lr = 0.01 }}
"#
        ),
    )?;
    Ok(job)
}

/// A native worker in a thread of its own (the real runner), reconnecting through `urls` until `stop` and the
/// coordinators are gone. A liar multiplies every gradient by 3.
fn worker(
    name: String,
    urls: Vec<String>,
    liar: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let device = Device::open(BackendChoice::Cpu).await?;
            let tamper: Option<starling_worker::session::Tamper> = liar.then(|| {
                Box::new(|out: &mut starling_core::StepOutput| {
                    out.grad.iter_mut().for_each(|g| *g *= 3.0)
                }) as starling_worker::session::Tamper
            });
            let opts = WorkerOptions {
                coordinator: urls[0].clone(),
                backend: BackendChoice::Cpu,
                name: Some(name),
                token: None,
                max_leases: None,
                dataset_cache: None,
            };
            // One node (the reference run): no failover to ride out, so no reconnecting.
            let single = urls.len() == 1;
            let reconnect = Reconnect {
                fallbacks: urls[1..].to_vec(),
                // Longer than any outage in the test (a stopped leader's workers may first try it again and wait
                // out its silent handshake); the workers give up this long after the last node is stopped.
                give_up_after: (!single).then_some(Duration::from_secs(15)),
                silence: (!single).then_some(Duration::from_millis(2 * LEASE_MS)),
            };
            let run = run_reconnecting(device, opts, tamper, reconnect);
            tokio::select! {
                r = run => r,
                _ = async {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    // The coordinators are gone: give the runner time to give up reconnecting by itself.
                    tokio::time::sleep(Duration::from_secs(40)).await
                } => {
                    bail!("worker still running 40 s after every coordinator was stopped")
                }
            }
        })
    })
}

/// The same job on one SQLite node with two workers: the accuracy a failover must not change.
fn single_node_accuracy(dir: &Path, job: &Path) -> anyhow::Result<f64> {
    let db = dir.join("single.db");
    let token = starling(
        &[
            "token",
            "create",
            "--name",
            "solo",
            "--db",
            db.to_str().context("path")?,
        ],
        &[],
    )?;
    let mut node = serve(db.to_str().context("path")?, "solo", "127.0.0.1:0")?;
    let env = [
        ("STARLING_URL", node.url.as_str()),
        ("STARLING_TOKEN", token.trim()),
    ];
    starling(&["job", "submit", job.to_str().context("path")?], &env)?;
    let stop = Arc::new(AtomicBool::new(false));
    let ws_url = ws(&node.url);
    let ws = [
        worker("s0".into(), vec![ws_url.clone()], false, stop.clone()),
        worker("s1".into(), vec![ws_url], false, stop.clone()),
    ];
    let deadline = Instant::now() + Duration::from_secs(240);
    let accuracy = loop {
        let s: serde_json::Value =
            serde_json::from_str(&starling(&["job", "status", "1", "--json"], &env)?)?;
        if s["last_eval"]["step"] == STEPS {
            break s["last_eval"]["accuracy"].as_f64().context("accuracy")?;
        }
        ensure!(
            Instant::now() < deadline,
            "single-node run did not finish: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = node.child.kill();
    let _ = node.child.wait();
    stop.store(true, Ordering::Relaxed);
    for w in ws {
        let _ = w.join();
    }
    drop(node);
    Ok(accuracy)
}

#[test]
fn three_nodes_survive_kills_and_a_pause_with_every_invariant() -> anyhow::Result<()> {
    let Some(server) = pg::PgServer::start("failover") else {
        return Ok(());
    };
    let dir = temp_dir("failover");
    // Every lease every worker of this process receives (the reference run's too; told apart by URL).
    let lease_log = dir.join("leases.jsonl");
    starling_worker::native::log_leases_to(&lease_log)?;
    let job = write_job(&dir)?;
    let reference = std::thread::spawn({
        let (dir, job) = (dir.clone(), job.clone());
        move || single_node_accuracy(&dir, &job)
    });
    let db = server.create_db("failover")?;
    let token = starling(&["token", "create", "--name", "alice", "--db", &db], &[])?
        .trim()
        .to_string();
    let addrs: Vec<String> = (0..3)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            Ok(l.local_addr()?.to_string())
        })
        .collect::<anyhow::Result<_>>()?;
    let addr_of = |id: &str| addrs[id[1..].parse::<usize>().unwrap_or(1) - 1].clone();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| {
            let id = format!("n{i}");
            serve(&db, &id, &addr_of(&id))
        })
        .collect::<anyhow::Result<_>>()?;
    let env = [
        ("STARLING_URL", nodes[0].url.as_str()),
        ("STARLING_TOKEN", token.as_str()),
    ];
    let id = starling(&["job", "submit", job.to_str().unwrap()], &env)?;
    assert_eq!(id.trim(), "1");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pool = rt.block_on(sqlx::PgPool::connect(&db))?;
    let xact = |pool: &sqlx::PgPool| {
        rt.block_on(scalar(
            pool,
            "SELECT xact_commit FROM pg_stat_database WHERE datname = 'failover'",
        ))
    };
    let (xact0, t_start) = (xact(&pool)?, Instant::now());

    // Workers spread over the nodes, each knowing the others; the liar on the third.
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = nodes.iter().map(|n| ws(&n.url)).collect();
    let node_urls: BTreeSet<String> = urls.iter().cloned().collect();
    let spread = |i: usize| -> Vec<String> { (0..3).map(|k| urls[(i + k) % 3].clone()).collect() };
    let mut handles: Vec<_> = (0..HONEST)
        .map(|i| worker(format!("w{i}"), spread(i), false, stop.clone()))
        .collect();
    let liar = worker("liar".into(), spread(2), true, stop.clone());
    let all = HONEST as u64;

    let deadline = Instant::now() + Duration::from_secs(300);
    let mut figures = Vec::new();
    // 1. kill -9 the leader.
    rt.block_on(wait_step(&pool, 40, deadline))?;
    let (epoch, lead) = rt.block_on(leader(&pool))?;
    let lead = lead.context("no leader")?;
    let at = rt.block_on(step(&pool))?;
    let k = nodes
        .iter()
        .position(|n| n.id == lead)
        .context("leader not ours")?;
    let t0 = Instant::now();
    let mut dead = nodes.remove(k);
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    figures.push((
        "kill -9 leader",
        rt.block_on(failover_figures(&pool, &nodes, t0, epoch, at, all))?,
    ));
    nodes.push(serve(&db, &dead.id, &addr_of(&dead.id))?);
    drop(dead);

    // 2. kill -9 a node that does not lead the job.
    rt.block_on(wait_step(&pool, at + 40, deadline))?;
    let (_, lead) = rt.block_on(leader(&pool))?;
    let k = nodes
        .iter()
        .position(|n| Some(&n.id) != lead.as_ref())
        .context("no non-leader")?;
    let mut dead = nodes.remove(k);
    let _ = dead.child.kill();
    let _ = dead.child.wait();
    nodes.push(serve(&db, &dead.id, &addr_of(&dead.id))?);
    drop(dead);

    // 3. SIGSTOP the leader for three leases, then SIGCONT: another node takes over; the old one's writes are fenced.
    let at = rt.block_on(wait_step(&pool, rt.block_on(step(&pool))? + 30, deadline))?;
    let (epoch, lead) = rt.block_on(leader(&pool))?;
    let k = nodes
        .iter()
        .position(|n| Some(&n.id) == lead.as_ref())
        .context("leader not ours")?;
    let t0 = Instant::now();
    signal(&nodes[k].child, "STOP");
    let others: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != k)
        .map(|(_, n)| n)
        .collect();
    let deadline_stop = t0 + Duration::from_secs(60);
    let took = loop {
        let (e, _) = rt.block_on(leader(&pool))?;
        if e > epoch && rt.block_on(step(&pool))? > at {
            break t0.elapsed().as_secs_f64();
        }
        ensure!(
            Instant::now() < deadline_stop,
            "nobody took over from the stopped leader"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let _ = others;
    std::thread::sleep(Duration::from_millis(3 * LEASE_MS).saturating_sub(t0.elapsed()));
    signal(&nodes[k].child, "CONT");
    figures.push(("SIGSTOP leader", (took, f64::NAN)));

    // The job finishes.
    loop {
        let done = rt.block_on(scalar(
            &pool,
            "SELECT COUNT(*) FROM metrics WHERE job_id = 1 AND kind = 'eval' AND step = 240",
        ))?;
        if done == 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "the job did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (xact1, secs) = (xact(&pool)?, t_start.elapsed().as_secs_f64());
    let accuracy: f64 = rt
        .block_on(
            sqlx::query(
                "SELECT accuracy FROM metrics WHERE job_id = 1 AND kind = 'eval' AND step = $1",
            )
            .bind(STEPS as i64)
            .fetch_one(&pool),
        )?
        .get(0);
    // Owners get the same answer from every node: the leader answers, the others forward to it.
    for n in &nodes {
        let env = [
            ("STARLING_URL", n.url.as_str()),
            ("STARLING_TOKEN", token.as_str()),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        let s: serde_json::Value = loop {
            // A node that was just continued may still see the job failing over (503): ask again.
            match starling(&["job", "status", "1", "--json"], &env) {
                Ok(out) => break serde_json::from_str(&out)?,
                Err(e) if Instant::now() < deadline => eprintln!("{}: {e}", n.id),
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        ensure!(
            s["step"] == STEPS && s["status"] == "completed",
            "{} answered {s}",
            n.id
        );
    }
    // Every node lists the job (led by one of them) and reports it in its cluster-wide metrics, under its
    // leader's name only; a node's own /metrics has only the jobs it leads.
    let (_, lead) = rt.block_on(leader(&pool))?;
    let lead = lead.context("no leader at the end")?;
    for n in &nodes {
        let list: serde_json::Value = ureq::get(&format!("{}/api/v1/jobs", n.url))
            .header("Authorization", &format!("Bearer {token}"))
            .call()?
            .body_mut()
            .read_json()?;
        let listed: Vec<&serde_json::Value> = list
            .as_array()
            .context("a job list")?
            .iter()
            .filter(|j| j["id"] == 1)
            .collect();
        ensure!(
            listed.len() == 1 && listed[0]["step"] == STEPS,
            "{} lists {list}",
            n.id
        );
        let text = ureq::get(&format!("{}/metrics/cluster", n.url))
            .call()?
            .body_mut()
            .read_to_string()?;
        let steps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("starling_job_step{") && l.contains("job=\"1\""))
            .collect();
        ensure!(
            steps
                == [format!(
                    "starling_job_step{{node=\"{lead}\",job=\"1\"}} {STEPS}"
                )],
            "{}'s /metrics/cluster has {steps:?}",
            n.id
        );
        let own = ureq::get(&format!("{}/metrics", n.url))
            .call()?
            .body_mut()
            .read_to_string()?;
        ensure!(
            own.contains("starling_job_step{job=\"1\"}") == (n.id == lead),
            "{}'s own /metrics and the leader {lead} disagree",
            n.id
        );
    }
    // PostgreSQL connections held (each node: a pool of up to 8 plus its leadership session; the test's own pool,
    // less the connection asking, is counted too).
    let pg_conns = rt.block_on(scalar(
        &pool,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = 'failover' AND pid <> pg_backend_pid()",
    ))?;
    // Stop everything: the workers give up reconnecting and report what they were told.
    drop(nodes);
    stop.store(true, Ordering::Relaxed);
    let liar = liar
        .join()
        .map_err(|_| anyhow::anyhow!("liar panicked"))??;
    let reports: Vec<WorkerReport> = handles
        .drain(..)
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
        .collect::<anyhow::Result<_>>()?;

    // No lease granted twice in one epoch (the external observer: the workers' lease log).
    let (leases_logged, granted) = check_leases(&lease_log, &node_urls)?;
    // The ledger verifies (hash chain, balances = sums of entries).
    let verify = starling(&["ledger", "verify", "--db", &db], &[])?;
    assert!(verify.starts_with("ledger ok"), "{verify}");
    rt.block_on(async {
        // Versions rose without gaps: one train metric per step 1..=STEPS, and the checkpoint is at STEPS.
        let steps: Vec<i64> = sqlx::query("SELECT step FROM metrics WHERE job_id = 1 AND kind = 'train' ORDER BY step")
            .fetch_all(&pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(steps == (1..=STEPS as i64).collect::<Vec<_>>(), "train metrics per step: {steps:?}");
        ensure!(step(&pool).await? == STEPS as i64);
        // Every micro-batch of every step was accepted and credited (4 per step; by two agreeing workers, or by one
        // trusted worker whose solo result the coordinator recomputed: adaptive replication), and no credit went to a
        // micro-batch of a step that does not exist.
        let slots = scalar(&pool, "SELECT COUNT(*) FROM (SELECT DISTINCT step, micro FROM credits WHERE job_id = 1 AND flops > 0) t").await?;
        let outside = scalar(&pool, &format!("SELECT COUNT(*) FROM credits WHERE job_id = 1 AND (step >= {STEPS} OR (micro >= 4 AND micro < 2147483648))")).await?;
        ensure!(slots == STEPS as i64 * 4 && outside == 0, "{slots} credited micro-batches, {outside} credits outside the job");
        // At most one accepted result per replica slot: a micro-batch of a step is credited to distinct workers
        // (the table's UNIQUE key) and to no more than the most replicas the coordinator ever asks for; and every
        // credit went to a worker that was leased that micro-batch of that step.
        let most = scalar(&pool, "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM credits WHERE job_id = 1 AND flops > 0 AND micro < 4 GROUP BY step, micro) t").await?;
        ensure!(most <= i64::from(starling_coordinator::job::MAX_REPLICAS), "a micro-batch credited {most} times");
        let credits = sqlx::query("SELECT worker_id, step, micro FROM credits WHERE job_id = 1 AND flops > 0 AND micro < 4")
            .fetch_all(&pool)
            .await?;
        for r in &credits {
            let (w, st, m): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
            ensure!(granted.contains(&(w as u64, st as u64, m as u64)), "worker {w} credited for step {st} micro-batch {m} it was never leased");
        }
        // The liar was never credited (and was struck).
        let liar_id = liar.stats.worker.context("liar never welcomed")? as i64;
        let lied = scalar(&pool, &format!("SELECT COUNT(*) FROM credits WHERE worker_id = {liar_id}")).await?;
        let struck = scalar(&pool, &format!("SELECT rejected FROM workers WHERE id = {liar_id}")).await?;
        ensure!(lied == 0 && struck > 0, "liar: {lied} credits, {struck} rejections");
        // Every `accepted` verdict a worker was told is in the ledger.
        for r in &reports {
            let id = r.stats.worker.context("worker never welcomed")? as i64;
            let durable = scalar(&pool, &format!("SELECT accepted FROM workers WHERE id = {id}")).await?;
            ensure!(durable >= r.stats.accepted as i64, "worker {id}: told {} accepted, {durable} durable", r.stats.accepted);
        }
        anyhow::Ok(())
    })?;
    // Work that earned no credit: leases handed out (to every worker, the liar included) beyond the results credited.
    let leases: u64 = reports.iter().map(|r| r.stats.leases).sum::<u64>() + liar.stats.leases;
    ensure!(
        leases_logged == leases,
        "the lease log has {leases_logged} leases, the workers counted {leases}"
    );
    let credited = rt.block_on(scalar(
        &pool,
        "SELECT COUNT(*) FROM credits WHERE job_id = 1 AND flops > 0",
    ))? as u64;
    let single = reference
        .join()
        .map_err(|_| anyhow::anyhow!("reference panicked"))??;
    println!("accuracy: three nodes with failovers {accuracy:.4}, one SQLite node {single:.4}");
    assert!(
        (accuracy - single).abs() <= 2.0 / 300.0 + 1e-9,
        "failover changed the result: {accuracy} vs {single}"
    );
    for (what, (step_s, conn_s)) in &figures {
        println!(
            "failover after {what}: new leader's first step {step_s:.2} s, 95% of workers reconnected {conn_s:.2} s"
        );
    }
    println!(
        "re-issued or uncredited work: {} of {leases} leases ({:.1}%)",
        leases.saturating_sub(credited),
        100.0 * leases.saturating_sub(credited) as f64 / leases.max(1) as f64
    );
    println!(
        "PostgreSQL connections held by the three nodes (and the test's idle pool): {pg_conns}"
    );
    println!(
        "PostgreSQL: {} commits in {secs:.1} s = {:.0} transactions/s",
        xact1 - xact0,
        (xact1 - xact0) as f64 / secs
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
