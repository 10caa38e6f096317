//! Conformance: docs/PROTOCOL.md's table of errors and limits, every documented `result` outcome, and docs/API.md's
//! routes and error codes, checked against a real coordinator on 127.0.0.1:0. Workers here speak raw WebSocket
//! frames (tokio-tungstenite, not our worker's `Session`) and owners plain HTTP (ureq), as an independent
//! implementation written from the documents would; each test asserts the `error` code *and* the close code.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use starling_coordinator::config::ServeConfig;
use starling_coordinator::http::JobRoute;
use starling_core::ModelSpec;
use starling_core::protocol::{
    Backend, CoordinatorMsg, ErrorCode, LeaseId, Outcome, Platform, WireFrame, WorkerMsg, encode,
    f32_bytes, f32s, split_lease_payload,
};
use starling_tests::{Server, TempDir, create_owner, init_tracing};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single expected frame may take; everything here answers in milliseconds.
const WAIT: Duration = Duration::from_secs(10);
const SPEC: &str = r#"{"input":4,"layers":[{"units":3,"activation":"none"}]}"#;

// ---------------------------------------------------------------------------------------------------------------
// Raw WebSocket client

async fn connect(server: &Server) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await?;
    Ok(ws)
}

fn hello(protocol: u32, token: Option<&str>) -> WorkerMsg {
    WorkerMsg::Hello {
        protocol,
        token: token.map(str::to_string),
        name: Some("conformance".into()),
        backend: Backend::Cpu,
        adapter: "raw test client".into(),
        platform: Platform::Native,
    }
}

async fn send(ws: &mut Ws, msg: &WorkerMsg, payload: &[u8]) -> anyhow::Result<()> {
    let m = match encode(msg, payload) {
        WireFrame::Text(t) => Message::text(t),
        WireFrame::Binary(b) => Message::binary(b),
    };
    ws.send(m).await?;
    Ok(())
}

/// A binary frame with header length field `h`, these header bytes and this payload, exactly as given.
fn binary(h: u32, header: &[u8], payload: &[u8]) -> Message {
    let mut b = h.to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(payload);
    Message::binary(b)
}

/// The next protocol message, skipping WebSocket control frames; fails on a close or a reset.
async fn recv(ws: &mut Ws) -> anyhow::Result<(CoordinatorMsg, Vec<u8>)> {
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no message in time")?;
        match next {
            Some(Ok(Message::Text(t))) => {
                return Ok((CoordinatorMsg::decode_text(t.as_str())?, vec![]));
            }
            Some(Ok(Message::Binary(b))) => {
                let (m, p) = CoordinatorMsg::decode_binary(&b)?;
                return Ok((m, p.to_vec()));
            }
            Some(Ok(Message::Close(c))) => bail!("closed while waiting for a message: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("connection failed while waiting for a message: {e}"),
            None => bail!("connection ended while waiting for a message"),
        }
    }
}

/// Asserts the documented way a connection ends: an `error` message with `code`, then a close frame with `close`
/// (not a bare close, not a reset: 1006). Messages before the error (welcome, waiting, pongs) are skipped.
/// Returns the error's message.
async fn expect_error_then_close(
    ws: &mut Ws,
    code: ErrorCode,
    close: u16,
) -> anyhow::Result<String> {
    let message = loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .with_context(|| format!("no `error {code:?}` in time"))?;
        match next {
            Some(Ok(Message::Text(t))) => match CoordinatorMsg::decode_text(t.as_str())? {
                CoordinatorMsg::Error { code: got, message } => {
                    assert_eq!(got, code, "error code (message {message:?})");
                    break message;
                }
                _ => continue,
            },
            Some(Ok(Message::Close(c))) => bail!("closed with {c:?} before any `error {code:?}`"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                bail!("connection failed (a client sees 1006) before `error {code:?}`: {e}")
            }
            None => bail!("connection ended before `error {code:?}`"),
        }
    };
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no close frame in time after the error")?;
        match next {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(
                    u16::from(frame.code),
                    close,
                    "close code after `error {code:?}: {message}`"
                );
                return Ok(message);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => bail!(
                "expected a close frame {close} after `error {code:?}: {message}`, got {other:?}"
            ),
        }
    }
}

/// Connects and says hello; returns the socket, the worker's id and its token.
async fn join(server: &Server, token: Option<&str>) -> anyhow::Result<(Ws, u64, String)> {
    let mut ws = connect(server).await?;
    send(&mut ws, &hello(1, token), &[]).await?;
    match recv(&mut ws).await? {
        (CoordinatorMsg::Welcome { worker, token, .. }, _) => Ok((ws, worker.0, token)),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// A lease as a worker sees it, with the model it must be computed on.
struct Lease {
    id: LeaseId,
    version: u64,
    /// The micro-batch's index in its step (replicas of one micro-batch share it).
    micro: u32,
    x: Vec<f32>,
    labels: Vec<u32>,
}

/// A raw worker that keeps the model frames it was sent.
struct Peer {
    ws: Ws,
    /// The worker id its `welcome` named.
    worker: u64,
    spec: ModelSpec,
    params: Option<(u64, Vec<f32>)>,
}

impl Peer {
    async fn join(server: &Server, token: Option<&str>) -> anyhow::Result<Self> {
        let (ws, worker, _) = join(server, token).await?;
        Ok(Self {
            ws,
            worker,
            spec: ModelSpec::from_json(SPEC)?,
            params: None,
        })
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        send(&mut self.ws, &WorkerMsg::Ready, &[]).await
    }

    /// The next message that is not a `model` (which is kept), with its payload.
    async fn next(&mut self) -> anyhow::Result<(CoordinatorMsg, Vec<u8>)> {
        loop {
            match recv(&mut self.ws).await? {
                (CoordinatorMsg::Model { version, .. }, p) => {
                    self.params = Some((version, f32s(&p)))
                }
                other => return Ok(other),
            }
        }
    }

    /// Waits for a lease (skipping `waiting`).
    async fn lease(&mut self) -> anyhow::Result<Lease> {
        loop {
            if let Some(lease) = self.lease_or_waiting().await? {
                return Ok(lease);
            }
        }
    }

    /// The answer to a `ready`: a lease, or `None` for `waiting` (the `ready` still stands).
    async fn lease_or_waiting(&mut self) -> anyhow::Result<Option<Lease>> {
        match self.next().await? {
            (
                CoordinatorMsg::Lease {
                    lease,
                    version,
                    micro_batch,
                    rows,
                    ..
                },
                p,
            ) => {
                let (x, labels) = split_lease_payload(&p, rows as usize, self.spec.input as usize)?;
                Ok(Some(Lease {
                    id: lease,
                    version,
                    micro: micro_batch,
                    x,
                    labels,
                }))
            }
            (CoordinatorMsg::Waiting { .. }, _) => Ok(None),
            other => bail!("expected a lease or waiting, got {other:?}"),
        }
    }

    /// The honest result of `lease`: the reference forward + backward pass on the model version it names.
    fn compute(&self, lease: &Lease) -> anyhow::Result<starling_core::StepOutput> {
        let (version, params) = self
            .params
            .as_ref()
            .context("no model frame before the lease")?;
        anyhow::ensure!(
            *version == lease.version,
            "lease for version {} but model {version}",
            lease.version
        );
        Ok(starling_core::reference::forward_backward(
            &self.spec,
            params,
            &lease.x,
            &lease.labels,
        )?)
    }

    async fn submit(
        &mut self,
        lease: LeaseId,
        loss: f32,
        correct: u32,
        grad: &[f32],
    ) -> anyhow::Result<()> {
        let msg = WorkerMsg::Result {
            lease,
            loss,
            correct,
            commit: None,
        };
        send(&mut self.ws, &msg, &f32_bytes(grad)).await
    }

    /// Waits for the verdict on `lease` (skipping `waiting`, leases and other verdicts).
    async fn verdict(&mut self, lease: LeaseId) -> anyhow::Result<Outcome> {
        loop {
            match self.next().await? {
                (
                    CoordinatorMsg::Verdict {
                        lease: l, outcome, ..
                    },
                    _,
                ) if l == lease => return Ok(outcome),
                (CoordinatorMsg::Error { code, message }, _) => {
                    bail!("error {code:?} instead of a verdict: {message}")
                }
                _ => continue,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Owner HTTP client (blocking ureq, run off the async runtime that also serves the coordinator)

struct Http {
    base: String,
    agent: ureq::Agent,
}

/// Status and body (JSON when it parses, else the text as a JSON string).
type Answer = (u16, serde_json::Value);

impl Http {
    fn new(server: &Server) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: format!("http://{}", server.addr),
            agent,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let (agent, url, method, token) = (
            self.agent.clone(),
            format!("{}{path}", self.base),
            method.to_string(),
            token.map(str::to_string),
        );
        tokio::task::spawn_blocking(move || -> anyhow::Result<Answer> {
            let auth = token.map(|t| format!("Bearer {t}"));
            let mut resp = match method.as_str() {
                "GET" => {
                    let mut r = agent.get(&url);
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    r.call()?
                }
                _ => {
                    let mut r = agent
                        .post(&url)
                        .header("Content-Type", "application/octet-stream");
                    if let Some(a) = &auth {
                        r = r.header("Authorization", a);
                    }
                    match body {
                        Some(b) => r.send(&b[..])?,
                        None => r.send_empty()?,
                    }
                }
            };
            let status = resp.status().as_u16();
            let streaming = resp
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
            if streaming {
                // An event stream never ends; its status and content type are the answer.
                return Ok((status, serde_json::json!("event-stream")));
            }
            let bytes = resp.body_mut().read_to_vec()?;
            let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            });
            Ok((status, json))
        })
        .await?
    }

    async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<Answer> {
        self.call("GET", path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> anyhow::Result<Answer> {
        self.call("POST", path, token, Some(body.to_vec())).await
    }
}

/// Asserts an API error answer: this status and this stable code.
#[track_caller]
fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(
        (answer.0, answer.1["error"]["code"].as_str()),
        (status, Some(code)),
        "answer {answer:?}"
    );
}

/// A raw `SDS1` dataset: `rows` rows of 4 features, labels 0..3.
fn dataset(rows: u32) -> Vec<u8> {
    let mut b = b"SDS1".to_vec();
    b.extend_from_slice(&rows.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    for r in 0..rows {
        for d in 0..4 {
            b.extend_from_slice(&(((r * 7 + d * 3) % 11) as f32 / 11.0 - 0.5).to_le_bytes());
        }
    }
    for r in 0..rows {
        b.extend_from_slice(&(r % 3).to_le_bytes());
    }
    b
}

/// A coordinator with owners `alice` and `bob`.
struct Env {
    server: Server,
    alice: String,
    bob: String,
    /// Holds the database; dropped after the server.
    _dir: TempDir,
}

/// Starts a coordinator on port 0; `tune` adjusts the test config.
async fn start(tag: &str, tune: impl FnOnce(&mut ServeConfig)) -> anyhow::Result<Env> {
    init_tracing();
    let dir = TempDir::new(tag);
    let alice = create_owner(&dir.db(), "alice").await?;
    let bob = create_owner(&dir.db(), "bob").await?;
    let mut config = ServeConfig::for_tests(dir.db());
    tune(&mut config);
    let server = Server::start(config).await?;
    Ok(Env {
        server,
        alice,
        bob,
        _dir: dir,
    })
}

/// Uploads a 40-row dataset as `token` and creates a job on it; returns (dataset id, job id).
async fn create_job(
    http: &Http,
    token: &str,
    hyper: serde_json::Value,
) -> anyhow::Result<(i64, u64)> {
    let (status, ds) = http
        .post("/api/v1/datasets?name=tiny", Some(token), &dataset(40))
        .await?;
    anyhow::ensure!(status == 201, "upload: {status} {ds}");
    let id = ds["id"].as_i64().context("dataset id")?;
    let body = serde_json::json!({"name": "tiny", "spec": serde_json::from_str::<serde_json::Value>(SPEC)?, "dataset": id, "hyper": hyper});
    let (status, job) = http
        .post("/api/v1/jobs", Some(token), body.to_string().as_bytes())
        .await?;
    anyhow::ensure!(status == 201, "create job: {status} {job}");
    Ok((id, job["id"].as_u64().context("job id")?))
}

/// One micro-batch of 4 rows per step, so every replica of a step's only micro-batch meets the others.
fn one_micro(redundancy: u32) -> serde_json::Value {
    serde_json::json!({"global_batch": 4, "micro_batch": 4, "steps": 1000, "redundancy": redundancy, "eval_every": 1000})
}

// ---------------------------------------------------------------------------------------------------------------
// docs/PROTOCOL.md, "Errors and limits": one test per row

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_connections_per_address() -> anyhow::Result<()> {
    let Env { server, .. } = &start("conns", |c| c.max_conns_per_addr = 2).await?;
    let _a = join(server, None).await?;
    let _b = join(server, None).await?;
    let mut c = connect(server).await?;
    // A client that says hello at once, before reading, must still learn why it was turned away.
    send(&mut c, &hello(1, None), &[]).await?;
    let m = expect_error_then_close(&mut c, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("too many connections"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_flood() -> anyhow::Result<()> {
    let Env { server, .. } = &start("flood", |c| (c.msg_rate, c.msg_burst) = (1, 4)).await?;
    let (mut ws, ..) = join(server, None).await?;
    // The first `ready` is the paced flow; the ones after it (already asked, no lease) are unsolicited.
    for _ in 0..5_000 {
        if send(&mut ws, &WorkerMsg::Ready, &[]).await.is_err() {
            break;
        }
    }
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("unsolicited messages"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_ping_flood() -> anyhow::Result<()> {
    let Env { server, .. } = &start("pings", |c| (c.msg_rate, c.msg_burst) = (1, 4)).await?;
    let (mut ws, ..) = join(server, None).await?;
    for _ in 0..5_000 {
        if ws.send(Message::Ping(vec![1, 2, 3].into())).await.is_err() {
            break;
        }
    }
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("unsolicited messages"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_size() -> anyhow::Result<()> {
    let Env { server, .. } = &start("size", |c| c.max_frame_bytes = 64 * 1024).await?;
    let (ws, ..) = join(server, None).await?;
    let (mut sink, mut stream) = ws.split();
    // The coordinator stops reading at the frame header; the client may still be writing the rest when the answer
    // comes, so it writes on its own task.
    let writer = tokio::spawn(async move {
        let _ = sink
            .send(binary(8, b"{}      ", &vec![0u8; 256 * 1024]))
            .await;
        sink
    });
    let message = loop {
        match tokio::time::timeout(WAIT, stream.next()).await? {
            Some(Ok(Message::Text(t))) => match CoordinatorMsg::decode_text(t.as_str())? {
                CoordinatorMsg::Error { code, message } => {
                    assert_eq!(code, ErrorCode::Limit, "{message}");
                    break message;
                }
                _ => continue,
            },
            other => bail!("expected `error limit`, got {other:?}"),
        }
    };
    assert!(message.contains("over the limit of 65536"), "{message}");
    match tokio::time::timeout(WAIT, stream.next()).await? {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1009),
        other => bail!("expected close 1009, got {other:?}"),
    }
    let _ = writer.await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_size() -> anyhow::Result<()> {
    let Env { server, .. } = &start("header", |_| ()).await?;
    // Binary: a header length over 16 KiB (the bytes are there; it is the length that is refused).
    let (mut ws, ..) = join(server, None).await?;
    let h = 16 * 1024 + 4;
    ws.send(binary(h, &vec![b' '; h as usize], &[0; 4])).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("over the limit of 16384"), "{m}");
    // Text: a JSON message over 16 KiB, here as the first frame.
    let mut ws = connect(server).await?;
    let long = format!(r#"{{"type":"ready","pad":"{}"}}"#, "x".repeat(16 * 1024));
    ws.send(Message::text(long)).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("over the limit of 16384"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_payload_not_whole_4_byte_values() -> anyhow::Result<()> {
    let Env { server, .. } = &start("align", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    let mut header = br#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#.to_vec();
    while !header.len().is_multiple_of(4) {
        header.push(b' ');
    }
    ws.send(binary(header.len() as u32, &header, &[0; 6]))
        .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("not a whole number of 4-byte values"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_header_not_padded_to_4() -> anyhow::Result<()> {
    let Env { server, .. } = &start("pad", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    let mut header = br#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#.to_vec();
    if header.len().is_multiple_of(4) {
        header.push(b' ');
    }
    ws.send(binary(header.len() as u32, &header, &[0; 8]))
        .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("not a multiple of 4"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_undecodable_messages() -> anyhow::Result<()> {
    let Env { server, .. } = &start("decode", |_| ()).await?;
    let result = padded(r#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#);
    let cases: Vec<(&str, Message)> = vec![
        ("not JSON", Message::text("hello?")),
        ("unknown type", Message::text(r#"{"type":"gimme"}"#)),
        (
            "unknown field",
            Message::text(r#"{"type":"failed","lease":1,"reason":"x","please":true}"#),
        ),
        (
            "result without its payload",
            Message::text(r#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#),
        ),
        (
            "ready with a payload",
            binary(16, br#"{"type":"ready"}"#, &[0; 4]),
        ),
        ("header past the frame's end", binary(64, &result, &[])),
        (
            "shorter than the length field",
            Message::binary(vec![1u8, 0]),
        ),
        // JSON has no NaN; `null` is the nearest a client can write, and a loss must be a number.
        ("null loss", {
            let h = padded(r#"{"type":"result","lease":1,"loss":null,"correct":0}"#);
            binary(h.len() as u32, &h, &[0; 4])
        }),
    ];
    for (what, frame) in cases {
        let (mut ws, ..) = join(server, None).await?;
        ws.send(frame).await?;
        expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007)
            .await
            .with_context(|| what.to_string())?;
    }
    Ok(())
}

/// JSON bytes padded with spaces to a multiple of 4, as a binary frame's header must be.
fn padded(json: &str) -> Vec<u8> {
    let mut h = json.as_bytes().to_vec();
    while !h.len().is_multiple_of(4) {
        h.push(b' ');
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_text_not_utf8() -> anyhow::Result<()> {
    let Env { server, .. } = &start("utf8", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    ws.send(Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    )))
    .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("UTF-8"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_no_hello_in_time() -> anyhow::Result<()> {
    let Env { server, .. } = &start("nohello", |c| c.hello_timeout_ms = 200).await?;
    let mut ws = connect(server).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("no hello within 200 ms"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_first_message_not_hello() -> anyhow::Result<()> {
    let Env { server, .. } = &start("first", |_| ()).await?;
    let mut ws = connect(server).await?;
    send(&mut ws, &WorkerMsg::Ready, &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("must be hello, not ready"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_hello_twice() -> anyhow::Result<()> {
    let Env { server, .. } = &start("twice", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    send(&mut ws, &hello(1, None), &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("hello sent twice"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch() -> anyhow::Result<()> {
    let Env { server, .. } = &start("version", |_| ()).await?;
    let mut ws = connect(server).await?;
    send(&mut ws, &hello(2, None), &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::ProtocolVersion, 1008).await?;
    assert!(m.contains("speaks protocol 1, not 2"), "{m}");
    Ok(())
}

/// Both refusal rows: the result that reaches the strike limit gets its `rejected` verdict, then `error refused`
/// and the close; the refused token is turned away at hello from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_at_the_strike_limit_and_at_hello() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("refused", |c| c.strike_limit = 1).await?;
    let http = Http::new(server);
    create_job(&http, alice, one_micro(2)).await?;
    let (ws, worker, token) = join(server, None).await?;
    let mut peer = Peer {
        ws,
        worker,
        spec: ModelSpec::from_json(SPEC)?,
        params: None,
    };
    // A second connection of the same worker (its token), idle: the refusal reaches it too.
    let (mut other, ..) = join(server, Some(&token)).await?;
    peer.ready().await?;
    let lease = peer.lease().await?;
    peer.submit(lease.id, 1.0, 0, &[0.5; 3]).await?; // the wrong length: rejected, a strike
    let verdict = tokio::time::timeout(WAIT, peer.ws.next())
        .await
        .context("no verdict in time")?;
    match verdict {
        Some(Ok(Message::Text(t))) => match CoordinatorMsg::decode_text(t.as_str())? {
            CoordinatorMsg::Verdict {
                outcome, lease: l, ..
            } => {
                assert_eq!(
                    (outcome, l),
                    (Outcome::Rejected, lease.id),
                    "the verdict comes first"
                );
            }
            other => bail!("expected the rejected verdict first, got {other:?}"),
        },
        other => bail!("expected the rejected verdict first, got {other:?}"),
    }
    let m = expect_error_then_close(&mut peer.ws, ErrorCode::Refused, 1008).await?;
    assert!(m.contains("refused after 1 rejected results"), "{m}");
    expect_error_then_close(&mut other, ErrorCode::Refused, 1008).await?;
    let mut again = connect(server).await?;
    send(&mut again, &hello(1, Some(&token)), &[]).await?;
    expect_error_then_close(&mut again, ErrorCode::Refused, 1008).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down() -> anyhow::Result<()> {
    let Env { server, _dir, .. } = start("shutdown", |_| ()).await?;
    let (mut ws, ..) = join(&server, None).await?;
    let stop = tokio::spawn(server.stop());
    expect_error_then_close(&mut ws, ErrorCode::ShuttingDown, 1001).await?;
    drop(ws);
    stop.await??;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// docs/PROTOCOL.md, "What a result gets": one test per outcome

/// Two raw workers holding the two replicas of step 0's only micro-batch.
async fn two_replicas(server: &Server) -> anyhow::Result<((Peer, Lease), (Peer, Lease))> {
    let mut a = Peer::join(server, None).await?;
    let mut b = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    b.ready().await?;
    let lb = b.lease().await?;
    Ok(((a, la), (b, lb)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_when_replicas_agree() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("accepted", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_it_loses_arbitration() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("arbitrated", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    let flipped: Vec<f32> = rb.grad.iter().map(|g| -g).collect();
    b.submit(lb.id, rb.loss, rb.correct, &flipped).await?;
    assert_eq!(
        a.verdict(la.id).await?,
        Outcome::Accepted,
        "agrees with the coordinator's recomputation"
    );
    assert_eq!(b.verdict(lb.id).await?, Outcome::Rejected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_invalid() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("invalid", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    a.submit(la.id, 1.0, 0, &[0.0; 3]).await?; // wrong length
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected, "wrong length");
    let mut nan = b.compute(&lb)?;
    nan.grad[0] = f32::NAN;
    b.submit(lb.id, nan.loss, nan.correct, &nan.grad).await?;
    assert_eq!(
        b.verdict(lb.id).await?,
        Outcome::Rejected,
        "NaN in the gradient"
    );
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    let lc = c.lease().await?;
    let rc = c.compute(&lc)?;
    c.submit(lc.id, rc.loss, 5, &rc.grad).await?; // correct > rows
    assert_eq!(c.verdict(lc.id).await?, Outcome::Rejected, "correct > rows");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_when_the_commit_does_not_match() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("commit", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), _) = two_replicas(server).await?;
    let r = a.compute(&la)?;
    let msg = WorkerMsg::Result {
        lease: la.id,
        loss: r.loss,
        correct: r.correct,
        commit: Some("0".repeat(64)),
    };
    send(&mut a.ws, &msg, &f32_bytes(&r.grad)).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_for_a_lease_the_connection_does_not_hold() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("foreign", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let r = a.compute(&la)?;
    // b answers a's lease, and a lease that never existed: both late, and b's own lease is unaffected.
    b.submit(la.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(b.verdict(la.id).await?, Outcome::Late);
    b.submit(LeaseId(999_999), r.loss, r.correct, &r.grad)
        .await?;
    assert_eq!(b.verdict(LeaseId(999_999)).await?, Outcome::Late);
    let rb = b.compute(&lb)?;
    a.submit(la.id, r.loss, r.correct, &r.grad).await?;
    b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_after_the_lease_expired() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("expired", |_| ()).await?;
    let http = Http::new(server);
    let mut hyper = one_micro(2);
    hyper["lease_timeout_ms"] = 1000.into();
    let (_, job) = create_job(&http, alice, hyper).await?;
    let mut a = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    let r = a.compute(&la)?;
    // Wait for the reaper to expire the lease (a condition, polled), then answer it.
    let start = std::time::Instant::now();
    loop {
        let (_, view) = http.get(&format!("/api/v1/jobs/{job}"), None).await?;
        if view["counters"]["leases_expired"].as_u64() >= Some(1) {
            break;
        }
        anyhow::ensure!(start.elapsed() < WAIT, "lease never expired: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.submit(la.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Late);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_for_a_near_miss() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("nearmiss", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    // Same loss and correct count, gradient 1% off: outside the tolerance, inside the near-miss band (0.05).
    let off: Vec<f32> = rb.grad.iter().map(|g| g * 1.01).collect();
    b.submit(lb.id, rb.loss, rb.correct, &off).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Late);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_r3_every_replica_is_accepted_once_all_three_agree() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("quorum", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(3)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    let lc = c.lease().await?;
    let (ra, rb, rc) = (a.compute(&la)?, b.compute(&lb)?, c.compute(&lc)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
    // Two agreeing replicas of three are no proof (they could be a colluding pair): the micro-batch settles only
    // when the third agrees too, and then none of the three is wasted as `late`.
    c.submit(lc.id, rc.loss, rc.correct, &rc.grad).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    assert_eq!(c.verdict(lc.id).await?, Outcome::Accepted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_still_stands_after_waiting() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("waiting", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    match c.next().await? {
        (CoordinatorMsg::Waiting { .. }, _) => {}
        other => bail!("expected waiting, got {other:?}"),
    }
    let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
    a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
    b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
    // The next step opens: c gets a lease without asking again.
    let lc = c.lease().await?;
    assert_eq!(lc.version, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_releases_the_lease_without_a_verdict() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("failed", |_| ()).await?;
    create_job(&Http::new(server), alice, one_micro(2)).await?;
    let ((mut a, la), (mut b, lb)) = two_replicas(server).await?;
    let mut c = Peer::join(server, None).await?;
    c.ready().await?;
    match c.next().await? {
        (CoordinatorMsg::Waiting { .. }, _) => {}
        other => bail!("expected waiting, got {other:?}"),
    }
    send(
        &mut a.ws,
        &WorkerMsg::Failed {
            lease: la.id,
            reason: "device lost".into(),
        },
        &[],
    )
    .await?;
    // The released replica goes to c at once; it and b agree, and a hears nothing about its lease.
    let lc = c.lease().await?;
    assert_eq!(lc.version, 0);
    let (rb, rc) = (b.compute(&lb)?, c.compute(&lc)?);
    b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
    c.submit(lc.id, rc.loss, rc.correct, &rc.grad).await?;
    assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    assert_eq!(c.verdict(lc.id).await?, Outcome::Accepted);
    a.ready().await?;
    let next = a.lease().await?;
    assert_eq!(
        next.version, 1,
        "a's next message is a lease of the next step, not a verdict"
    );
    Ok(())
}

/// The job's counters, as its public status shows them.
async fn counters(http: &Http, job: u64) -> anyhow::Result<serde_json::Value> {
    let (status, view) = http.get(&format!("/api/v1/jobs/{job}"), None).await?;
    anyhow::ensure!(status == 200, "job status: {status} {view}");
    Ok(view["counters"].clone())
}

/// Adaptive replication: two honest raw workers agree step after step (one micro-batch, R = 2) until `a`, now
/// trusted, is leased a micro-batch alone, which `b` sees as `waiting` for its `ready` (the only micro-batch wants
/// no second replica). Returns `a` with its solo lease and `b`, whose `ready` still stands.
async fn solo_lease(server: &Server) -> anyhow::Result<(Peer, Lease, Peer)> {
    let mut a = Peer::join(server, None).await?;
    let mut b = Peer::join(server, None).await?;
    // With a record r >= the trust threshold a lease is solo with probability 1 - max(0.05, 1/r).
    for _ in 0..50 {
        a.ready().await?;
        let la = a.lease().await?;
        b.ready().await?;
        let Some(lb) = b.lease_or_waiting().await? else {
            return Ok((a, la, b));
        };
        anyhow::ensure!(
            la.micro == lb.micro && la.version == lb.version,
            "R = 2 replicas of one micro-batch"
        );
        let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
        a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
        b.submit(lb.id, rb.loss, rb.correct, &rb.grad).await?;
        assert_eq!(a.verdict(la.id).await?, Outcome::Accepted);
        assert_eq!(b.verdict(lb.id).await?, Outcome::Accepted);
    }
    bail!("no solo lease in 50 steps of agreed results")
}

/// Trusted after 2 agreed results; no speculative replica while a test runs, so the only second replica of a solo
/// micro-batch is the one a failed spot check sends back to replication.
fn trusted_after_2(c: &mut ServeConfig) {
    c.trust_threshold = 2;
    c.speculate_after_ms = 60_000;
}

/// An adaptive job of one 4-row micro-batch per step, R = 2.
fn adaptive() -> serde_json::Value {
    let mut hyper = one_micro(2);
    hyper["adaptive"] = true.into();
    hyper
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_by_a_spot_check() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("spot-ok", trusted_after_2).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, adaptive()).await?;
    let (mut a, la, _b) = solo_lease(server).await?;
    let before = counters(&http, job).await?;
    let r = a.compute(&la)?;
    a.submit(la.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(
        a.verdict(la.id).await?,
        Outcome::Accepted,
        "agrees with the coordinator's recomputation"
    );
    let after = counters(&http, job).await?;
    assert_eq!(
        (&before["spot_checks"], &after["spot_checks"]),
        (&0.into(), &1.into()),
        "{after}"
    );
    assert_eq!(after["spot_check_failures"], 0, "{after}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_by_a_failed_spot_check() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("spot-bad", trusted_after_2).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, adaptive()).await?;
    let (mut a, la, mut b) = solo_lease(server).await?;
    let r = a.compute(&la)?;
    let flipped: Vec<f32> = r.grad.iter().map(|g| -g).collect();
    a.submit(la.id, r.loss, r.correct, &flipped).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Rejected);
    let after = counters(&http, job).await?;
    assert_eq!(
        (&after["spot_checks"], &after["spot_check_failures"]),
        (&1.into(), &1.into()),
        "{after}"
    );
    // The micro-batch goes back to R-fold replication: b's standing `ready` gets a replica of the same step.
    let lb = b.lease().await?;
    assert_eq!((lb.version, lb.micro), (la.version, la.micro));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_accepted_for_a_speculative_replica_while_the_step_is_open() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("speculative", |c| c.speculate_after_ms = 200).await?;
    // Two micro-batches per step, R = 2: four workers hold every replica, a fifth waits.
    let hyper = serde_json::json!({"global_batch": 8, "micro_batch": 4, "steps": 1000, "redundancy": 2, "eval_every": 1000});
    let (_, job) = create_job(&Http::new(server), alice, hyper).await?;
    let mut peers = Vec::new();
    for _ in 0..4 {
        let mut p = Peer::join(server, None).await?;
        p.ready().await?;
        let l = p.lease().await?;
        peers.push((p, l));
    }
    let mut extra = Peer::join(server, None).await?;
    extra.ready().await?;
    assert!(
        extra.lease_or_waiting().await?.is_none(),
        "every replica is leased: waiting"
    );
    // Its `ready` stands; once the leases are outstanding for --speculate-after-ms, the lease reaper hands it a
    // speculative replica of one of them.
    let le = extra.lease().await?;
    assert_eq!(le.version, 0);
    let mut pair: Vec<_> = peers
        .iter_mut()
        .filter(|(_, l)| l.micro == le.micro)
        .collect();
    assert_eq!(
        pair.len(),
        2,
        "R = 2 replicas of the speculated micro-batch"
    );
    for (p, l) in &mut pair {
        let r = p.compute(l)?;
        p.submit(l.id, r.loss, r.correct, &r.grad).await?;
    }
    for (p, l) in &mut pair {
        assert_eq!(p.verdict(l.id).await?, Outcome::Accepted);
    }
    // That micro-batch is accepted; the step still waits for the other one. The speculative replica agrees.
    let r = extra.compute(&le)?;
    extra.submit(le.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(extra.verdict(le.id).await?, Outcome::Accepted);
    let c = counters(&Http::new(server), job).await?;
    assert_eq!(
        (
            &c["speculative_leases"],
            &c["results_accepted"],
            &c["steps_applied"]
        ),
        (&1.into(), &3.into(), &0.into()),
        "{c}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_rejected_for_the_third_near_miss_in_a_row() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("nearmiss3", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let (mut a, mut b) = (
        Peer::join(server, None).await?,
        Peer::join(server, None).await?,
    );
    for (n, expected) in [
        (1, Outcome::Late),
        (2, Outcome::Late),
        (3, Outcome::Rejected),
    ] {
        a.ready().await?;
        let la = a.lease().await?;
        b.ready().await?;
        let lb = b.lease().await?;
        let (ra, rb) = (a.compute(&la)?, b.compute(&lb)?);
        a.submit(la.id, ra.loss, ra.correct, &ra.grad).await?;
        // Same loss and correct count, gradient 1% off: a near miss of the coordinator's recomputation.
        let off: Vec<f32> = rb.grad.iter().map(|g| g * 1.01).collect();
        b.submit(lb.id, rb.loss, rb.correct, &off).await?;
        assert_eq!(a.verdict(la.id).await?, Outcome::Accepted, "step {n}");
        assert_eq!(b.verdict(lb.id).await?, expected, "near miss {n}");
    }
    // The third one is the strike; the first two were not.
    let (_, workers) = http.get("/api/v1/workers", None).await?;
    let strikes: Vec<_> = workers
        .as_array()
        .context("a list")?
        .iter()
        .map(|w| (w["id"].as_u64(), w["strikes"].as_u64()))
        .collect();
    assert!(strikes.contains(&(Some(b.worker), Some(1))), "{workers}");
    assert!(strikes.contains(&(Some(a.worker), Some(0))), "{workers}");
    assert_eq!(counters(&http, job).await?["near_misses"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_after_its_job_was_cancelled() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("cancelled", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let mut a = Peer::join(server, None).await?;
    a.ready().await?;
    let la = a.lease().await?;
    let (status, view) = http
        .post(&format!("/api/v1/jobs/{job}/cancel"), Some(alice), b"")
        .await?;
    assert_eq!((status, &view["status"]), (200, &"cancelled".into()));
    let r = a.compute(&la)?;
    a.submit(la.id, r.loss, r.correct, &r.grad).await?;
    assert_eq!(a.verdict(la.id).await?, Outcome::Late);
    // Cancelling dropped the lease, so the result belongs to no job: docs/API.md does not count it in `results_late`.
    let c = counters(&http, job).await?;
    assert_eq!(
        (&c["results_late"], &c["results_accepted"]),
        (&0.into(), &0.into()),
        "{c}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_late_when_its_micro_batch_is_abandoned() -> anyhow::Result<()> {
    // A model too large for the coordinator to recompute: disagreements get volunteer tie-breakers, up to 6.
    let Env { server, alice, .. } = &start("abandoned", |c| c.spot_check_max_params = 1).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    // Each `ready` is answered (a lease for the first two, `waiting` for the rest) before the next peer asks: the
    // coordinator serves waiting workers in the order their `ready` arrived, and messages on different connections
    // have no order of their own.
    let mut peers = Vec::new();
    let mut first = Vec::new();
    for _ in 0..6 {
        let mut p = Peer::join(server, None).await?;
        p.ready().await?;
        first.push(p.lease_or_waiting().await?);
        peers.push(p);
    }
    // Each replica's gradient is the honest one scaled by a different factor (1, 2, …, 6): no two agree.
    let mut leases = Vec::new();
    for (k, (p, early)) in peers.iter_mut().zip(first).enumerate() {
        let l = match early {
            Some(l) => l,
            None => p.lease().await?,
        };
        anyhow::ensure!(
            (l.version, l.micro) == (0, 0),
            "replica {k} of step 0's micro-batch"
        );
        let r = p.compute(&l)?;
        let scaled: Vec<f32> = r.grad.iter().map(|g| g * (k + 1) as f32).collect();
        p.submit(l.id, r.loss, r.correct, &scaled).await?;
        leases.push(l.id);
    }
    for (p, l) in peers.iter_mut().zip(leases) {
        assert_eq!(p.verdict(l).await?, Outcome::Late);
    }
    let c = counters(&http, job).await?;
    assert_eq!(
        (
            &c["micro_batches_abandoned"],
            &c["results_late"],
            &c["results_rejected"]
        ),
        (&1.into(), &6.into(), &0.into()),
        "{c}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// docs/API.md: every route and every documented error code

/// The one job-access rule over every job route (`JobRoute::ALL`, the list the router is built from): the owner gets
/// the route; another owner 404, exactly like a job that does not exist; no token the public view where the route
/// has one, else 401; a bad token 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_every_job_route_applies_the_one_access_rule() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("access", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    // Cancel last: it is terminal, and resume after it would be a 409 (tested below).
    let mut routes = JobRoute::ALL.to_vec();
    routes.sort_by_key(|r| *r == JobRoute::Cancel);
    for route in routes {
        let path = format!("/api/v1/jobs/{job}{}", route.suffix());
        let ask = |token: Option<&str>| {
            let (http, path, token) = (&http, path.clone(), token.map(str::to_string));
            async move {
                http.call(route.method(), &path, token.as_deref(), None)
                    .await
            }
        };
        let who = format!("{} {path}", route.method());
        assert_error(&ask(Some(bob)).await?, 404, "not_found");
        assert_error(&ask(Some("stk_not_a_token")).await?, 401, "unauthorized");
        let missing = format!("/api/v1/jobs/999{}", route.suffix());
        assert_error(
            &http
                .call(route.method(), &missing, Some(alice), None)
                .await?,
            404,
            "not_found",
        );
        let public = ask(None).await?;
        if route.public() {
            assert_eq!(public.0, 200, "{who} without a token: {public:?}");
            if route == JobRoute::Status {
                assert_eq!(public.1["owned"], false);
                assert!(
                    public.1.get("spec").is_none() && public.1.get("hyper").is_none(),
                    "{}",
                    public.1
                );
            }
            assert_error(
                &http.call(route.method(), &missing, None, None).await?,
                404,
                "not_found",
            );
        } else {
            assert_error(&public, 401, "unauthorized");
        }
        let owner = ask(Some(alice)).await?;
        assert_eq!(owner.0, 200, "{who} as its owner: {owner:?}");
        if route == JobRoute::Status {
            assert_eq!(owner.1["owned"], true);
            assert_eq!(owner.1["hyper"]["redundancy"], 2);
        }
    }
    // An id that is not a number names no job.
    assert_error(
        &http.get("/api/v1/jobs/abc", Some(alice)).await?,
        404,
        "not_found",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_health_me_and_unknown_routes() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("health", |_| ()).await?;
    let http = Http::new(server);
    let (status, health) = http.get("/api/v1/health", None).await?;
    assert_eq!(
        (status, &health["status"], &health["protocol"]),
        (200, &"ok".into(), &1.into())
    );
    let (status, me) = http.get("/api/v1/me", Some(alice)).await?;
    assert_eq!((status, &me["name"]), (200, &"alice".into()));
    assert!(me["owner"].is_i64(), "{me}");
    assert_error(&http.get("/api/v1/me", None).await?, 401, "unauthorized");
    assert_error(
        &http.get("/api/v1/me", Some("stk_nope")).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.get("/api/v1/no/such/route", None).await?,
        404,
        "not_found",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_datasets_upload_and_list() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("datasets", |c| c.max_upload_bytes = 64 * 1024).await?;
    let http = Http::new(server);
    assert_error(
        &http.post("/api/v1/datasets", None, &dataset(40)).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.get("/api/v1/datasets", None).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/datasets", Some(alice), b"SDS1").await?,
        422,
        "bad_dataset",
    );
    assert_error(
        &http
            .post(
                "/api/v1/datasets?test_fraction=0.95",
                Some(alice),
                &dataset(40),
            )
            .await?,
        422,
        "bad_request",
    );
    // Over --max-upload-bytes: 413, and nothing is stored.
    let (status, _) = http
        .post("/api/v1/datasets", Some(alice), &dataset(4000))
        .await?;
    assert_eq!(status, 413);
    let (status, up) = http
        .post(
            "/api/v1/datasets?name=tiny&test_fraction=0.25",
            Some(alice),
            &dataset(40),
        )
        .await?;
    assert_eq!(status, 201, "{up}");
    assert_eq!(
        (
            &up["name"],
            &up["dim"],
            &up["train_rows"],
            &up["test_rows"],
            &up["classes"]
        ),
        (&"tiny".into(), &4.into(), &30.into(), &10.into(), &3.into())
    );
    let (status, list) = http.get("/api/v1/datasets", Some(alice)).await?;
    assert_eq!(status, 200);
    let list = list.as_array().context("a list")?.clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (
            &list[0]["id"],
            &list[0]["name"],
            &list[0]["dim"],
            &list[0]["train_rows"],
            &list[0]["test_rows"]
        ),
        (&up["id"], &"tiny".into(), &4.into(), &30.into(), &10.into())
    );
    assert!(list[0]["created_ms"].is_i64());
    let (_, theirs) = http.get("/api/v1/datasets", Some(bob)).await?;
    assert_eq!(
        theirs,
        serde_json::json!([]),
        "bob does not see alice's datasets"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_create_job_errors() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("jobs", |_| ()).await?;
    let http = Http::new(server);
    let (_, up) = http
        .post("/api/v1/datasets", Some(alice), &dataset(40))
        .await?;
    let ds = up["id"].as_i64().context("dataset id")?;
    let spec: serde_json::Value = serde_json::from_str(SPEC)?;
    let job = |name: &str, spec: &serde_json::Value, dataset: i64, hyper: serde_json::Value| {
        serde_json::json!({"name": name, "spec": spec, "dataset": dataset, "hyper": hyper})
            .to_string()
            .into_bytes()
    };
    let ok = job("j", &spec, ds, serde_json::json!({}));
    assert_error(
        &http.post("/api/v1/jobs", None, &ok).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some("stk_nope"), &ok).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some(alice), b"{").await?,
        422,
        "bad_request",
    );
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                br#"{"name":"j","spec":{},"dataset":"one"}"#,
            )
            .await?,
        422,
        "bad_request",
    );
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job(" ", &spec, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "bad_name",
    );
    let bad_spec = serde_json::json!({"input": 4, "layers": []});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &bad_spec, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "bad_spec",
    );
    for hyper in [
        serde_json::json!({"redundancy": 1}),
        serde_json::json!({"bogus": 1}),
        serde_json::json!({"global_batch": 64}),
    ] {
        assert_error(
            &http
                .post(
                    "/api/v1/jobs",
                    Some(alice),
                    &job("j", &spec, ds, hyper.clone()),
                )
                .await?,
            422,
            "bad_hyper",
        );
    }
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &spec, 999, serde_json::json!({})),
            )
            .await?,
        422,
        "unknown_dataset",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some(bob), &ok).await?,
        422,
        "unknown_dataset",
    );
    let wide = serde_json::json!({"input": 5, "layers": [{"units": 3, "activation": "none"}]});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &wide, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "shape_mismatch",
    );
    let narrow = serde_json::json!({"input": 4, "layers": [{"units": 2, "activation": "none"}]});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job(
                    "j",
                    &narrow,
                    ds,
                    serde_json::json!({"global_batch": 8, "micro_batch": 4}),
                ),
            )
            .await?,
        422,
        "shape_mismatch",
    );
    // Over the 1 MiB body limit: 413.
    let (status, _) = http
        .post("/api/v1/jobs", Some(alice), &vec![b' '; 1024 * 1024 + 1])
        .await?;
    assert_eq!(status, 413);
    let every = serde_json::json!({
        "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9}, "global_batch": 8, "micro_batch": 4, "steps": 5,
        "redundancy": 3, "tolerance": 0.01, "eval_every": 2, "seed": 7, "lease_timeout_ms": 5000,
        "target_accuracy": 0.99, "aggregate": "median", "clip_norm": 10.0, "adaptive": true
    });
    let (status, created) = http
        .post(
            "/api/v1/jobs",
            Some(alice),
            &job("every-field", &spec, ds, every.clone()),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    for (k, v) in every.as_object().context("object")? {
        assert_eq!(&created["hyper"][k], v, "hyper.{k} echoed");
    }
    // The job list: the owner's own jobs in full; another owner none; no token every job's public progress.
    let (_, mine) = http.get("/api/v1/jobs", Some(alice)).await?;
    assert_eq!(
        (mine.as_array().map(Vec::len), &mine[0]["owned"]),
        (Some(1), &true.into())
    );
    let (_, theirs) = http.get("/api/v1/jobs", Some(bob)).await?;
    assert_eq!(theirs, serde_json::json!([]));
    let (_, public) = http.get("/api/v1/jobs", None).await?;
    assert_eq!(
        (public.as_array().map(Vec::len), &public[0]["owned"]),
        (Some(1), &false.into())
    );
    assert!(public[0].get("hyper").is_none());
    assert_error(
        &http.get("/api/v1/jobs", Some("stk_nope")).await?,
        401,
        "unauthorized",
    );
    Ok(())
}

/// docs/API.md's hyper table, the newer fields: each out of its range is 422 `bad_hyper`; valid values (bounds
/// included) are echoed in the job status's `hyper`; a healthy job's `error` is `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_hyper_weight_schedule_decay_patience() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("hyper", |_| ()).await?;
    let http = Http::new(server);
    let (_, up) = http
        .post("/api/v1/datasets", Some(alice), &dataset(40))
        .await?;
    let ds = up["id"].as_i64().context("dataset id")?;
    let spec: serde_json::Value = serde_json::from_str(SPEC)?;
    // Every request is valid but for the field under test (the dataset has 32 training rows).
    let job = |fields: &serde_json::Value| {
        let mut hyper = serde_json::json!({"global_batch": 8, "micro_batch": 4});
        for (k, v) in fields.as_object().into_iter().flatten() {
            hyper[k] = v.clone();
        }
        serde_json::json!({"name": "j", "spec": spec, "dataset": ds, "hyper": hyper})
            .to_string()
            .into_bytes()
    };
    // Each answer's message names what is wrong, so a case cannot pass for another reason.
    for (hyper, names) in [
        (serde_json::json!({"weight": 0}), "weight"),
        (serde_json::json!({"weight": -1}), "weight"),
        (serde_json::json!({"weight": 1000.5}), "weight"),
        (
            serde_json::json!({"lr_schedule": {"kind": "cosine", "min_ratio": 1.5}}),
            "min_ratio",
        ),
        (
            serde_json::json!({"lr_schedule": {"kind": "cosine", "min_ratio": -0.1}}),
            "min_ratio",
        ),
        (
            serde_json::json!({"lr_schedule": {"kind": "linear"}}),
            "linear",
        ),
        (serde_json::json!({"weight_decay": 1.5}), "weight_decay"),
        (serde_json::json!({"weight_decay": -0.1}), "weight_decay"),
        (serde_json::json!({"patience": 0}), "patience"),
    ] {
        let answer = http.post("/api/v1/jobs", Some(alice), &job(&hyper)).await?;
        assert_eq!(
            (answer.0, answer.1["error"]["code"].as_str()),
            (422, Some("bad_hyper")),
            "hyper {hyper}: {answer:?}"
        );
        let message = answer.1["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(names), "hyper {hyper}: {message}");
    }
    let (_, jobs) = http.get("/api/v1/jobs", Some(alice)).await?;
    assert_eq!(jobs, serde_json::json!([]), "a refused job is not created");
    for valid in [
        serde_json::json!({
            "weight": 1000.0, "weight_decay": 1.0, "patience": 1,
            "lr_schedule": {"kind": "cosine", "warmup_steps": 0, "min_ratio": 0.0}
        }),
        serde_json::json!({
            "weight": 2.5, "weight_decay": 0.5, "patience": 4,
            "lr_schedule": {"kind": "cosine", "warmup_steps": 3, "min_ratio": 1.0}
        }),
    ] {
        let (status, created) = http.post("/api/v1/jobs", Some(alice), &job(&valid)).await?;
        assert_eq!(status, 201, "{valid}: {created}");
        for (k, v) in valid.as_object().context("object")? {
            assert_eq!(&created["hyper"][k], v, "hyper.{k} echoed");
        }
        assert_eq!(
            created.get("error"),
            Some(&serde_json::Value::Null),
            "{created}"
        );
    }
    // The defaults are echoed too.
    let (status, created) = http
        .post("/api/v1/jobs", Some(alice), &job(&serde_json::json!({})))
        .await?;
    assert_eq!(status, 201, "{created}");
    let h = &created["hyper"];
    assert_eq!(
        (
            &h["weight"],
            &h["lr_schedule"],
            &h["weight_decay"],
            &h["patience"]
        ),
        (
            &1.0.into(),
            &serde_json::json!({"kind": "constant"}),
            &0.0.into(),
            &serde_json::Value::Null
        ),
        "{h}"
    );
    let (_, view) = http
        .get(&format!("/api/v1/jobs/{}", created["id"]), Some(alice))
        .await?;
    assert_eq!(view.get("error"), Some(&serde_json::Value::Null), "{view}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_job_control_and_checkpoint_errors() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("control", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let base = format!("/api/v1/jobs/{job}");
    let (status, paused) = http
        .post(&format!("{base}/pause"), Some(alice), b"")
        .await?;
    assert_eq!((status, &paused["status"]), (200, &"paused".into()));
    let (status, running) = http
        .post(&format!("{base}/resume"), Some(alice), b"")
        .await?;
    assert_eq!((status, &running["status"]), (200, &"running".into()));
    assert_error(
        &http
            .get(&format!("{base}/checkpoint?which=best"), Some(alice))
            .await?,
        404,
        "not_found",
    );
    assert_error(
        &http
            .get(&format!("{base}/checkpoint?which=worst"), Some(alice))
            .await?,
        422,
        "bad_request",
    );
    let (status, _) = http.get(&format!("{base}/checkpoint"), Some(alice)).await?;
    assert_eq!(status, 200);
    let (status, cancelled) = http
        .post(&format!("{base}/cancel"), Some(alice), b"")
        .await?;
    assert_eq!((status, &cancelled["status"]), (200, &"cancelled".into()));
    assert_error(
        &http
            .post(&format!("{base}/resume"), Some(alice), b"")
            .await?,
        409,
        "conflict",
    );
    let (status, metrics) = http.get(&format!("{base}/metrics"), None).await?;
    assert_eq!((status, metrics), (200, serde_json::json!([])));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_workers_credits_ledger_and_prometheus() -> anyhow::Result<()> {
    let Env { server, .. } = &start("credits", |_| ()).await?;
    let http = Http::new(server);
    let (_ws, worker, token) = join(server, None).await?;
    let (status, workers) = http.get("/api/v1/workers", None).await?;
    assert_eq!(status, 200);
    assert_eq!(
        (
            &workers[0]["id"],
            &workers[0]["connected"],
            &workers[0]["refused"]
        ),
        (&worker.into(), &true.into(), &false.into())
    );
    let (status, credits) = http.get("/api/v1/credits", None).await?;
    assert_eq!(
        (status, credits["ledger_head"].as_str().map(str::len)),
        (200, Some(64))
    );
    let path = format!("/api/v1/credits/{worker}");
    assert_error(&http.get(&path, None).await?, 401, "unauthorized");
    assert_error(
        &http.get(&format!("{path}?token=wrong"), None).await?,
        401,
        "unauthorized",
    );
    let (status, own) = http
        .get(&format!("{path}?token={token}&limit=10"), None)
        .await?;
    assert_eq!(
        (status, &own["id"], &own["total_entries"]),
        (200, &worker.into(), &0.into())
    );
    let (status, text) = http.get("/metrics", None).await?;
    assert_eq!(status, 200);
    assert!(
        text.as_str()
            .is_some_and(|t| t.contains("starling_workers_connected{backend=\"cpu\"} 1")),
        "{text}"
    );
    Ok(())
}
