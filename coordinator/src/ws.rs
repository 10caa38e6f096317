//! The worker WebSocket endpoint (`/ws`): authentication by hello, then frames to scheduler calls.
//!
//! Each connection is a reader (this task) and a writer task fed by an unbounded channel; the scheduler never
//! awaits a socket. A frame that cannot be decoded, or is not valid at this point of the protocol, gets an
//! `error` message and closes that connection only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use starling_core::protocol::{
    CoordinatorMsg, ErrorCode, PROTOCOL_VERSION, WorkerMsg, encode, f32s,
};

use crate::App;
use crate::scheduler::{ConnId, Outbound, frame_message};

/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite allocates its read buffer up front and keeps it for the socket's life (its default is 128 KiB). It
/// is also the most one read asks the socket for, so 1 KiB reads a 400 KB gradient in ~400 reads; measured
/// (`cargo xtask bench swarm --idle 19000`) that is what keeps an idle connection under 8 KiB.
const READ_BUFFER: usize = 1024;

/// Upgrades `/ws` with buffer and size limits sized for many mostly idle workers.
pub async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    State(app): State<Arc<App>>,
) -> Response {
    // A page from an origin not on the partner allow-list must not run workers here (native workers send no Origin).
    if !crate::origin::request_allowed(&headers, &app.config.allow_origin) {
        tracing::info!(%addr, origin = ?headers.get(axum::http::header::ORIGIN), "refused a browser socket from an origin not on the allow-list");
        return axum::response::IntoResponse::into_response((
            axum::http::StatusCode::FORBIDDEN,
            "origin not allowed",
        ));
    }
    let max = app.config.max_frame_bytes;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("conn", %addr, worker = tracing::field::Empty);
            connection(socket, addr, app).instrument(span)
        })
}

/// Hex SHA-256 of a token: tokens are stored only as hashes.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 128 random bits as hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS RNG failing is not recoverable in any useful way; fall back to time-based entropy rather than panic.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (crate::store::now_ms() as u128 ^ (std::process::id() as u128) << 64).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn close_code_for(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadFrame => close_code::INVALID,
        ErrorCode::OutOfProtocol | ErrorCode::ProtocolVersion | ErrorCode::Refused => {
            close_code::POLICY
        }
        ErrorCode::Limit => close_code::SIZE,
        ErrorCode::ShuttingDown => close_code::AWAY,
    }
}

/// Open connections per remote address, so one host cannot exhaust the coordinator's sockets.
#[derive(Debug, Default)]
pub struct AddrCounts(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

/// One counted connection; gives its slot back when dropped.
struct AddrSlot<'a>(&'a AddrCounts, std::net::IpAddr);

impl AddrCounts {
    fn acquire(&self, ip: std::net::IpAddr, max: u32) -> Option<AddrSlot<'_>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddrSlot(self, ip))
    }
}

impl Drop for AddrSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// A token bucket: `rate` messages per second on average, `burst` at once.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            rate: rate as f64,
            burst: burst as f64,
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one token; `false` when the bucket is empty.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

async fn connection(socket: WebSocket, addr: SocketAddr, app: Arc<App>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let writer = tokio::spawn(
        async move {
            while let Some(out) = rx.recv().await {
                match out {
                    Outbound::Frame(m) => {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                    Outbound::Close(code, message) => {
                        let err = frame_message(encode(
                            &CoordinatorMsg::Error {
                                code,
                                message: message.clone(),
                            },
                            &[],
                        ));
                        let _ = sink.send(err).await;
                        let reason: String = message.chars().take(120).collect();
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame {
                                code: close_code_for(code),
                                reason: reason.into(),
                            })))
                            .await;
                        break;
                    }
                }
            }
        }
        .in_current_span(),
    );
    let close = |code: ErrorCode, msg: String| {
        tracing::info!(?code, %msg, "closing connection");
        let _ = tx.send(Outbound::Close(code, msg));
    };
    let Some(_slot) = app
        .per_addr
        .acquire(addr.ip(), app.config.max_conns_per_addr)
    else {
        close(
            ErrorCode::Limit,
            format!(
                "too many connections from {} (limit {})",
                addr.ip(),
                app.config.max_conns_per_addr
            ),
        );
        return finish(writer).await;
    };

    // Hello first, within a deadline.
    let first = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => {
            close(ErrorCode::Limit, format!("unreadable first frame: {e}"));
            return finish(writer).await;
        }
        Ok(None) => return finish(writer).await,
        Err(_) => {
            close(ErrorCode::OutOfProtocol, "no hello within 10 s".into());
            return finish(writer).await;
        }
    };
    let hello = match &first {
        Message::Text(t) => WorkerMsg::decode_text(t.as_str()).map_err(|e| e.to_string()),
        Message::Binary(b) => WorkerMsg::decode_binary(b)
            .map(|(m, _)| m)
            .map_err(|e| e.to_string()),
        _ => Err("expected a hello message".into()),
    };
    let (token, name, backend, adapter, platform) = match hello {
        Ok(WorkerMsg::Hello {
            protocol,
            token,
            name,
            backend,
            adapter,
            platform,
        }) => {
            if protocol != PROTOCOL_VERSION {
                close(
                    ErrorCode::ProtocolVersion,
                    format!("this coordinator speaks protocol {PROTOCOL_VERSION}, not {protocol}"),
                );
                return finish(writer).await;
            }
            let trim = |s: String| s.chars().take(200).collect::<String>();
            (token, name.map(trim), backend, trim(adapter), platform)
        }
        Ok(other) => {
            close(
                ErrorCode::OutOfProtocol,
                format!("first message must be hello, got {other:?}")
                    .chars()
                    .take(200)
                    .collect(),
            );
            return finish(writer).await;
        }
        Err(e) => {
            close(ErrorCode::BadFrame, format!("cannot decode hello: {e}"));
            return finish(writer).await;
        }
    };

    // Identity: a known token keeps its worker (and credits); anything else gets a new worker and token.
    let known = match &token {
        Some(t) => Box::pin(app.store.worker_by_token_hash(&token_hash(t))).await,
        None => Ok(None),
    };
    let (row, token) = match known {
        Ok(Some(row)) => (row, token.unwrap_or_default()),
        Ok(None) => {
            let t = new_token();
            match Box::pin(app.store.create_worker(&token_hash(&t), name.as_deref())).await {
                Ok(row) => (row, t),
                Err(e) => {
                    tracing::error!(error = %e, "cannot create worker");
                    close(
                        ErrorCode::ShuttingDown,
                        "internal error; try again later".into(),
                    );
                    return finish(writer).await;
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up worker");
            close(
                ErrorCode::ShuttingDown,
                "internal error; try again later".into(),
            );
            return finish(writer).await;
        }
    };
    tracing::Span::current().record("worker", row.id.0);
    let registered: Option<ConnId> = {
        let mut st = app.state();
        let admitted = st.admit(
            row.id,
            row.name.clone(),
            addr.ip(),
            name,
            backend,
            adapter.clone(),
            platform,
            tx.clone(),
        );
        admitted.map(|(conn, credits)| {
            let welcome = CoordinatorMsg::Welcome {
                protocol: PROTOCOL_VERSION,
                worker: row.id,
                token,
                credits,
            };
            st.send(conn, Outbound::msg(&welcome, &[]));
            conn
        })
    };
    let Some(conn) = registered else {
        close(
            ErrorCode::Refused,
            "this worker was refused after repeated rejected results".into(),
        );
        return finish(writer).await;
    };
    tracing::info!(?backend, %adapter, ?platform, "worker connected");

    let mut bucket = Bucket::new(app.config.msg_rate, app.config.msg_burst);
    let mut stop = app.shutdown.clone();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = stop.changed() => {
                close(ErrorCode::ShuttingDown, "coordinator is shutting down".into());
                break;
            }
        };
        let msg = match msg {
            None => break,
            Some(Err(e)) => {
                // tungstenite reports size-limit breaches as read errors.
                close(ErrorCode::Limit, format!("connection error: {e}"));
                break;
            }
            Some(Ok(m)) => m,
        };
        let flood = || {
            format!(
                "more than {} unsolicited messages per second (burst {})",
                app.config.msg_rate, app.config.msg_burst
            )
        };
        let decoded = match &msg {
            Message::Text(t) => WorkerMsg::decode_text(t.as_str()).map(|m| (m, &[][..])),
            Message::Binary(b) => WorkerMsg::decode_binary(b),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {
                if !bucket.take() {
                    close(ErrorCode::Limit, flood());
                    break;
                }
                continue;
            }
        };
        let (msg, payload) = match decoded {
            Ok(x) => x,
            Err(e) => {
                close(ErrorCode::BadFrame, e.to_string());
                break;
            }
        };
        // The protocol's own flow (one `result` per lease held, one `ready` when idle) is paced by the leases we hand
        // out, so only messages outside it are rate-limited: an honest worker is never cut off however fast it is.
        if !app.state().solicited(conn, &msg) && !bucket.take() {
            close(ErrorCode::Limit, flood());
            break;
        }
        let fx = match msg {
            WorkerMsg::Hello { .. } => {
                close(ErrorCode::OutOfProtocol, "hello sent twice".into());
                break;
            }
            WorkerMsg::Ready => app.state().ready(conn),
            WorkerMsg::Result {
                lease,
                loss,
                correct,
                commit,
            } => {
                // Commit before reveal: a result that names the hash of its payload must carry exactly that payload.
                if commit
                    .is_some_and(|c| !c.eq_ignore_ascii_case(&crate::ledger::sha256_hex(payload)))
                {
                    app.state().result_mismatch(conn, lease)
                } else {
                    let grad = f32s(payload);
                    app.state().result(conn, lease, loss, correct, grad)
                }
            }
            WorkerMsg::Failed { lease, reason } => {
                tracing::info!(%lease, reason = %reason.chars().take(200).collect::<String>(), "worker could not compute its lease");
                app.state().failed(conn, lease)
            }
        };
        Box::pin(app.apply(fx)).await;
    }
    let fx = app.state().disconnect(conn);
    Box::pin(app.apply(fx)).await;
    tracing::info!("worker disconnected");
    drop(tx);
    finish(writer).await;
}

async fn finish(writer: tokio::task::JoinHandle<()>) {
    // The writer ends once every sender is dropped or after sending a close; give it a moment to flush.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}
