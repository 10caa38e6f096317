//! The worker WebSocket endpoint (`/ws`): authentication by hello, then frames to scheduler calls.
//!
//! Each connection is a reader (this task) and a writer task fed by an unbounded channel; the scheduler never
//! awaits a socket. A frame that cannot be decoded, is not valid at this point of the protocol, or breaks a limit
//! gets an `error` message and a close frame (docs/PROTOCOL.md, "Errors and limits": one code and one close code per
//! case) and closes that connection only. Closing is a handshake, not a drop: after the writer has flushed both
//! frames the reader keeps draining the peer's input until its close frame ([`LINGER`]), because a socket dropped
//! with unread input is reset by the kernel and the peer would lose the very `error` that tells it why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use starling_core::protocol::{
    CoordinatorMsg, ErrorCode, MAX_HEADER_BYTES, PROTOCOL_V2, ProtocolError, WorkerMsg, encode,
    f32s, negotiate,
};

use crate::App;
use crate::scheduler::{ConnId, Outbound, frame_message};

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
    starling_core::digest::sha256_hex(token.as_bytes())
}

/// 128 random bits as hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS RNG failing is not recoverable in any useful way; fall back to time-based entropy rather than panic.
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (crate::store::now_ms() as u128 ^ (std::process::id() as u128) << 64).to_le_bytes();
    }
    starling_core::digest::hex(&bytes)
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

/// How long a closing connection is kept for the closing handshake: the writer flushes our `error` and close frames,
/// then the reader discards whatever the peer still sends until its close frame (or EOF). Dropping a socket with
/// unread input makes the kernel answer with a TCP reset that also discards what we sent and the peer has not yet
/// received, so a client still writing (a flood) would see close 1006 and never learn which limit it broke.
const LINGER: Duration = Duration::from_secs(2);
/// After a read error (an over-size message) the peer's remaining bytes cannot be drained through the WebSocket, so
/// the socket is held this long for our `error` and close frames to reach the peer before the reset.
const GRACE: Duration = Duration::from_millis(250);
/// Longest close-frame reason: a control frame's payload is at most 125 bytes, 2 of them the code.
const MAX_REASON_BYTES: usize = 123;

/// The answer to a frame that breaks the framing rules (docs/PROTOCOL.md, "Errors and limits"): a header over
/// 16 KiB is a limit; anything else that cannot be decoded is a bad frame.
fn decode_refusal(e: &ProtocolError) -> (ErrorCode, String) {
    match e {
        ProtocolError::HeaderLength(h) if *h > MAX_HEADER_BYTES => (
            ErrorCode::Limit,
            format!("header of {h} bytes is over the limit of {MAX_HEADER_BYTES}"),
        ),
        other => (ErrorCode::BadFrame, other.to_string()),
    }
}

/// The answer to a WebSocket read error, or `None` when the peer is gone and nothing can be said.
fn read_refusal(e: axum::Error) -> Option<(ErrorCode, String)> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    let e = e.into_inner().downcast::<WsError>().ok()?;
    match *e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some((
            ErrorCode::Limit,
            format!("message of {size} bytes is over the limit of {max_size} (--max-frame-bytes)"),
        )),
        WsError::Capacity(c) => Some((ErrorCode::Limit, c.to_string())),
        WsError::Utf8(_) => Some((ErrorCode::BadFrame, "text frame is not valid UTF-8".into())),
        WsError::Protocol(p) => Some((
            ErrorCode::BadFrame,
            format!("WebSocket protocol error: {p}"),
        )),
        _ => None,
    }
}

/// A close-frame reason: the message, cut at a character boundary to fit a control frame.
fn close_reason(message: &str) -> String {
    let mut end = message.len().min(MAX_REASON_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

/// The writer task: sends frames in order; `Outbound::Close` sends the `error` message and the close frame (each
/// flushed) and ends the task, so nothing queued after it goes out.
async fn write(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::UnboundedReceiver<Outbound>) {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Frame(m) => {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            Outbound::Close(code, message) => {
                let reason = close_reason(&message);
                let err = frame_message(encode(&CoordinatorMsg::Error { code, message }, &[]));
                if sink.send(err).await.is_ok() {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: close_code_for(code),
                            reason: reason.into(),
                        })))
                        .await;
                }
                return;
            }
        }
    }
}

async fn connection(socket: WebSocket, addr: SocketAddr, app: Arc<App>) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::unbounded_channel::<Outbound>();
    let writer = tokio::spawn(write(sink, rx).in_current_span());
    // The slot is held until the connection is fully closed (after the linger), so a closing flood still counts.
    let slot = app
        .per_addr
        .acquire(addr.ip(), app.config.max_conns_per_addr);
    let read_failed = match &slot {
        None => {
            close(
                &tx,
                ErrorCode::Limit,
                format!(
                    "too many connections from {} (limit {}, --max-conns-per-addr)",
                    addr.ip(),
                    app.config.max_conns_per_addr
                ),
            );
            false
        }
        Some(_) => session(&mut stream, &tx, addr, &app).await,
    };
    drop(tx);
    linger(&mut stream, writer, read_failed).await;
    drop(slot);
}

/// Asks the writer to send `error` with `code` and close the connection.
fn close(tx: &mpsc::UnboundedSender<Outbound>, code: ErrorCode, message: String) {
    tracing::info!(?code, %message, "closing connection");
    let _ = tx.send(Outbound::Close(code, message));
}

/// Finishes a connection: waits for the writer to flush (bounded), then completes the closing handshake by reading
/// and discarding until the peer's close frame or EOF, so the socket is not dropped with unread input (see
/// [`LINGER`]).
async fn linger(
    stream: &mut SplitStream<WebSocket>,
    mut writer: tokio::task::JoinHandle<()>,
    read_failed: bool,
) {
    let deadline = tokio::time::Instant::now() + LINGER;
    if tokio::time::timeout_at(deadline, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    if read_failed {
        tokio::time::sleep(GRACE).await;
        return;
    }
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Hello, then messages until the connection ends. Returns whether reading failed (after which the stream yields
/// nothing more).
async fn session(
    stream: &mut SplitStream<WebSocket>,
    tx: &mpsc::UnboundedSender<Outbound>,
    addr: SocketAddr,
    app: &Arc<App>,
) -> bool {
    // Hello first, within a deadline.
    let hello_timeout = Duration::from_millis(app.config.hello_timeout_ms);
    let first = match tokio::time::timeout(hello_timeout, stream.next()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => {
            if let Some((code, message)) = read_refusal(e) {
                close(tx, code, message);
            }
            return true;
        }
        Ok(None) => return false,
        Err(_) => {
            close(
                tx,
                ErrorCode::OutOfProtocol,
                format!("no hello within {} ms", app.config.hello_timeout_ms),
            );
            return false;
        }
    };
    let hello = match &first {
        Message::Text(t) => WorkerMsg::decode_text(t.as_str()),
        Message::Binary(b) => WorkerMsg::decode_binary(b).map(|(m, _)| m),
        Message::Close(_) => return false,
        Message::Ping(_) | Message::Pong(_) => {
            close(
                tx,
                ErrorCode::OutOfProtocol,
                "the first message must be hello, not a ping".into(),
            );
            return false;
        }
    };
    let (token, name, backend, adapter, platform, protocol) = match hello {
        Ok(WorkerMsg::Hello {
            protocol,
            token,
            name,
            backend,
            adapter,
            platform,
        }) => {
            // Versions are cumulative: a worker naming N speaks 1..=N; we speak 1 and 2.
            let Some(picked) = negotiate(protocol, PROTOCOL_V2) else {
                close(
                    tx,
                    ErrorCode::ProtocolVersion,
                    format!("this coordinator speaks protocol 1 or {PROTOCOL_V2}, not {protocol}"),
                );
                return false;
            };
            let trim = |s: String| s.chars().take(200).collect::<String>();
            (
                token,
                name.map(trim),
                backend,
                trim(adapter),
                platform,
                picked,
            )
        }
        Ok(other) => {
            let kind = match other {
                WorkerMsg::Hello { .. } => "hello",
                WorkerMsg::Ready => "ready",
                WorkerMsg::Result { .. } => "result",
                WorkerMsg::LocalResult { .. } => "local_result",
                WorkerMsg::DatasetRequest { .. } => "dataset_request",
                WorkerMsg::Failed { .. } => "failed",
            };
            close(
                tx,
                ErrorCode::OutOfProtocol,
                format!("the first message must be hello, not {kind}"),
            );
            return false;
        }
        Err(e) => {
            let (code, message) = decode_refusal(&e);
            close(tx, code, format!("cannot decode hello: {message}"));
            return false;
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
                        tx,
                        ErrorCode::ShuttingDown,
                        "internal error; try again later".into(),
                    );
                    return false;
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot look up worker");
            close(
                tx,
                ErrorCode::ShuttingDown,
                "internal error; try again later".into(),
            );
            return false;
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
            st.set_protocol(conn, protocol);
            let welcome = CoordinatorMsg::Welcome {
                protocol,
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
            tx,
            ErrorCode::Refused,
            "this worker was refused after repeated rejected results".into(),
        );
        return false;
    };
    tracing::info!(?backend, %adapter, ?platform, "worker connected");
    let read_failed = serve(stream, tx, conn, app).await;
    let fx = app.state().disconnect(conn);
    Box::pin(app.apply(fx)).await;
    tracing::info!("worker disconnected");
    read_failed
}

/// The admitted worker's messages, until it leaves, breaks a rule, is closed by the scheduler (`error refused`) or
/// the coordinator shuts down. Returns whether reading failed.
async fn serve(
    stream: &mut SplitStream<WebSocket>,
    tx: &mpsc::UnboundedSender<Outbound>,
    conn: ConnId,
    app: &Arc<App>,
) -> bool {
    let mut bucket = Bucket::new(app.config.msg_rate, app.config.msg_burst);
    let mut stop = app.shutdown.clone();
    let flood = || {
        format!(
            "more than {} unsolicited messages per second (burst {}, --msg-rate/--msg-burst)",
            app.config.msg_rate, app.config.msg_burst
        )
    };
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            // The writer ended: the scheduler closed this connection (e.g. `error refused`) or the socket failed.
            () = tx.closed() => return false,
            _ = stop.changed() => {
                close(tx, ErrorCode::ShuttingDown, "coordinator is shutting down".into());
                return false;
            }
        };
        let msg = match msg {
            None => return false,
            Some(Err(e)) => {
                if let Some((code, message)) = read_refusal(e) {
                    close(tx, code, message);
                }
                return true;
            }
            Some(Ok(m)) => m,
        };
        let decoded = match &msg {
            Message::Text(t) => WorkerMsg::decode_text(t.as_str()).map(|m| (m, &[][..])),
            Message::Binary(b) => WorkerMsg::decode_binary(b),
            Message::Close(_) => return false,
            // WebSocket control frames are messages too: a ping flood costs us a pong each.
            Message::Ping(_) | Message::Pong(_) => {
                if !bucket.take() {
                    close(tx, ErrorCode::Limit, flood());
                    return false;
                }
                continue;
            }
        };
        let (msg, payload) = match decoded {
            Ok(x) => x,
            Err(e) => {
                let (code, message) = decode_refusal(&e);
                close(tx, code, message);
                return false;
            }
        };
        // The protocol's own flow (one `result` per lease held, one `ready` when idle) is paced by the leases we hand
        // out, so only messages outside it are rate-limited: an honest worker is never cut off however fast it is.
        if !app.state().solicited(conn, &msg) && !bucket.take() {
            close(tx, ErrorCode::Limit, flood());
            return false;
        }
        let fx = match msg {
            WorkerMsg::Hello { .. } => {
                close(tx, ErrorCode::OutOfProtocol, "hello sent twice".into());
                return false;
            }
            WorkerMsg::Ready => app.state().ready(conn),
            WorkerMsg::Result {
                lease,
                loss,
                correct,
                commit,
            } => {
                // Commit before reveal: a result that names the hash of its payload must carry exactly that payload.
                if commit.is_some_and(|c| {
                    !c.eq_ignore_ascii_case(&starling_core::digest::sha256_hex(payload))
                }) {
                    app.state().result_mismatch(conn, lease)
                } else {
                    let grad = f32s(payload);
                    app.state().result(conn, lease, loss, correct, grad)
                }
            }
            WorkerMsg::LocalResult {
                lease,
                losses,
                correct,
                quant,
                commit,
            } => {
                if commit.is_some_and(|c| {
                    !c.eq_ignore_ascii_case(&starling_core::digest::sha256_hex(payload))
                }) {
                    app.state().result_mismatch(conn, lease)
                } else {
                    app.state()
                        .local_result(conn, lease, losses, correct, quant, payload)
                }
            }
            WorkerMsg::DatasetRequest {
                job,
                sha256,
                accept,
            } => app.state().dataset_request(conn, job, &sha256, &accept),
            WorkerMsg::Failed { lease, reason } => {
                tracing::info!(%lease, reason = %reason.chars().take(200).collect::<String>(), "worker could not compute its lease");
                app.state().failed(conn, lease)
            }
        };
        Box::pin(app.apply(fx)).await;
    }
}
