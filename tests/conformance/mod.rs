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

mod api; // docs/API.md: every route and every documented error code.
mod limits; // docs/PROTOCOL.md, "Errors and limits": one test per row.
mod outcomes; // docs/PROTOCOL.md, "What a result gets": one test per outcome.

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
                let (x, labels) = split_lease_payload(&p, rows as usize, self.spec.input_len())?;
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

    /// Computes `lease` honestly and sends the result.
    async fn honest(&mut self, lease: &Lease) -> anyhow::Result<()> {
        let r = self.compute(lease)?;
        self.submit(lease.id, r.loss, r.correct, &r.grad).await
    }

    /// The answer to a `ready` must be `waiting`.
    async fn expect_waiting(&mut self) -> anyhow::Result<()> {
        match self.next().await? {
            (CoordinatorMsg::Waiting { .. }, _) => Ok(()),
            other => bail!("expected waiting, got {other:?}"),
        }
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
