//! The browser volunteer: the same protocol [`Session`] as the native worker, over the browser's WebSocket, inside a
//! dedicated Web Worker (`www/worker.js` only forwards messages; every bit of state lives here).
//!
//! Page → Rust: `command(obj)` with `{type: "start", coordinator, fallbacks?, token?, name?, backend?, throttle?}`,
//! `{type: "throttle", share}` (0.05..=1, the share of time spent computing: the `ready` after a result is delayed),
//! `{type: "pause", paused}` (a paused worker finishes its lease and withholds `ready`), `{type: "stop"}` (closes
//! the socket) and `{type: "bench", n}` (matmul GFLOP/s of this CPU path).
//! Rust → page (`postMessage`): `{type: "device", backend: "webgpu"|"cpu", adapter, note}`,
//! `{type: "stats", state, stats}` (the session's [`Stats`]), `{type: "token", token}` (persist it),
//! `{type: "ended", reason}`, `{type: "error", message}` (a command the worker could not use), `{type: "bench", ..}`.
//!
//! A connection lost after the first welcome (the node died, restarted or failed over) is not the end: the worker
//! reconnects as the native one does (`native.rs`): after 200 ms, doubling to 4 s, with jitter up to half the
//! pause, to the same node and then each of `fallbacks` (other nodes' `ws://…/ws`) in turn, with the same session
//! (token, counters), reporting state `reconnecting` meanwhile; it gives up after 10 minutes without a connection.

use std::cell::RefCell;

use futures_channel::mpsc;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use wasm_bindgen::JsCast as _;
use wasm_bindgen::prelude::*;
use web_sys::DedicatedWorkerGlobalScope;

use starling_core::protocol::{ErrorCode, WireFrame, WorkerMsg, encode};

use crate::engine::{BackendChoice, Device};
use crate::gpu::GpuContext;
use crate::session::{Incoming, Session, SessionConfig, SessionError, Stats, now_ms};

mod cache; // The Cache API behind the session's dataset cache.
mod reconnect; // The socket and the reconnection policy.

use cache::BrowserCache;
use reconnect::{BACKOFF_MIN_MS, GIVE_UP_MS, Redial, Socket};

/// A command from the page. Anything else is answered with an `error` message, never a panic.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Start {
        /// `ws://host:port/ws`.
        coordinator: String,
        /// Other nodes' `ws://…/ws`, tried in turn after `coordinator` when the connection is lost.
        fallbacks: Option<Vec<String>>,
        token: Option<String>,
        name: Option<String>,
        /// `auto` (default), `webgpu`/`gpu` or `cpu`.
        backend: Option<String>,
        throttle: Option<f64>,
        paused: Option<bool>,
    },
    Throttle {
        share: f64,
    },
    Pause {
        paused: bool,
    },
    Stop,
    Bench {
        n: Option<u32>,
    },
}

/// What the run loop reacts to: socket events, page commands and its own timers, in arrival order.
enum Event {
    Opened,
    Text(String),
    Binary(Vec<u8>),
    Closed {
        code: u16,
        reason: String,
    },
    Command(Command),
    /// The throttle delay of the `ready` with this sequence number is over.
    ReadyDue(u64),
    /// The backoff pause before reconnection attempt number this is over.
    ReconnectDue(u64),
}

/// Messages posted to the page.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToPage<'a> {
    Device {
        backend: &'static str,
        adapter: String,
        note: Option<String>,
    },
    Stats {
        state: &'static str,
        stats: &'a Stats,
    },
    Token {
        token: &'a str,
    },
    Ended {
        reason: String,
    },
    Error {
        message: String,
    },
    Bench {
        n: u32,
        ms: f64,
        gflops: f64,
    },
}

thread_local! {
    /// The running session's event queue; `None` when no session runs.
    static RUNNING: RefCell<Option<mpsc::UnboundedSender<Event>>> = const { RefCell::new(None) };
}

/// Called by `worker.js` once the module is instantiated: reports panics to the page instead of dying silently.
#[wasm_bindgen(start)]
pub fn on_load() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("worker panicked: {info}");
        web_sys::console::error_1(&message.clone().into());
        post(&ToPage::Ended { reason: message });
    }));
}

/// Kernel self-test for the browser test (`tests/browser/kernels.test.mjs`): runs `gpu::selftest` on this
/// browser's WebGPU adapter and resolves to its report as a JSON string; rejects when there is no adapter.
#[wasm_bindgen]
pub async fn kernel_selftest() -> Result<String, JsValue> {
    let fail = |e: &dyn std::fmt::Display| JsValue::from_str(&e.to_string());
    let mut ctx = GpuContext::new().await.map_err(|e| fail(&e))?;
    if ctx.summary().name.is_empty()
        && let Some(name) = adapter_name().await
    {
        ctx.set_name(name);
    }
    let report = crate::gpu::selftest::run(&ctx)
        .await
        .map_err(|e| fail(&e))?;
    serde_json::to_string(&report).map_err(|e| fail(&e))
}

/// The page's one entry point: every command goes through here (see the module docs).
#[wasm_bindgen]
pub fn command(msg: JsValue) {
    let parsed = js_sys::JSON::stringify(&msg)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| "not a JSON object".to_string())
        .and_then(|s| serde_json::from_str::<Command>(&s).map_err(|e| e.to_string()));
    let cmd = match parsed {
        Ok(c) => c,
        Err(e) => {
            return post(&ToPage::Error {
                message: format!("bad command: {e}"),
            });
        }
    };
    match cmd {
        Command::Bench { n } => bench(n.unwrap_or(512).clamp(16, 2048)),
        Command::Start {
            coordinator,
            fallbacks,
            token,
            name,
            backend,
            throttle,
            paused,
        } => {
            if RUNNING.with(|r| r.borrow().is_some()) {
                return post(&ToPage::Error {
                    message: "already running".into(),
                });
            }
            let choice = match backend
                .as_deref()
                .unwrap_or("auto")
                .parse::<BackendChoice>()
            {
                Ok(c) => c,
                Err(e) => return post(&ToPage::Error { message: e }),
            };
            let (tx, rx) = mpsc::unbounded();
            RUNNING.with(|r| *r.borrow_mut() = Some(tx.clone()));
            let control = Control::new(throttle.unwrap_or(1.0), paused.unwrap_or(false));
            let config = SessionConfig {
                name,
                token: token.filter(|t| !t.is_empty()),
                browser: true,
            };
            let mut urls = vec![coordinator];
            urls.extend(fallbacks.unwrap_or_default());
            wasm_bindgen_futures::spawn_local(async move {
                let reason = run(urls, choice, config, control, tx, rx).await;
                RUNNING.with(|r| *r.borrow_mut() = None);
                post(&ToPage::Ended { reason });
            });
        }
        other => {
            let sent = RUNNING.with(|r| {
                r.borrow()
                    .as_ref()
                    .map(|tx| tx.unbounded_send(Event::Command(other)))
            });
            if sent.is_none() {
                post(&ToPage::Stats {
                    state: "stopped",
                    stats: &Stats::default(),
                });
            }
        }
    }
}

/// Multiplies two `n×n` matrices on this build's CPU path (matrixmultiply, SIMD128, one thread) and reports GFLOP/s.
fn bench(n: u32) {
    let n = n as usize;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; n * n];
    let form = starling_core::reference::MatmulForm::AB;
    starling_core::cpu::sgemm(form, n, n, n, &a, &b, 0.0, &mut c); // warm-up
    let reps = 3;
    let started = now_ms();
    for _ in 0..reps {
        starling_core::cpu::sgemm(form, n, n, n, &a, &b, 0.0, &mut c);
    }
    let ms = (now_ms() - started) / reps as f64;
    let gflops = 2.0 * (n * n * n) as f64 / (ms * 1e6);
    post(&ToPage::Bench {
        n: n as u32,
        ms,
        gflops,
    });
}

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

fn post(msg: &ToPage<'_>) {
    let Ok(json) = serde_json::to_string(msg) else {
        return;
    };
    if let Ok(value) = js_sys::JSON::parse(&json) {
        let _ = scope().post_message(&value);
    }
}

/// Throttle and pause: how and when `ready` goes out.
struct Control {
    /// Share of wall time spent computing (0.05..=1): after a lease that took `t` ms, `ready` waits
    /// `t · (1/share − 1)` ms.
    share: f64,
    paused: bool,
    /// A `ready` the session produced that is being withheld (paused) or delayed (throttled).
    ready_pending: bool,
    /// Sequence number of the latest scheduled delayed `ready`; older timers are stale.
    ready_seq: u64,
    /// `busy_ms` of the stats when the previous `ready` was scheduled, to measure the last lease.
    busy_seen: f64,
    /// A `ready` went out and no lease answered it yet: the coordinator may still push one lease, so a pause is
    /// only complete ("paused" rather than "pausing") once this is false.
    ready_outstanding: bool,
    /// The connection was lost and is being re-established (the page shows "reconnecting").
    reconnecting: bool,
}

impl Control {
    fn send_ready(&mut self, socket: &Socket, ready: &WireFrame) {
        self.ready_pending = false;
        self.ready_outstanding = socket.send(ready);
    }

    fn new(share: f64, paused: bool) -> Self {
        Self {
            share: clamp_share(share),
            paused,
            ready_pending: false,
            ready_seq: 0,
            busy_seen: 0.0,
            ready_outstanding: false,
            reconnecting: false,
        }
    }
}

fn clamp_share(share: f64) -> f64 {
    if share.is_finite() {
        share.clamp(0.05, 1.0)
    } else {
        1.0
    }
}

/// Resolves the backend like the native worker: WebGPU on a hardware adapter, the CPU path on a fallback
/// (software) adapter unless WebGPU is forced, and the CPU path wherever WebGPU or an adapter is missing.
async fn open_device(choice: BackendChoice) -> (Device, Option<String>) {
    if choice == BackendChoice::Cpu {
        return (Device::Cpu, Some("CPU path chosen".into()));
    }
    if !wgpu::util::is_browser_webgpu_supported().await {
        return (
            Device::Cpu,
            Some("WebGPU is not available in this browser: using the CPU path".into()),
        );
    }
    let mut ctx = match GpuContext::new().await {
        Ok(ctx) => ctx,
        Err(e) => {
            return (
                Device::Cpu,
                Some(format!("WebGPU failed ({e}): using the CPU path")),
            );
        }
    };
    if ctx.summary().name.is_empty() {
        // Browsers hide `GPUAdapterInfo.description`; vendor and architecture are still informative.
        if let Some(name) = adapter_name().await {
            ctx.set_name(name);
        }
    }
    if choice == BackendChoice::Auto && ctx.summary().is_software {
        let note = format!(
            "{} is a software (fallback) adapter, slower than the CPU path: using the CPU path",
            ctx.summary().name
        );
        return (Device::Cpu, Some(note));
    }
    (Device::Gpu(ctx), None)
}

/// `vendor architecture` from `GPUAdapter.info`, read through reflection (web-sys' WebGPU types are unstable APIs).
async fn adapter_name() -> Option<String> {
    let get = |v: &JsValue, k: &str| {
        js_sys::Reflect::get(v, &JsValue::from_str(k))
            .ok()
            .filter(|x| !x.is_undefined())
    };
    let navigator = get(&js_sys::global(), "navigator")?;
    let gpu = get(&navigator, "gpu")?;
    let request: js_sys::Function = get(&gpu, "requestAdapter")?.dyn_into().ok()?;
    let promise: js_sys::Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(promise)
        .await
        .ok()
        .filter(|a| !a.is_null())?;
    let info = get(&adapter, "info")?;
    let parts: Vec<String> = ["vendor", "architecture"]
        .iter()
        .filter_map(|k| get(&info, k)?.as_string())
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn backend_name(device: &Device) -> &'static str {
    match device {
        Device::Gpu(_) => "webgpu",
        Device::Cpu => "cpu",
    }
}

fn js_error(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Posts the session's stats with the run's state.
fn post_stats(session: &Session, control: &Control, connected: bool) {
    let state = if control.reconnecting {
        "reconnecting"
    } else if !connected {
        "connecting"
    } else if control.paused && control.ready_outstanding {
        "pausing"
    } else if control.paused {
        "paused"
    } else if session.stats().waiting.is_some() {
        "waiting"
    } else {
        "running"
    };
    post(&ToPage::Stats {
        state,
        stats: session.stats(),
    });
}

/// Resolves after `ms` milliseconds by queueing `ReadyDue(seq)`.
fn ready_after(ms: f64, seq: u64, tx: &mpsc::UnboundedSender<Event>) {
    let t = tx.clone();
    let cb = Closure::once_into_js(move || {
        let _ = t.unbounded_send(Event::ReadyDue(seq));
    });
    let _ = scope().set_timeout_with_callback_and_timeout_and_arguments_0(
        cb.unchecked_ref(),
        ms.min(600_000.0) as i32,
    );
}

/// One session from `start` to the socket closing; returns why it ended.
async fn run(
    urls: Vec<String>,
    choice: BackendChoice,
    config: SessionConfig,
    mut control: Control,
    tx: mpsc::UnboundedSender<Event>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> String {
    let (device, note) = open_device(choice).await;
    post(&ToPage::Device {
        backend: backend_name(&device),
        adapter: device.label(),
        note,
    });
    let mut session = Session::new(device, config).with_dataset_cache(Box::new(BrowserCache));
    post_stats(&session, &control, false);
    let mut redial = Redial {
        current: urls[0].clone(),
        urls,
        attempt: 0,
        backoff_ms: BACKOFF_MIN_MS,
        lost_at: None,
    };
    let mut socket = match Socket::open(&redial.current, &tx) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let ready = encode(&WorkerMsg::Ready, &[]);
    let mut connected = false;
    let mut connected_once = false;
    let mut token_sent: Option<String> = None;
    let mut stopping = false;
    while let Some(event) = rx.next().await {
        let replies = match event {
            Event::Opened => {
                connected = true;
                connected_once = true;
                control.reconnecting = false;
                redial.connected();
                if !socket.send(&session.hello()) {
                    return "the connection closed before hello".into();
                }
                post_stats(&session, &control, connected);
                continue;
            }
            Event::Closed { code, reason } => {
                if !stopping && connected_once {
                    // A failover or a restart: the same session carries on on a new connection.
                    connected = false;
                    control.reconnecting = true;
                    control.ready_outstanding = false;
                    control.ready_pending = false;
                    if !redial.schedule(&tx) {
                        return format!(
                            "lost the coordinator (code {code}) and could not reconnect for {} minutes",
                            GIVE_UP_MS / 60_000.0
                        );
                    }
                    post_stats(&session, &control, connected);
                    continue;
                }
                return if stopping {
                    "stopped by the volunteer".into()
                } else if !connected {
                    format!("could not connect to the coordinator (code {code})")
                } else if reason.is_empty() {
                    format!("the coordinator closed the connection (code {code})")
                } else {
                    format!("the coordinator closed the connection: {reason}")
                };
            }
            Event::Command(cmd) => {
                match cmd {
                    Command::Throttle { share } => control.share = clamp_share(share),
                    Command::Pause { paused } => {
                        control.paused = paused;
                        if !paused && control.ready_pending {
                            control.ready_seq += 1;
                            control.send_ready(&socket, &ready);
                        }
                    }
                    Command::Stop => {
                        stopping = true;
                        if socket
                            .ws
                            .close_with_code_and_reason(1000, "volunteer stopped")
                            .is_err()
                            || !connected
                        {
                            return "stopped by the volunteer".into();
                        }
                    }
                    Command::Start { .. } => post(&ToPage::Error {
                        message: "already running".into(),
                    }),
                    Command::Bench { n } => bench(n.unwrap_or(512).clamp(16, 2048)),
                }
                post_stats(&session, &control, connected);
                continue;
            }
            Event::ReconnectDue(attempt) => {
                if attempt == redial.attempt && control.reconnecting && !stopping {
                    let url = redial.url();
                    redial.attempt += 1;
                    match Socket::open(&url, &tx) {
                        Ok(s) => socket = s,
                        // A malformed fallback URL: on to the next one.
                        Err(_) if redial.schedule(&tx) => {}
                        Err(e) => return e,
                    }
                }
                continue;
            }
            Event::ReadyDue(seq) => {
                if seq == control.ready_seq && control.ready_pending && !control.paused && !stopping
                {
                    control.send_ready(&socket, &ready);
                }
                continue;
            }
            Event::Text(t) => session.handle(Incoming::Text(&t)).await,
            Event::Binary(b) => {
                let leases = session.stats().leases;
                let replies = session.handle(Incoming::Binary(&b)).await;
                if session.stats().leases != leases {
                    control.ready_outstanding = false;
                }
                replies
            }
        };
        match replies {
            Ok(frames) => {
                for frame in frames {
                    if frame == ready {
                        schedule_ready(&session, &mut control, &socket, &ready, &tx, stopping);
                    } else if !socket.send(&frame) {
                        return "the connection closed while sending a result".into();
                    }
                }
            }
            // A node shutting down (a restart): its close follows, and the worker reconnects then.
            Err(SessionError::Closed {
                code: ErrorCode::ShuttingDown,
                ..
            }) if connected_once => {}
            Err(SessionError::Closed { code, message }) => {
                return format!("the coordinator ended the session ({code:?}): {message}");
            }
            // Another coordinator node leads the work: follow it with the same session (token, model, counters);
            // replacing the socket detaches and closes the old one.
            Err(SessionError::Redirect { url }) => {
                socket = match Socket::open(&url, &tx) {
                    Ok(s) => s,
                    Err(e) => return e,
                };
                redial.current = url;
                connected = false;
                control.ready_outstanding = false;
            }
            Err(e) => return format!("protocol error: {e}"),
        }
        if let Some(token) = session
            .token()
            .filter(|t| token_sent.as_deref() != Some(*t))
        {
            post(&ToPage::Token { token });
            token_sent = Some(token.to_string());
        }
        post_stats(&session, &control, connected);
    }
    "the worker's event queue closed".into()
}

/// Sends `ready` now, after the throttle delay, or when the volunteer resumes.
fn schedule_ready(
    session: &Session,
    control: &mut Control,
    socket: &Socket,
    ready: &WireFrame,
    tx: &mpsc::UnboundedSender<Event>,
    stopping: bool,
) {
    let busy = session.stats().busy_ms;
    let last_lease_ms = (busy - control.busy_seen).max(0.0);
    control.busy_seen = busy;
    if stopping {
        return;
    }
    control.ready_seq += 1;
    let delay = last_lease_ms * (1.0 / control.share - 1.0);
    if control.paused {
        control.ready_pending = true;
    } else if delay >= 1.0 {
        control.ready_pending = true;
        ready_after(delay, control.ready_seq, tx);
    } else {
        control.send_ready(socket, ready);
    }
}
