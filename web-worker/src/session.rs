//! The worker side of the protocol as a sans-IO state machine: frames in, frames out.
//!
//! The native runner (`native.rs`) and the browser binding (`wasm.rs`) only move frames between a WebSocket and
//! [`Session::handle`], so both platforms run exactly this logic.

use starling_core::StepOutput;
use starling_core::protocol::{
    CoordinatorMsg, ErrorCode, JobId, LeaseId, Outcome, PROTOCOL_VERSION, Platform, ProtocolError,
    WireFrame, WorkerId, WorkerMsg, encode, f32_bytes, f32s, split_lease_payload,
};

use crate::engine::{Device, Engine, EngineError};

/// A frame as received from the coordinator.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("coordinator sent an undecodable frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("coordinator closed the session ({code:?}): {message}")]
    Closed { code: ErrorCode, message: String },
    #[error("coordinator speaks protocol {0}, this worker {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("unexpected `{0}` from the coordinator")]
    Unexpected(&'static str),
    /// The coordinator node leads no work and names the one that does: reconnect there (same token).
    #[error("redirected to {url}")]
    Redirect { url: String },
}

/// What the volunteer (and the tests) can see of a session.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub worker: Option<u64>,
    pub leases: u64,
    pub results_sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub late: u64,
    pub failed: u64,
    /// Total credits (GFLOP) as last reported by the coordinator.
    pub credits: f64,
    /// Time spent computing, in milliseconds.
    pub busy_ms: f64,
    /// Rows computed per second of compute time.
    pub rows_per_s: f64,
    pub rows: u64,
    pub job: Option<u64>,
    pub version: Option<u64>,
    pub waiting: Option<String>,
}

/// A hook that may alter a result before it is sent: how test suites and the trust benchmark build a lying worker
/// out of a real one. Honest workers have none.
pub type Tamper = Box<dyn FnMut(&mut StepOutput)>;

/// Identity and options a session starts with.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    pub name: Option<String>,
    /// A token from a previous `welcome`, to keep identity and credits.
    pub token: Option<String>,
    pub browser: bool,
}

/// One connection's worth of worker state.
pub struct Session {
    device: Device,
    config: SessionConfig,
    engine: Option<Engine>,
    /// Model version resident in `engine`.
    model: Option<(JobId, u64)>,
    tamper: Option<Tamper>,
    stats: Stats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(device: Device, config: SessionConfig) -> Self {
        Self {
            device,
            config,
            engine: None,
            model: None,
            tamper: None,
            stats: Stats::default(),
        }
    }

    /// Installs a result-tampering hook (see [`Tamper`]).
    pub fn with_tamper(mut self, tamper: Tamper) -> Self {
        self.tamper = Some(tamper);
        self
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The token the coordinator issued (persist it to keep identity), once welcomed.
    pub fn token(&self) -> Option<&str> {
        self.config.token.as_deref()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The first frame to send.
    pub fn hello(&self) -> WireFrame {
        encode(
            &WorkerMsg::Hello {
                protocol: PROTOCOL_VERSION,
                token: self.config.token.clone(),
                name: self.config.name.clone(),
                backend: self.device.backend(),
                adapter: self.device.label(),
                platform: if self.config.browser {
                    Platform::Browser
                } else {
                    Platform::Native
                },
            },
            &[],
        )
    }

    /// Handles one frame from the coordinator and returns the frames to send back, in order.
    pub async fn handle(&mut self, frame: Incoming<'_>) -> Result<Vec<WireFrame>, SessionError> {
        let (msg, payload) = match frame {
            Incoming::Text(t) => (CoordinatorMsg::decode_text(t)?, &[][..]),
            Incoming::Binary(b) => CoordinatorMsg::decode_binary(b)?,
        };
        match msg {
            CoordinatorMsg::Welcome {
                protocol,
                worker,
                token,
                credits,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(SessionError::Version(protocol));
                }
                self.config.token = Some(token);
                self.stats.worker = Some(worker.0);
                self.stats.credits = credits;
                let _: WorkerId = worker;
                Ok(vec![encode(&WorkerMsg::Ready, &[])])
            }
            CoordinatorMsg::Model { job, version, spec } => {
                let params = f32s(payload);
                let reuse = self.engine.as_ref().is_some_and(|e| *e.spec() == spec);
                if !reuse {
                    self.engine = None;
                    self.model = None;
                    match self.device.engine(spec) {
                        Ok(e) => self.engine = Some(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot build an engine for this model");
                            return Ok(vec![]);
                        }
                    }
                }
                if let Some(engine) = self.engine.as_mut() {
                    match engine.load(&params).await {
                        Ok(()) => self.model = Some((job, version)),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot load model parameters");
                            self.model = None;
                        }
                    }
                }
                self.stats.job = Some(job.0);
                self.stats.version = Some(version);
                Ok(vec![])
            }
            CoordinatorMsg::Lease {
                lease,
                job,
                version,
                rows,
                ..
            } => {
                self.stats.leases += 1;
                self.stats.waiting = None;
                let reply = match self.compute(lease, job, version, rows, payload).await {
                    Ok((out, bytes)) => {
                        self.stats.results_sent += 1;
                        // Commit to the exact payload bytes (docs/PROTOCOL.md: what the commit does and does not protect).
                        let commit = Some(starling_core::digest::sha256_hex(&bytes));
                        encode(
                            &WorkerMsg::Result {
                                lease,
                                loss: out.loss,
                                correct: out.correct,
                                commit,
                            },
                            &bytes,
                        )
                    }
                    Err(reason) => {
                        self.stats.failed += 1;
                        tracing::warn!(%lease, %reason, "lease failed");
                        encode(&WorkerMsg::Failed { lease, reason }, &[])
                    }
                };
                Ok(vec![reply, encode(&WorkerMsg::Ready, &[])])
            }
            CoordinatorMsg::Waiting { reason } => {
                self.stats.waiting = Some(reason);
                Ok(vec![])
            }
            CoordinatorMsg::Verdict {
                outcome, credits, ..
            } => {
                match outcome {
                    Outcome::Accepted => self.stats.accepted += 1,
                    Outcome::Rejected => self.stats.rejected += 1,
                    Outcome::Late => self.stats.late += 1,
                }
                self.stats.credits = credits;
                Ok(vec![])
            }
            CoordinatorMsg::Error { code, message } => Err(SessionError::Closed { code, message }),
            CoordinatorMsg::Redirect { url } => Err(SessionError::Redirect { url }),
        }
    }

    async fn compute(
        &mut self,
        lease: LeaseId,
        job: JobId,
        version: u64,
        rows: u32,
        payload: &[u8],
    ) -> Result<(StepOutput, Vec<u8>), String> {
        if self.model != Some((job, version)) {
            return Err(format!(
                "lease {lease} needs model {job}/{version}, which is not loaded"
            ));
        }
        let engine = self.engine.as_mut().ok_or("no engine")?;
        let input = engine.spec().input as usize;
        let (x, labels) =
            split_lease_payload(payload, rows as usize, input).map_err(|e| e.to_string())?;
        let started = now_ms();
        let mut out = engine
            .step(&x, &labels)
            .await
            .map_err(|e: EngineError| e.to_string())?;
        let elapsed = now_ms() - started;
        self.stats.busy_ms += elapsed;
        self.stats.rows += rows as u64;
        if self.stats.busy_ms > 0.0 {
            self.stats.rows_per_s = self.stats.rows as f64 * 1000.0 / self.stats.busy_ms;
        }
        if let Some(tamper) = self.tamper.as_mut() {
            tamper(&mut out);
        }
        let bytes = f32_bytes(&out.grad);
        Ok((out, bytes))
    }
}

/// Milliseconds from an arbitrary origin, on both platforms (`std::time::Instant` panics in wasm32).
pub fn now_ms() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1000.0
    }
}
