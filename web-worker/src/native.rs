//! The native volunteer: a WebSocket client (tokio-tungstenite) moving frames between the coordinator and a
//! [`Session`]. Used by `starling worker`, the demo and the end-to-end tests.

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use starling_core::protocol::WireFrame;

use crate::engine::{BackendChoice, Device};
use crate::session::{Incoming, LocalLie, Session, SessionConfig, SessionError, Stats, Tamper};

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

/// Like [`run`] on an already opened device (lets tests share one GPU context between reconnects).
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
    // A v2 `dataset` frame holds a whole training set (25 MB for the demo's MNIST split): above tungstenite's
    // default 16 MiB frame limit, so the limits are the coordinator's upload limit instead.
    let limit = Some(starling_core::data::MAX_UPLOAD_BYTES + 64 * 1024);
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_frame_size(limit)
        .max_message_size(limit);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        opts.coordinator.as_str(),
        Some(config),
        false,
    )
    .await
    .with_context(|| format!("connecting to {}", opts.coordinator))?;
    ws.send(to_message(session.hello())).await?;
    let mut closed_by = None;
    while let Some(msg) = ws.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                closed_by = Some(format!("connection error: {e}"));
                break;
            }
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
            Message::Binary(b) => session.handle(Incoming::Binary(b)).await,
            Message::Close(frame) => {
                closed_by = Some(
                    frame
                        .as_ref()
                        .map_or_else(|| "closed".to_string(), |f| f.reason.to_string()),
                );
                break;
            }
            _ => continue,
        };
        match replies {
            Ok(frames) => {
                let mut sent = Ok(());
                for f in frames {
                    sent = ws.send(to_message(f)).await;
                    if sent.is_err() {
                        break;
                    }
                }
                if let Err(e) = sent {
                    // The coordinator went away between our read and write (shutdown, restart, network).
                    closed_by = Some(format!("connection lost: {e}"));
                    break;
                }
            }
            Err(SessionError::Closed { code, message }) => {
                closed_by = Some(format!("{code:?}: {message}"));
                break;
            }
            Err(e) => return Err(e.into()),
        }
        if opts.max_leases.is_some_and(|m| session.stats().leases >= m) {
            let _ = ws.close(None).await;
            break;
        }
    }
    Ok(WorkerReport {
        stats: session.stats().clone(),
        token: session.token().map(str::to_string),
        closed_by,
    })
}
