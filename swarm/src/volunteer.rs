//! One emulated volunteer: a real protocol [`Session`] with a real CPU engine on its own WebSocket, from its own
//! 127.x.y.z source address, through its own [`Link`], on a device `slowdown` times slower than this machine's core;
//! and the threads ([`Shards`]) that run many of them.
//!
//! A `Session` is not `Send` (its tamper hook is a plain closure), so volunteers run on single-threaded runtimes
//! with a `LocalSet`, a few volunteers' worth of work per shard thread.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use starling_core::protocol::WireFrame;
use starling_worker::engine::Device;
use starling_worker::session::{Incoming, Session, SessionConfig, SessionError};

use crate::link::{Link, Meter, Metered, shape};

/// What the benchmark tells a running volunteer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Run,
    /// Close the WebSocket properly (a tab closed).
    Close,
    /// Stop reading and writing but keep the socket open until `End` (a laptop lid closed, a phone losing signal):
    /// the coordinator only notices when the lease deadline passes.
    Vanish,
    /// The scenario is over.
    End,
}

/// What the benchmark reads back from a volunteer; shared with its task.
#[derive(Debug, Default)]
pub struct Shared {
    pub meter: Arc<Meter>,
    /// Emulated compute time (measured compute × slowdown), nanoseconds.
    pub compute_ns: AtomicU64,
    pub leases: AtomicU64,
    /// Leases it had received and not answered when it left.
    pub lost: AtomicU64,
    /// The token from its `welcome`, for a later return.
    pub token: Mutex<Option<String>>,
    /// Why its session ended, if not by the benchmark's command.
    pub error: Mutex<Option<String>>,
}

/// How one volunteer starts.
#[derive(Debug, Clone)]
pub struct Spec {
    pub index: u64,
    pub coordinator: SocketAddr,
    pub link: Link,
    /// Device slow-down factor (≥ 1): each lease's compute is stretched to `slowdown ×` its measured time.
    pub slowdown: f64,
    /// A returning volunteer's token.
    pub token: Option<String>,
}

/// The source address of volunteer `k`: 127.A.B.C with A, B, C in 1..=250, never 127.0.0.1.
pub fn source_addr(k: u64) -> Ipv4Addr {
    let a = 1 + (k / 62_500) % 250;
    let b = 1 + (k / 250) % 250;
    let c = 1 + k % 250;
    Ipv4Addr::new(127, a as u8, b as u8, c as u8)
}

/// Connects from `source` to `coordinator` (a TCP socket bound to the source address first).
pub async fn connect_from(source: Ipv4Addr, coordinator: SocketAddr) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source.into(), 0))
        .with_context(|| format!("binding {source}"))?;
    let tcp = sock
        .connect(coordinator)
        .await
        .with_context(|| format!("connecting from {source}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// An object-safe stream, so shaped and unshaped volunteers share one WebSocket type.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn to_message(frame: WireFrame) -> Message {
    match frame {
        WireFrame::Text(t) => Message::text(t),
        WireFrame::Binary(b) => Message::binary(b),
    }
}

/// Runs one volunteer until told to leave or end (or the coordinator closes it); records errors in `shared`.
pub async fn run(spec: Spec, mut cmd: watch::Receiver<Command>, shared: Arc<Shared>) {
    if let Err(e) = session(&spec, &mut cmd, &shared).await {
        let mut slot = shared.error.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(format!("{e:#}"));
    }
}

async fn session(
    spec: &Spec,
    cmd: &mut watch::Receiver<Command>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let tcp = connect_from(source_addr(spec.index), spec.coordinator).await?;
    let stream: Box<dyn Stream> = if spec.link.is_shaped() {
        Box::new(shape(tcp, spec.link))
    } else {
        Box::new(tcp)
    };
    let stream = Metered::new(stream, shared.meter.clone());
    let url = format!("ws://{}/ws", spec.coordinator);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(WebSocketConfig::default().read_buffer_size(64 * 1024)),
    )
    .await
    .context("WebSocket handshake")?;
    let mut session = Session::new(
        Device::Cpu,
        SessionConfig {
            name: Some(format!("swarm-{}", spec.index)),
            token: spec.token.clone(),
            browser: false,
        },
    );
    ws.send(to_message(session.hello())).await?;
    let left = loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            r = cmd.changed() => break if r.is_err() { Command::End } else { *cmd.borrow() },
        };
        let msg = match msg {
            None => anyhow::bail!("the coordinator closed the connection"),
            Some(Err(e)) => anyhow::bail!("connection error: {e}"),
            Some(Ok(m)) => m,
        };
        let (leases, busy_ms) = (session.stats().leases, session.stats().busy_ms);
        let replies = match &msg {
            Message::Text(t) => session.handle(Incoming::Text(t.as_str())).await,
            Message::Binary(b) => session.handle(Incoming::Binary(b)).await,
            Message::Close(f) => anyhow::bail!("the coordinator closed the session: {f:?}"),
            _ => continue,
        };
        let replies = match replies {
            Ok(r) => r,
            Err(SessionError::Closed { code, message }) => {
                anyhow::bail!("closed by the coordinator ({code:?}): {message}")
            }
            Err(e) => return Err(e.into()),
        };
        if let (Ok(mut slot), Some(t)) = (shared.token.lock(), session.token())
            && slot.is_none()
        {
            *slot = Some(t.to_string());
        }
        let computed = session.stats().leases > leases;
        let mut stretch = Duration::ZERO;
        if computed {
            let measured_ms = session.stats().busy_ms - busy_ms;
            stretch = Duration::from_secs_f64((spec.slowdown - 1.0).max(0.0) * measured_ms / 1e3);
            let emulated_ns = (spec.slowdown.max(1.0) * measured_ms * 1e6) as u64;
            shared.compute_ns.fetch_add(emulated_ns, Ordering::Relaxed);
            shared.leases.fetch_add(1, Ordering::Relaxed);
        }
        // The slower device's extra compute time, then the result (and `ready`) up the link; leaving in between
        // loses the lease.
        let work = async {
            tokio::time::sleep(stretch).await;
            for f in replies {
                ws.send(to_message(f)).await?;
            }
            anyhow::Ok(())
        };
        let interrupted = tokio::select! {
            r = work => { r?; None }
            r = cmd.changed() => Some(if r.is_err() { Command::End } else { *cmd.borrow() }),
        };
        if let Some(c) = interrupted {
            if computed && c != Command::End {
                shared.lost.fetch_add(1, Ordering::Relaxed);
            }
            break c;
        }
    };
    match left {
        Command::Close => {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
        Command::Vanish => {
            // Hold the silent socket until the scenario ends (bounded: scenarios are capped well below this).
            let _ = tokio::time::timeout(Duration::from_secs(3600), async {
                while cmd.changed().await.is_ok() {
                    if *cmd.borrow() == Command::End {
                        break;
                    }
                }
            })
            .await;
        }
        Command::Run | Command::End => {}
    }
    Ok(())
}

/// A handle the benchmark keeps per volunteer.
#[derive(Debug)]
pub struct Handle {
    pub cmd: watch::Sender<Command>,
    pub shared: Arc<Shared>,
}

type Start = (Spec, watch::Receiver<Command>, Arc<Shared>);

/// Threads with a single-threaded runtime and a `LocalSet` each, running volunteers dealt round-robin.
#[derive(Debug)]
pub struct Shards {
    senders: Vec<mpsc::UnboundedSender<Start>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
}

impl Shards {
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, mut rx) = mpsc::unbounded_channel::<Start>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let thread = std::thread::Builder::new()
                .name(format!("swarm-shard-{i}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async move {
                        let mut tasks = Vec::new();
                        while let Some((spec, cmd, shared)) = rx.recv().await {
                            tasks.push(tokio::task::spawn_local(run(spec, cmd, shared)));
                        }
                        // The benchmark has sent `End`: give the volunteers a moment to finish, then drop the rest.
                        let _ = tokio::time::timeout(Duration::from_secs(10), async {
                            for t in tasks {
                                let _ = t.await;
                            }
                        })
                        .await;
                    });
                })?;
            senders.push(tx);
            handles.push(thread);
        }
        Ok(Self {
            senders,
            threads: handles,
            next: 0,
        })
    }

    /// Starts a volunteer on the next shard.
    pub fn spawn(&mut self, spec: Spec) -> Handle {
        let (cmd, rx) = watch::channel(Command::Run);
        let shared = Arc::new(Shared::default());
        let shard = &self.senders[self.next % self.senders.len()];
        self.next += 1;
        // A send fails only if the shard thread died; the volunteer then shows up with no traffic.
        let _ = shard.send((spec, rx, shared.clone()));
        Handle { cmd, shared }
    }

    /// Waits for the shard threads after every volunteer was told to end (they stop within ~10 s).
    pub fn join(self) {
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_loopback_addresses() {
        let mut seen = std::collections::HashSet::new();
        for k in 0..20_000 {
            let a = source_addr(k);
            assert!(a.is_loopback() && a != Ipv4Addr::LOCALHOST, "{a}");
            assert!(seen.insert(a), "{a} twice");
        }
    }
}
