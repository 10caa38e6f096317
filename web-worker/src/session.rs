//! The worker side of the protocol as a sans-IO state machine: frames in, frames out.
//!
//! The native runner (`native.rs`) and the browser binding (`wasm.rs`) only move frames between a WebSocket and
//! [`Session::handle`], so both platforms run exactly this logic — both protocol versions included: v1 leases (one
//! micro-batch) and v2 local leases (H inner steps, `core::local`, with int8 deltas both ways).

mod lease_data; // The datasets local leases name: rows or a token stream, decoded, checked and gathered.

use starling_core::StepOutput;
use starling_core::local::{InnerLoop, LeasePlan, LocalOutput, gather_rows};
use starling_core::protocol::{
    CoordinatorMsg, DatasetEncoding, ErrorCode, JobId, LeaseId, Outcome, PROTOCOL_V2, Platform,
    ProtocolError, Quant, WireFrame, WorkerId, WorkerMsg, decode_delta, encode, encode_delta,
    f32_bytes, f32s, split_lease_payload,
};

use crate::engine::{Device, Engine, EngineError};
use lease_data::LeaseData;

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
    #[error("coordinator picked protocol {0}; this worker speaks 1 to {PROTOCOL_V2}")]
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
    /// The protocol version the coordinator picked (0 before `welcome`).
    pub protocol: u32,
    /// Inner steps of the local lease in progress (or last run) and how many of them are done.
    pub inner_steps: u32,
    pub inner_done: u32,
    /// Model broadcasts received as deltas (v2) and as full parameters.
    pub model_deltas: u64,
    pub full_models: u64,
    /// Datasets fetched (v2) and their bytes as received (the `dataset` payloads, compressed when the
    /// coordinator sent them so).
    pub datasets: u64,
    pub dataset_bytes: u64,
    /// Datasets found in the [`DatasetCache`] (checked like a download), so not fetched.
    pub datasets_cached: u64,
    /// Protocol bytes received and sent (frame payloads as the session sees them: JSON text or binary frames,
    /// without the WebSocket framing), datasets included.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// A boxed future of the dataset cache (not `Send`: the browser's is a JavaScript promise).
pub type CacheFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Where a worker keeps datasets across connections and runs, by SHA-256 (the name `local_lease` gives): on disk
/// natively (`native::DiskCache`), in the Cache API in the browser (`wasm.rs`). Entries hold the `dataset`
/// payload as received with its encoding ([`cache_entry`]); a loaded entry is decoded and its SHA-256 checked
/// exactly like a download, so a corrupt or planted entry is only a miss.
pub trait DatasetCache {
    fn load<'a>(&'a self, sha256: &'a str) -> CacheFuture<'a, Option<Vec<u8>>>;
    fn store<'a>(&'a self, sha256: &'a str, entry: Vec<u8>) -> CacheFuture<'a, ()>;
}

/// A cache entry: the encoding's name, a newline, then the `dataset` payload.
pub fn cache_entry(encoding: DatasetEncoding, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(encoding.as_str().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// The encoding and payload of a cache entry (`None` if it is not one).
pub fn parse_cache_entry(entry: &[u8]) -> Option<(DatasetEncoding, &[u8])> {
    let nl = entry.iter().take(32).position(|b| *b == b'\n')?;
    let name = std::str::from_utf8(&entry[..nl]).ok()?;
    Some((DatasetEncoding::parse(name)?, &entry[nl + 1..]))
}

/// Whether `sha256` looks like a SHA-256 in hex (what a cache may use as a file or key name).
pub fn is_sha256_hex(sha256: &str) -> bool {
    sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A hook that may alter a result before it is sent: how test suites and the trust benchmark build a lying worker
/// out of a real one. Honest workers have none.
pub type Tamper = Box<dyn FnMut(&mut StepOutput)>;

/// A lie about a whole local lease (v2), for the attack suites: change the plan before computing (skip inner
/// steps, use other rows) or the output after. A [`Tamper`] still applies to every inner step's output.
pub trait LocalLie: Send {
    /// Called before the inner loop with the plan the lease asked for.
    fn plan(&mut self, _plan: &mut LeasePlan) {}
    /// Called with what the inner loop produced, before it is encoded and sent.
    fn output(&mut self, _out: &mut LocalOutput) {}
    /// Called with the base parameters of model `version` before the inner loop starts from them.
    fn base(&mut self, _version: u64, _params: &mut Vec<f32>) {}
}

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
    /// Model version resident in `engine` (and in `params`).
    model: Option<(JobId, u64)>,
    /// The parameters of `model` as received, bit for bit: v2 deltas are added to them and every local lease
    /// starts from them.
    params: Vec<f32>,
    tamper: Option<Tamper>,
    lie: Option<Box<dyn LocalLie>>,
    /// Training sets fetched for local leases (v2), by SHA-256, checked on arrival.
    datasets: Vec<(String, LeaseData)>,
    /// A local lease waiting for its dataset.
    pending: Option<(CoordinatorMsg, Vec<u8>)>,
    /// Datasets kept across connections and runs (none: every connection fetches them).
    cache: Option<Box<dyn DatasetCache>>,
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
            params: Vec::new(),
            tamper: None,
            lie: None,
            datasets: Vec::new(),
            pending: None,
            cache: None,
            stats: Stats::default(),
        }
    }

    /// Keeps datasets in `cache` across connections and runs (see [`DatasetCache`]).
    pub fn with_dataset_cache(mut self, cache: Box<dyn DatasetCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Keeps `ds` (named `sha256`) in memory, the latest two datasets at most (a worker rarely trains for more
    /// than a couple of jobs).
    fn keep_dataset(&mut self, sha256: String, ds: LeaseData) {
        if self.datasets.len() >= 2 {
            self.datasets.remove(0);
        }
        self.datasets.push((sha256, ds));
    }

    /// Looks `sha256` up in the cache: decoded and checked, it is kept in memory and `true` returned.
    async fn load_cached(&mut self, sha256: &str) -> bool {
        let Some(cache) = self.cache.as_ref() else {
            return false;
        };
        if !is_sha256_hex(sha256) {
            return false;
        }
        let Some(entry) = cache.load(sha256).await else {
            return false;
        };
        let decoded = parse_cache_entry(&entry)
            .ok_or_else(|| "not a cache entry".to_string())
            .and_then(|(e, p)| LeaseData::decode(e, p, sha256));
        match decoded {
            Ok(ds) => {
                self.stats.datasets_cached += 1;
                self.keep_dataset(sha256.to_ascii_lowercase(), ds);
                true
            }
            Err(reason) => {
                tracing::warn!(%sha256, %reason, "cached dataset refused; fetching it again");
                false
            }
        }
    }

    /// Installs a local-lease lie (see [`LocalLie`]).
    pub fn with_local_lie(mut self, lie: Box<dyn LocalLie>) -> Self {
        self.lie = Some(lie);
        self
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
                // Versions are cumulative: naming 2 says this worker speaks 1 and 2.
                protocol: PROTOCOL_V2,
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
        self.stats.bytes_received += match frame {
            Incoming::Text(t) => t.len(),
            Incoming::Binary(b) => b.len(),
        } as u64;
        let out = self.handle_frame(frame).await?;
        self.stats.bytes_sent += out
            .iter()
            .map(|f| match f {
                WireFrame::Text(t) => t.len(),
                WireFrame::Binary(b) => b.len(),
            } as u64)
            .sum::<u64>();
        Ok(out)
    }

    async fn handle_frame(&mut self, frame: Incoming<'_>) -> Result<Vec<WireFrame>, SessionError> {
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
                if !(1..=PROTOCOL_V2).contains(&protocol) {
                    return Err(SessionError::Version(protocol));
                }
                self.stats.protocol = protocol;
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
                self.params = params;
                self.stats.full_models += 1;
                self.stats.job = Some(job.0);
                self.stats.version = Some(version);
                Ok(vec![])
            }
            CoordinatorMsg::ModelDelta {
                job,
                from,
                version,
                quant,
            } => {
                if self.model != Some((job, from)) {
                    // Not the version the delta is from: drop what we hold, so the next lease fails and the
                    // coordinator sends the full model with the lease after.
                    tracing::warn!(%job, from, version, held = ?self.model, "model delta from a version this worker does not hold");
                    self.model = None;
                    return Ok(vec![]);
                }
                let delta = decode_delta(quant, payload, self.params.len())?;
                // θ_version = θ_from + decode(payload), value by value in f32: the coordinator adds the same.
                self.params
                    .iter_mut()
                    .zip(&delta)
                    .for_each(|(p, d)| *p += d);
                self.model = Some((job, version));
                self.stats.model_deltas += 1;
                self.stats.version = Some(version);
                Ok(vec![])
            }
            msg @ CoordinatorMsg::LocalLease { .. } => {
                self.stats.leases += 1;
                self.stats.waiting = None;
                if let CoordinatorMsg::LocalLease {
                    job,
                    dataset: Some(sha),
                    ..
                } = &msg
                    && !self
                        .datasets
                        .iter()
                        .any(|(s, _)| s.eq_ignore_ascii_case(sha))
                    && !self.load_cached(sha).await
                {
                    // Fetched once per dataset: the lease waits for it.
                    let request = WorkerMsg::DatasetRequest {
                        job: *job,
                        sha256: sha.clone(),
                        accept: DatasetEncoding::all(),
                    };
                    self.pending = Some((msg, payload.to_vec()));
                    return Ok(vec![encode(&request, &[])]);
                }
                Ok(self.local_lease(msg, payload).await)
            }
            CoordinatorMsg::Dataset {
                sha256, encoding, ..
            } => {
                let parsed = LeaseData::decode(encoding, payload, &sha256);
                let pending = self.pending.take();
                match parsed {
                    Ok(ds) => {
                        self.stats.datasets += 1;
                        self.stats.dataset_bytes += payload.len() as u64;
                        if let Some(cache) = self.cache.as_ref()
                            && is_sha256_hex(&sha256)
                        {
                            cache
                                .store(&sha256.to_ascii_lowercase(), cache_entry(encoding, payload))
                                .await;
                        }
                        self.keep_dataset(sha256.to_ascii_lowercase(), ds);
                        match pending {
                            Some((msg, p)) => Ok(self.local_lease(msg, &p).await),
                            None => Ok(vec![]),
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "dataset refused");
                        match pending {
                            Some((CoordinatorMsg::LocalLease { lease, .. }, _)) => {
                                self.stats.failed += 1;
                                Ok(vec![
                                    encode(&WorkerMsg::Failed { lease, reason }, &[]),
                                    encode(&WorkerMsg::Ready, &[]),
                                ])
                            }
                            _ => Ok(vec![]),
                        }
                    }
                }
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
        let input = engine.spec().input_len();
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

impl Session {
    /// Computes a `local_lease` (its dataset, if it names one, already fetched) and returns the frames to send: the
    /// `local_result` (or `failed`), then `ready`.
    async fn local_lease(&mut self, msg: CoordinatorMsg, payload: &[u8]) -> Vec<WireFrame> {
        let CoordinatorMsg::LocalLease {
            lease,
            job,
            version,
            rows,
            plan,
            quant,
            dataset,
            ..
        } = msg
        else {
            return vec![];
        };
        let computed = match self.lease_rows(rows, dataset.as_deref(), payload) {
            Ok((x, labels)) => self.compute_local(job, version, plan, &x, &labels).await,
            Err(e) => Err(e),
        };
        let reply = match computed {
            Ok(mut out) => {
                if let Some(lie) = self.lie.as_mut() {
                    lie.output(&mut out);
                }
                // A lying worker's NaN still travels when the job sends f32 (the coordinator must refuse it); an
                // honest one never produces one (the inner loop refuses non-finite gradients).
                let bytes = match (encode_delta(quant, &out.delta), quant) {
                    (Ok(b), _) => Ok(b),
                    (Err(_), Quant::F32) => Ok(f32_bytes(&out.delta)),
                    (Err(e), Quant::Int8) => Err(e.to_string()),
                };
                match bytes {
                    Ok(bytes) => {
                        self.stats.results_sent += 1;
                        let commit = Some(starling_core::digest::sha256_hex(&bytes));
                        encode(
                            &WorkerMsg::LocalResult {
                                lease,
                                losses: out.losses,
                                correct: out.correct,
                                quant,
                                commit,
                            },
                            &bytes,
                        )
                    }
                    Err(reason) => {
                        self.stats.failed += 1;
                        encode(&WorkerMsg::Failed { lease, reason }, &[])
                    }
                }
            }
            Err(reason) => {
                self.stats.failed += 1;
                tracing::warn!(%lease, %reason, "local lease failed");
                encode(&WorkerMsg::Failed { lease, reason }, &[])
            }
        };
        vec![reply, encode(&WorkerMsg::Ready, &[])]
    }

    /// A local lease's rows: gathered from the cached dataset by the indices in the payload, or the payload's own
    /// features and labels.
    fn lease_rows(
        &self,
        rows: u32,
        dataset: Option<&str>,
        payload: &[u8],
    ) -> Result<(Vec<f32>, Vec<u32>), String> {
        let engine = self.engine.as_ref().ok_or("no engine")?;
        let input = engine.spec().input_len();
        let Some(sha) = dataset else {
            return split_lease_payload(payload, rows as usize, input).map_err(|e| e.to_string());
        };
        let ds = self
            .datasets
            .iter()
            .find(|(s, _)| s.eq_ignore_ascii_case(sha))
            .map(|(_, d)| d)
            .ok_or_else(|| format!("dataset {sha} is not here"))?;
        let idx = starling_core::protocol::u32s(payload);
        if idx.len() != rows as usize || payload.len() != 4 * rows as usize {
            return Err(format!(
                "{} row indices for a lease of {rows} rows",
                idx.len()
            ));
        }
        ds.gather(&idx, input)
    }

    /// Runs a local lease's H inner steps on this worker's engine from the parameters it holds.
    async fn compute_local(
        &mut self,
        job: JobId,
        version: u64,
        mut plan: LeasePlan,
        x: &[f32],
        labels: &[u32],
    ) -> Result<LocalOutput, String> {
        if self.model != Some((job, version)) {
            return Err(format!(
                "local lease needs model {job}/{version}, which is not loaded"
            ));
        }
        let engine = self.engine.as_mut().ok_or("no engine")?;
        let input = engine.spec().input_len();
        let per_row = engine.spec().labels_per_row();
        let rows = labels.len() / per_row.max(1);
        if let Some(lie) = self.lie.as_mut() {
            lie.plan(&mut plan);
        }
        let mut base = std::borrow::Cow::Borrowed(&self.params);
        if let Some(lie) = self.lie.as_mut() {
            lie.base(version, base.to_mut());
        }
        let mut lp = InnerLoop::new(&base, &plan, rows).map_err(|e| e.to_string())?;
        self.stats.inner_steps = lp.h();
        self.stats.inner_done = 0;
        let started = now_ms();
        while let Some(positions) = lp.next_rows() {
            let (bx, by) = gather_rows(x, labels, (input, per_row), positions);
            engine
                .load(lp.params())
                .await
                .map_err(|e: EngineError| e.to_string())?;
            let mut out = engine
                .step(&bx, &by)
                .await
                .map_err(|e: EngineError| e.to_string())?;
            if let Some(tamper) = self.tamper.as_mut() {
                tamper(&mut out);
            }
            self.stats.rows += by.len() as u64;
            lp.apply(&out).map_err(|e| e.to_string())?;
            self.stats.inner_done = lp.done();
        }
        self.stats.busy_ms += now_ms() - started;
        if self.stats.busy_ms > 0.0 {
            self.stats.rows_per_s = self.stats.rows as f64 * 1000.0 / self.stats.busy_ms;
        }
        Ok(lp.finish())
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
