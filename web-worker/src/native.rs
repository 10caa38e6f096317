//! The native volunteer: a WebSocket client (tokio-tungstenite) moving frames between the coordinator and a
//! [`Session`]. Used by `starling worker`, the demo and the end-to-end tests.

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use starling_core::protocol::{ErrorCode, WireFrame};

use crate::engine::{BackendChoice, Device};
use crate::session::{
    CacheFuture, DatasetCache, Incoming, LocalLie, Session, SessionConfig, SessionError, Stats,
    Tamper,
};

/// How to run one native worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `ws://host:port/ws`.
    pub coordinator: String,
    pub backend: BackendChoice,
    pub name: Option<String>,
    pub token: Option<String>,
    /// Stop (close the connection) after this many leases; `None` runs until the coordinator closes.
    pub max_leases: Option<u64>,
    /// Keep v2 datasets in this directory across runs ([`DiskCache`]); `None` fetches them on every connection.
    pub dataset_cache: Option<std::path::PathBuf>,
}

/// A [`DatasetCache`] on disk: one file per dataset, `<dir>/<sha256>.dataset`, written to a temporary name and
/// renamed, so a reader never sees half a file (and a damaged one fails its SHA-256 check and is fetched again).
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: std::path::PathBuf,
}

impl DiskCache {
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, sha256: &str) -> std::path::PathBuf {
        self.dir.join(format!("{sha256}.dataset"))
    }
}

impl DatasetCache for DiskCache {
    fn load<'a>(&'a self, sha256: &'a str) -> CacheFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move { tokio::fs::read(self.path(sha256)).await.ok() })
    }

    fn store<'a>(&'a self, sha256: &'a str, entry: Vec<u8>) -> CacheFuture<'a, ()> {
        Box::pin(async move {
            let tmp = self
                .dir
                .join(format!("{sha256}.{}.tmp", std::process::id()));
            let written = async {
                tokio::fs::create_dir_all(&self.dir).await?;
                tokio::fs::write(&tmp, &entry).await?;
                tokio::fs::rename(&tmp, self.path(sha256)).await
            };
            if let Err(e) = written.await {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot cache the dataset");
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        })
    }
}

/// How a worker run ended.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub stats: Stats,
    pub token: Option<String>,
    /// The coordinator's closing error, if it sent one.
    pub closed_by: Option<String>,
}

fn to_message(frame: WireFrame) -> Message {
    match frame {
        WireFrame::Text(t) => Message::text(t),
        WireFrame::Binary(b) => Message::binary(b),
    }
}

/// Connects, says hello and computes leases until the coordinator closes, `max_leases` is reached or an error.
pub async fn run(opts: WorkerOptions, tamper: Option<Tamper>) -> anyhow::Result<WorkerReport> {
    let device = Device::open(opts.backend)
        .await
        .context("opening the compute device")?;
    tracing::info!(backend = ?device.backend(), adapter = %device.label(), "worker device ready");
    run_on(device, opts, tamper).await
}

/// How a worker gets back to work when its coordinator node goes away (a failover) or sends it elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Reconnect {
    /// Other nodes' WebSocket URLs, tried in turn after the one the worker was using (the first is `coordinator`).
    pub fallbacks: Vec<String>,
    /// Keep reconnecting, with backoff, for this long after the coordinator was lost (`None`: end the run then).
    pub give_up_after: Option<std::time::Duration>,
    /// Treat the connection as lost when nothing (not even a pong to the pings sent every third of this) arrived
    /// for this long: a node that is stopped or cut off keeps its sockets open, so silence is the only sign.
    pub silence: Option<std::time::Duration>,
}

/// First and largest pause between reconnection attempts (doubling in between, with jitter).
const BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(4);

/// How one connection ended.
enum Ended {
    /// The run is over (`max_leases`, a fatal error code, the worker refused).
    Done(Option<String>),
    /// The connection was lost (node died, restarted, shut down): reconnect if allowed.
    Lost(String),
    /// The node sent us to another node.
    Redirect(String),
}

/// Like [`run`] on an already opened device (lets tests share one GPU context between reconnects). Follows
/// `redirect`s; ends when the connection is lost.
pub async fn run_on(
    device: Device,
    opts: WorkerOptions,
    tamper: Option<Tamper>,
) -> anyhow::Result<WorkerReport> {
    run_lying(device, opts, tamper, None).await
}

/// Like [`run_on`] with a [`LocalLie`] about local leases too (the attack suites' lying workers).
pub async fn run_lying(
    device: Device,
    opts: WorkerOptions,
    tamper: Option<Tamper>,
    lie: Option<Box<dyn LocalLie>>,
) -> anyhow::Result<WorkerReport> {
    run_with(device, opts, tamper, lie, Reconnect::default()).await
}

/// Like [`run_on`], reconnecting with backoff after a lost connection as `reconnect` says: to the same node, then
/// to each fallback in turn (a node that is itself not leading work redirects the worker on). One session lives
/// through every connection, so the token, the resident model and the statistics carry over.
pub async fn run_reconnecting(
    device: Device,
    opts: WorkerOptions,
    tamper: Option<Tamper>,
    reconnect: Reconnect,
) -> anyhow::Result<WorkerReport> {
    run_with(device, opts, tamper, None, reconnect).await
}

async fn run_with(
    device: Device,
    opts: WorkerOptions,
    tamper: Option<Tamper>,
    lie: Option<Box<dyn LocalLie>>,
    reconnect: Reconnect,
) -> anyhow::Result<WorkerReport> {
    let mut session = Session::new(
        device,
        SessionConfig {
            name: opts.name.clone(),
            token: opts.token.clone(),
            browser: false,
        },
    );
    if let Some(t) = tamper {
        session = session.with_tamper(t);
    }
    if let Some(l) = lie {
        session = session.with_local_lie(l);
    }
    if let Some(dir) = &opts.dataset_cache {
        session = session.with_dataset_cache(Box::new(DiskCache::new(dir)));
    }
    // A v2 `dataset` frame holds a whole training set (25 MB for the demo's MNIST split): above tungstenite's
    // default 16 MiB frame limit, so the limits are the coordinator's upload limit instead.
    let limit = Some(starling_core::data::MAX_UPLOAD_BYTES + 64 * 1024);
    let ws_config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_frame_size(limit)
        .max_message_size(limit);
    let mut urls = vec![opts.coordinator.clone()];
    urls.extend(reconnect.fallbacks.iter().cloned());
    let mut url = opts.coordinator.clone();
    let mut next = 0usize;
    let mut backoff = BACKOFF_MIN;
    let mut lost_at: Option<std::time::Instant> = None;
    let mut connected_once = false;
    let closed_by = loop {
        // A stopped node accepts TCP connections (the kernel does) but never answers the handshake: give up on it
        // after the silence limit, as on an open connection.
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config), false);
        let connected = match reconnect.silence {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(tokio_tungstenite::tungstenite::Error::Io(
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no handshake within {limit:?}"),
                        ),
                    ))
                }),
            None => connect.await,
        };
        let ended = match connected {
            Ok((ws, _)) => {
                connected_once = true;
                backoff = BACKOFF_MIN;
                lost_at = None;
                serve(&mut session, ws, &url, &opts, reconnect.silence).await?
            }
            Err(e) if !connected_once && reconnect.give_up_after.is_none() => {
                return Err(anyhow::Error::new(e).context(format!("connecting to {url}")));
            }
            Err(e) => Ended::Lost(format!("cannot connect to {url}: {e}")),
        };
        match ended {
            Ended::Done(closed_by) => break closed_by,
            Ended::Redirect(to) => {
                tracing::info!(from = %url, to = %to, "redirected to the node that leads work");
                url = to;
            }
            Ended::Lost(why) => {
                let Some(limit) = reconnect.give_up_after else {
                    break (!why.is_empty()).then_some(why);
                };
                let since = *lost_at.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > limit {
                    break Some(format!("{why}; gave up reconnecting after {limit:?}"));
                }
                tracing::info!(%why, retry_in = ?backoff, "coordinator lost; reconnecting");
                // Jitter (up to half the pause), so workers of a dead node do not all come back at once.
                let jitter = std::time::Duration::from_millis(
                    u64::from(std::process::id() ^ next as u32)
                        % (backoff.as_millis() as u64 / 2 + 1),
                );
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                url = urls[next % urls.len()].clone();
                next += 1;
            }
        }
    };
    Ok(WorkerReport {
        stats: session.stats().clone(),
        token: session.token().map(str::to_string),
        closed_by,
    })
}

/// Says hello and computes leases on one connection until it ends.
async fn serve(
    session: &mut Session,
    mut ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    url: &str,
    opts: &WorkerOptions,
    silence: Option<std::time::Duration>,
) -> anyhow::Result<Ended> {
    if let Err(e) = ws.send(to_message(session.hello())).await {
        return Ok(Ended::Lost(format!("connection lost: {e}")));
    }
    let silence = silence.unwrap_or(std::time::Duration::MAX);
    let ping_every = (silence / 3).max(std::time::Duration::from_millis(100));
    loop {
        // Silence counts from the last frame in either direction (a long computation is not silence).
        let heard = std::time::Instant::now();
        let msg = loop {
            match tokio::time::timeout(ping_every, ws.next()).await {
                Ok(m) => break m,
                Err(_) if heard.elapsed() >= silence => {
                    return Ok(Ended::Lost(format!(
                        "nothing from the coordinator for {silence:?}"
                    )));
                }
                Err(_) => {
                    if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                        return Ok(Ended::Lost(format!("connection lost: {e}")));
                    }
                }
            }
        };
        let Some(msg) = msg else { break };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return Ok(Ended::Lost(format!("connection error: {e}"))),
        };
        let replies = match &msg {
            Message::Text(t) => {
                let before = session.stats().waiting.clone();
                let replies = session.handle(Incoming::Text(t.as_str())).await;
                // An idle worker says why it has no work (fair scheduling tells it its place in line).
                if let Some(reason) = &session.stats().waiting
                    && before.as_ref() != Some(reason)
                {
                    tracing::info!(%reason, "waiting for work");
                }
                replies
            }
            Message::Binary(b) => {
                lease_log::record(url, session, b);
                session.handle(Incoming::Binary(b)).await
            }
            Message::Close(frame) => {
                return Ok(Ended::Lost(
                    frame
                        .as_ref()
                        .map_or_else(|| "closed".to_string(), |f| f.reason.to_string()),
                ));
            }
            _ => continue,
        };
        match replies {
            Ok(frames) => {
                for f in frames {
                    if let Err(e) = ws.send(to_message(f)).await {
                        // The coordinator went away between our read and write (shutdown, restart, network).
                        return Ok(Ended::Lost(format!("connection lost: {e}")));
                    }
                }
            }
            Err(SessionError::Redirect { url }) => {
                let _ = ws.close(None).await;
                return Ok(Ended::Redirect(url));
            }
            // A node shutting down is a lost connection, not the end of the run.
            Err(SessionError::Closed {
                code: ErrorCode::ShuttingDown,
                message,
            }) => return Ok(Ended::Lost(format!("ShuttingDown: {message}"))),
            Err(SessionError::Closed { code, message }) => {
                return Ok(Ended::Done(Some(format!("{code:?}: {message}"))));
            }
            Err(e) => return Err(e.into()),
        }
        if opts.max_leases.is_some_and(|m| session.stats().leases >= m) {
            let _ = ws.close(None).await;
            return Ok(Ended::Done(None));
        }
    }
    // The stream ended without a close frame: no reason to report.
    Ok(Ended::Lost(String::new()))
}

/// Records every lease this process's workers receive in `path` (as `STARLING_LEASE_LOG` does; see [`lease_log`]).
pub fn log_leases_to(path: &std::path::Path) -> std::io::Result<()> {
    lease_log::to(path)
}

/// An observer's record of every lease a worker receives, for tests that check what the coordinators granted
/// (`cli/tests/failover.rs`): with `STARLING_LEASE_LOG=<file>` set, each `lease` and `local_lease` frame (binary) is
/// appended to the file as one JSON line `{"t_us", "url", "worker", "lease", "job", "version", "step", "micro"}`
/// (`t_us`: wall-clock microseconds since the Unix epoch at arrival; `url`: the node it came from; `worker`: the
/// id of the welcome; `step`/`micro` are a local lease's `round`/`shard`). Off (nothing read, nothing written)
/// without the variable. Several workers may share one file: each line is one `write` on an append-only file.
mod lease_log {
    use std::io::Write as _;
    use std::sync::{Mutex, OnceLock};

    use starling_core::protocol::CoordinatorMsg;

    use crate::session::Session;

    static FILE: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();

    fn open(path: &std::path::Path) -> std::io::Result<Mutex<std::fs::File>> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Mutex::new(f))
    }

    fn file() -> Option<&'static Mutex<std::fs::File>> {
        FILE.get_or_init(|| {
            let path = std::env::var_os("STARLING_LEASE_LOG")?;
            open(path.as_ref())
                .inspect_err(
                    |e| tracing::warn!(path = ?path, error = %e, "cannot open the lease log"),
                )
                .ok()
        })
        .as_ref()
    }

    /// Turns the log on for this process, to `path` (before any lease arrives; later calls change nothing).
    pub(super) fn to(path: &std::path::Path) -> std::io::Result<()> {
        let f = open(path)?;
        let _ = FILE.set(Some(f));
        Ok(())
    }

    /// Appends the binary frame `frame` to the log when it is a lease (and the log is on).
    pub(super) fn record(url: &str, session: &Session, frame: &[u8]) {
        let Some(file) = file() else { return };
        let (lease, job, version, step, micro) = match CoordinatorMsg::decode_binary(frame) {
            Ok((
                CoordinatorMsg::Lease {
                    lease,
                    job,
                    version,
                    step,
                    micro_batch,
                    ..
                },
                _,
            )) => (lease, job, version, step, micro_batch),
            Ok((
                CoordinatorMsg::LocalLease {
                    lease,
                    job,
                    version,
                    round,
                    shard,
                    ..
                },
                _,
            )) => (lease, job, version, round, shard),
            _ => return,
        };
        let t_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let line = serde_json::json!({
            "t_us": t_us,
            "url": url,
            "worker": session.stats().worker,
            "lease": lease.0,
            "job": job.0,
            "version": version,
            "step": step,
            "micro": micro,
        });
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
