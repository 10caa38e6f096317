//! Connection scale over several nodes (`--idle N --nodes K`): a throwaway PostgreSQL, K `starling serve` nodes on
//! it, and N idle workers spread evenly over them by driver processes ("shards", this binary run again with the
//! hidden `--idle-shard` flag, each under its own fd limit). Reports each node's connections and memory per
//! connection and the time to accept them all; then kills (`-9`) the node holding a share of them and measures how
//! long until 95% (and all) of the workers are welcomed again by the survivors.
//!
//! An idle worker here does what the native worker does when its node goes away: it reconnects after 200 ms,
//! doubling to 4 s, with jitter of up to half the pause, trying the next node in its list each time, and follows a
//! `redirect`. It says hello with the token of its first welcome, so a reconnect is the same worker. The workers of
//! one node list the others in different orders (as an operator would hand out fallback lists), so a dead node's
//! workers spread over the survivors instead of all landing on one (which would then pass its fd limit).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use starling_core::protocol::{Backend, PROTOCOL_VERSION, Platform, WireFrame, WorkerMsg, encode};

use crate::coordinator::{Coordinator, Launch};
use crate::volunteer::{connect_from, source_addr};

#[path = "../../coordinator/tests/pg/mod.rs"]
#[allow(dead_code)]
mod pg;

/// Most connections one shard holds (the fd limit here is 20,000 per process).
pub const PER_SHARD: usize = 12_000;

/// One node's figures.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFigures {
    pub node: String,
    /// Connections the node counts (`/metrics`) once every worker was accepted.
    pub connections: u64,
    pub kib_per_conn: f64,
    /// Connections it counts after the failover (0 for the killed node).
    pub connections_after: u64,
}

/// The run's figures (the JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct FleetFigures {
    pub idle_connections: usize,
    pub nodes: Vec<NodeFigures>,
    pub shards: usize,
    pub welcomed: u64,
    pub accept_s: f64,
    /// Workers of the killed node.
    pub moved: u64,
    /// From the kill to 95% of all workers welcomed again (`None`: not within the cap).
    pub failover_95_s: Option<f64>,
    /// From the kill to every worker welcomed again.
    pub failover_all_s: Option<f64>,
    #[serde(skip)]
    pub failed: u64,
    #[serde(skip)]
    pub first_error: Option<String>,
}

/// What the parent knows of one shard, from its stdout.
#[derive(Debug, Default)]
struct ShardView {
    /// `accepted W F S`: welcomed, failed, seconds.
    accepted: Option<(u64, u64, f64)>,
    /// Workers welcomed and still connected, per node.
    up: Vec<u64>,
    error: Option<String>,
}

/// Runs the cluster figure: `n` idle workers over `nodes` nodes.
pub fn run(
    n: usize,
    nodes: usize,
    concurrency: usize,
    launch: &Launch,
) -> anyhow::Result<FleetFigures> {
    anyhow::ensure!(nodes >= 2, "--nodes needs at least 2 (one is killed)");
    let server = pg::PgServer::start("swarm")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?;
    let db = server.create_db("swarm")?;
    let mut coords: Vec<Coordinator> = (0..nodes)
        .map(|i| Coordinator::start_node(launch, &format!("node{i}"), &db, &format!("n{i}")))
        .collect::<anyhow::Result<_>>()?;
    // Let the nodes register and settle before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let before: Vec<u64> = coords
        .iter()
        .map(|c| c.usage().map(|u| u.rss_kib))
        .collect::<anyhow::Result<_>>()?;
    let targets: Vec<String> = coords.iter().map(|c| c.addr.to_string()).collect();
    let shards = n.div_ceil(PER_SHARD).max(1);
    let exe = std::env::current_exe()?;
    let views: Vec<Arc<Mutex<ShardView>>> = (0..shards)
        .map(|_| Arc::new(Mutex::new(ShardView::default())))
        .collect();
    let t0 = Instant::now();
    let mut children = Vec::new();
    for (s, view) in views.iter().enumerate() {
        let first = s * n / shards;
        let count = (s + 1) * n / shards - first;
        let mut child = Command::new(&exe)
            .arg("--idle-shard")
            .arg(format!("{first}:{count}:{}", targets.join(",")))
            .args(["--idle-concurrency", &concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a driver shard")?;
        let out = child.stdout.take().context("shard stdout")?;
        let view = view.clone();
        std::thread::spawn(move || read_shard(out, &view));
        children.push(Shard(child));
    }
    let view = |f: &dyn Fn(&ShardView) -> u64| -> u64 {
        views
            .iter()
            .map(|v| f(&v.lock().unwrap_or_else(|e| e.into_inner())))
            .sum()
    };
    // Every shard has tried all its connections (each gives up on one after 60 s).
    let deadline = t0 + Duration::from_secs(900);
    while view(&|v| u64::from(v.accepted.is_some())) < shards as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the shards did not finish connecting in 15 min"
        );
        for c in &mut children {
            if let Some(status) = c.0.try_wait()? {
                anyhow::bail!("a driver shard exited early ({status})");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let accept_s = t0.elapsed().as_secs_f64();
    let welcomed = view(&|v| v.accepted.map_or(0, |a| a.0));
    let failed = view(&|v| v.accepted.map_or(0, |a| a.1));
    // Let allocations settle before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let mut figures: Vec<NodeFigures> = Vec::new();
    for (i, c) in coords.iter().enumerate() {
        let conns = c.connected()?;
        let rss = c.usage()?.rss_kib;
        figures.push(NodeFigures {
            node: format!("n{i}"),
            connections: conns,
            kib_per_conn: rss.saturating_sub(before[i]) as f64 / conns.max(1) as f64,
            connections_after: 0,
        });
    }
    // Kill the first node; its workers find the others.
    let up = |i: usize| -> u64 {
        views
            .iter()
            .map(|v| {
                v.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .up
                    .get(i)
                    .copied()
                    .unwrap_or(0)
            })
            .sum()
    };
    let moved = up(0);
    let killed = Instant::now();
    coords[0].kill();
    let (mut at95, mut at_all) = (None, None);
    let cap = Duration::from_secs(120);
    while killed.elapsed() < cap && at_all.is_none() {
        // The killed node's count drops at once (its sockets close); survivors' counts rise as they welcome.
        let now: u64 = (1..nodes).map(up).sum();
        if at95.is_none() && now * 100 >= welcomed * 95 {
            at95 = Some(killed.elapsed().as_secs_f64());
        }
        if now >= welcomed {
            at_all = Some(killed.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    for (i, c) in coords.iter().enumerate().skip(1) {
        figures[i].connections_after = c.connected()?;
    }
    let first_error = views
        .iter()
        .find_map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).error.clone());
    drop(children);
    drop(coords);
    drop(server);
    Ok(FleetFigures {
        idle_connections: n,
        nodes: figures,
        shards,
        welcomed,
        accept_s,
        moved,
        failover_95_s: at95,
        failover_all_s: at_all,
        failed,
        first_error,
    })
}

/// A driver shard; killed when dropped.
struct Shard(Child);

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_shard(out: std::process::ChildStdout, view: &Mutex<ShardView>) {
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
        let mut words = line.split_whitespace();
        match words.next() {
            Some("accepted") => {
                let nums: Vec<f64> = words.filter_map(|w| w.parse().ok()).collect();
                if let [w, f, s] = nums[..] {
                    v.accepted = Some((w as u64, f as u64, s));
                }
            }
            Some("up") => v.up = words.filter_map(|w| w.parse().ok()).collect(),
            Some("error") => {
                v.error
                    .get_or_insert_with(|| line["error ".len().min(line.len())..].to_string());
            }
            _ => {}
        }
    }
}

/// The shard side (`--idle-shard FIRST:COUNT:ADDR,ADDR,…`): holds workers FIRST..FIRST+COUNT, worker k homed on
/// node k mod K; prints `accepted W F S` once every worker has been tried, then `up C0 C1 …` (welcomed workers
/// connected to each node) every 20 ms until killed.
pub fn shard(spec: &str, concurrency: usize) -> anyhow::Result<()> {
    let mut parts = spec.splitn(3, ':');
    let first: usize = parts.next().context("shard spec")?.parse()?;
    let count: usize = parts.next().context("shard spec")?.parse()?;
    let targets: Vec<SocketAddr> = parts
        .next()
        .context("shard spec")?
        .split(',')
        .map(|a| a.parse().context("node address"))
        .collect::<anyhow::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let up: Arc<Vec<AtomicU64>> = Arc::new(targets.iter().map(|_| AtomicU64::new(0)).collect());
    let welcomed = Arc::new(AtomicU64::new(0));
    let tried = Arc::new(AtomicU64::new(0));
    let error = Arc::new(Mutex::new(None::<String>));
    let t0 = Instant::now();
    rt.block_on(async {
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        for k in first..first + count {
            let w = Idle {
                k,
                targets: targets.clone(),
                up: up.clone(),
                welcomed: welcomed.clone(),
                tried: tried.clone(),
                error: error.clone(),
                gate: gate.clone(),
            };
            tokio::spawn(w.run());
        }
        let mut reported = false;
        let mut stdout = std::io::stdout();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !reported && tried.load(Ordering::Relaxed) >= count as u64 {
                reported = true;
                if let Some(e) = error.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = writeln!(stdout, "error {e}");
                }
                let ok = welcomed.load(Ordering::Relaxed);
                let _ = writeln!(
                    stdout,
                    "accepted {ok} {} {:.3}",
                    count as u64 - ok,
                    t0.elapsed().as_secs_f64()
                );
            }
            let counts: Vec<String> = up
                .iter()
                .map(|c| c.load(Ordering::Relaxed).to_string())
                .collect();
            if writeln!(stdout, "up {}", counts.join(" ")).is_err() {
                // The parent is gone.
                return;
            }
            let _ = stdout.flush();
        }
    });
    Ok(())
}

/// First and largest pause between reconnection attempts: the native worker's schedule (`native.rs`).
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// One idle worker of a shard.
struct Idle {
    k: usize,
    targets: Vec<SocketAddr>,
    up: Arc<Vec<AtomicU64>>,
    welcomed: Arc<AtomicU64>,
    tried: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    gate: Arc<Semaphore>,
}

impl Idle {
    async fn run(self) {
        let mut node = self.k % self.targets.len();
        let mut token: Option<String> = None;
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        // Cheap per-worker jitter source (SplitMix64 step).
        let mut seed = self.k as u64 ^ 0x9e37_79b9_7f4a_7c15;
        loop {
            let attempt = {
                let Ok(_permit) = self.gate.acquire().await else {
                    return;
                };
                tokio::time::timeout(
                    Duration::from_secs(60),
                    hello(self.k, self.targets[node], token.as_deref()),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no welcome within 60 s")))
            };
            match attempt {
                Ok((mut ws, t)) => {
                    token = Some(t);
                    backoff = BACKOFF_MIN;
                    if first {
                        self.welcomed.fetch_add(1, Ordering::Relaxed);
                        self.tried.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    self.up[node].fetch_add(1, Ordering::Relaxed);
                    // Idle until the node goes away (or sends us elsewhere).
                    let mut redirect = None;
                    while let Some(Ok(msg)) = ws.next().await {
                        match msg {
                            Message::Text(t) if t.as_str().contains("\"redirect\"") => {
                                redirect = redirect_target(t.as_str(), &self.targets);
                                break;
                            }
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    self.up[node].fetch_sub(1, Ordering::Relaxed);
                    if let Some(to) = redirect {
                        node = to;
                        continue;
                    }
                }
                Err(e) => {
                    if first {
                        self.tried.fetch_add(1, Ordering::Relaxed);
                        self.error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert_with(|| format!("{e:#}"));
                        // A worker that never got in does not count; it stops here.
                        return;
                    }
                }
            }
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let jitter = Duration::from_millis(z % (backoff.as_millis() as u64 / 2 + 1));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            node = next_node(self.k, node, self.targets.len());
        }
    }
}

/// The node worker `k` tries after losing `node`: the workers homed on one node fall back to different survivors
/// (spread evenly by `k`), so no survivor gets all of a dead node's workers; then on round the list.
fn next_node(k: usize, node: usize, nodes: usize) -> usize {
    let home = k % nodes;
    if node == home && nodes > 1 {
        (home + 1 + (k / nodes) % (nodes - 1)) % nodes
    } else {
        (node + 1) % nodes
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects worker `k` to `addr`, says hello (with `token` on a reconnect) and waits for the welcome; returns the
/// socket and the token the welcome carries.
async fn hello(k: usize, addr: SocketAddr, token: Option<&str>) -> anyhow::Result<(Ws, String)> {
    let frame = encode(
        &WorkerMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: token.map(str::to_string),
            name: None,
            backend: Backend::Cpu,
            adapter: "idle".into(),
            platform: Platform::Native,
        },
        &[],
    );
    let WireFrame::Text(hello) = frame else {
        anyhow::bail!("a hello is a text frame");
    };
    let tcp = connect_from(source_addr(k as u64), addr).await?;
    // Small client buffers: each shard holds thousands of sockets.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}/ws"), tcp, Some(cfg))
            .await?;
    ws.send(Message::text(hello)).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"") => {
            let v: serde_json::Value = serde_json::from_str(t.as_str())?;
            let token = v["token"]
                .as_str()
                .context("a welcome without a token")?
                .to_string();
            Ok((ws, token))
        }
        other => anyhow::bail!("expected welcome, got {other:?}"),
    }
}

/// The node a `redirect {url: "ws://host:port/ws"}` names, if it is one of ours.
fn redirect_target(text: &str, targets: &[SocketAddr]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let url = v["url"].as_str()?;
    let authority = url.strip_prefix("ws://")?.trim_end_matches("/ws");
    targets.iter().position(|t| t.to_string() == authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_nodes_workers_spread_over_the_survivors() {
        // Workers homed on node 0 of 3: half try node 1 first, half node 2.
        let first: Vec<usize> = (0..12).step_by(3).map(|k| next_node(k, 0, 3)).collect();
        assert_eq!(first, vec![1, 2, 1, 2]);
        // And then go round every node.
        assert_eq!(next_node(3, 2, 3), 0);
        assert_eq!(next_node(0, 1, 3), 2);
    }

    #[test]
    fn a_redirect_names_one_of_the_nodes() {
        let targets: Vec<SocketAddr> = vec![
            "127.0.0.1:4000".parse().expect("addr"),
            "127.0.0.1:4001".parse().expect("addr"),
        ];
        let msg = r#"{"type":"redirect","url":"ws://127.0.0.1:4001/ws"}"#;
        assert_eq!(redirect_target(msg, &targets), Some(1));
        let elsewhere = r#"{"type":"redirect","url":"ws://10.0.0.1:4001/ws"}"#;
        assert_eq!(redirect_target(elsewhere, &targets), None);
    }
}
