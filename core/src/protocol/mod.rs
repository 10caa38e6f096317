//! The worker ⇄ coordinator wire protocol over WebSocket (specified in docs/PROTOCOL.md).
//!
//! One enum per direction, serde-tagged by `"type"`. A message without a tensor travels as a text frame holding its
//! JSON; a message with a tensor travels as one binary frame: `u32 LE header length H`, `H` bytes of the JSON
//! header (space-padded so `H % 4 == 0`, which keeps the payload 4-byte aligned for a zero-copy `Float32Array`), then
//! the payload of little-endian f32/u32 values (or, in v2, int8 blocks, see [`crate::quant`]). Tensors never travel
//! as JSON arrays.
//!
//! Versions are cumulative: a peer that speaks version N speaks every version from 1 to N, so a worker's `hello`
//! names its highest version and the coordinator's `welcome` confirms it (a version the coordinator does not speak
//! is refused). v1 messages are byte-identical in v2; v2 only adds messages (`local_lease`, `model_delta`,
//! `local_result`), which a peer sends only once v2 was picked.
//!
//! Parts: this file (ids, the two message enums, framing); `payload` (v1 tensor payloads); `v2` (what v2 adds:
//! the delta encoding and version negotiation); `dataset` (the `dataset` frame's encodings); `tests`.

mod dataset;
mod payload;
#[cfg(test)]
mod tests;
mod v2;

pub use dataset::{
    DEFLATE_LEVEL, DatasetCodecError, DatasetEncoding, MAX_DATASET_BYTES, dataset_sha256,
    decode_dataset, decode_dataset_bytes, decode_token_dataset, encode_dataset,
    encode_token_dataset,
};
pub use payload::{f32_bytes, f32s, lease_payload, split_lease_payload, u32_bytes, u32s};
pub use v2::{PROTOCOL_V2, Quant, decode_delta, encode_delta, negotiate};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::local::LeasePlan;
use crate::spec::{MAX_PARAMS, ModelSpec};

/// The base version (v1), which every peer speaks: synchronous micro-batch leases. See [`PROTOCOL_V2`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest JSON header accepted in either direction.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest frame a worker may send: a full gradient of the largest allowed model plus its header.
pub const MAX_WORKER_FRAME_BYTES: usize = MAX_PARAMS * 4 + MAX_HEADER_BYTES + 4;

macro_rules! id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
id!(/// A volunteer, stable across reconnects through its token.
    WorkerId);
id!(/// A training job.
    JobId);
id!(/// One lease of one micro-batch to one worker; never reused.
    LeaseId);

/// Which engine a worker computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// WGSL kernels on a GPU adapter (wgpu natively, WebGPU in a browser).
    Gpu,
    /// The CPU backend (native threads, or WASM SIMD in a browser).
    Cpu,
}

/// Where a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Native,
    Browser,
}

/// Worker → coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMsg {
    /// First message on a connection. `token` is the one a previous `welcome` issued (keeps identity and credits).
    Hello {
        protocol: u32,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        name: Option<String>,
        backend: Backend,
        /// Human-readable adapter, e.g. "llvmpipe (Vulkan, Cpu)" or "cpu: 2 threads".
        adapter: String,
        platform: Platform,
    },
    /// Ready for one more lease; the coordinator pushes a `lease` as soon as one is available.
    Ready,
    /// The result of a lease. Binary payload: the gradient, `param_count` f32 values in the spec's layout.
    /// `commit`: optional lower-case hex SHA-256 of the payload bytes; when present the coordinator rejects a result
    /// whose payload does not match it (docs/PROTOCOL.md says what this does and does not protect).
    Result {
        lease: LeaseId,
        loss: f32,
        correct: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
    },
    /// The worker could not compute a lease (e.g. its GPU device was lost); the lease is released, no strike.
    Failed { lease: LeaseId, reason: String },
    /// v2: the result of a `local_lease`. Binary payload: Δ = θ_end − θ_v in the lease's `quant` encoding
    /// ([`encode_delta`]). `losses` and `correct` hold one entry per inner step, in order. `commit` as in `result`.
    LocalResult {
        lease: LeaseId,
        losses: Vec<f32>,
        correct: Vec<u32>,
        quant: Quant,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
    },
    /// v2: asks for the dataset a `local_lease` names (once per dataset; the worker keeps it). `accept` lists the
    /// payload encodings the worker decodes ([`DatasetEncoding`] names, unknown ones ignored); left out, only
    /// `raw` (what v2 workers from before the field get).
    DatasetRequest {
        job: JobId,
        sha256: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        accept: Vec<String>,
    },
}

/// Why a lease's result was or was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Agreed with an independent replica and reached the model; credits were granted.
    Accepted,
    /// Lost verification (disagreed with the majority) or was invalid (NaN/Inf, wrong length): a strike.
    Rejected,
    /// Arrived after the lease expired or after its micro-batch was settled; ignored, no strike.
    Late,
}

/// Stable machine-readable error codes sent before the coordinator closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame could not be decoded or broke the framing rules.
    BadFrame,
    /// A message arrived that is not valid at this point (e.g. `result` before `hello`).
    OutOfProtocol,
    /// The worker speaks another protocol version.
    ProtocolVersion,
    /// The worker was refused further work after repeated losing results.
    Refused,
    /// A limit (frame size, message rate, connections) was exceeded.
    Limit,
    /// The coordinator is shutting down.
    ShuttingDown,
}

/// Coordinator → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CoordinatorMsg {
    /// Answer to `hello`: the worker's identity and a token to present next time.
    Welcome {
        protocol: u32,
        worker: WorkerId,
        token: String,
        credits: f64,
    },
    /// A model version's parameters. Binary payload: `spec.param_count()` f32 values. Sent once per version per
    /// connection, before the first lease that needs it.
    Model {
        job: JobId,
        version: u64,
        spec: ModelSpec,
    },
    /// One micro-batch to compute against model `version`. Binary payload: `rows × spec.input` f32 features
    /// (row-major), then `rows` u32 labels.
    Lease {
        lease: LeaseId,
        job: JobId,
        version: u64,
        step: u64,
        micro_batch: u32,
        rows: u32,
        deadline_ms: u64,
    },
    /// No work right now; a `lease` will follow when there is some. Informational.
    Waiting { reason: String },
    /// v2: the parameters of `version` as a delta from `from`, which the worker holds: θ_version = θ_from +
    /// decode(payload), added in f32 value by value so every worker holds the same bits as the coordinator.
    /// Binary payload: `spec.param_count()` values in the `quant` encoding ([`encode_delta`]).
    ModelDelta {
        job: JobId,
        from: u64,
        version: u64,
        quant: Quant,
    },
    /// v2: H local steps from model `version` over this lease's rows (`core::local`): the worker derives the row
    /// order from `plan.seed`, runs `plan.h` steps of `plan.optimizer` (fresh state) with `plan.inner_batch` rows
    /// each, and answers `local_result` with Δ in the `quant` encoding. Binary payload: with `dataset` (the SHA-256
    /// of the job's training set, fetched once with `dataset_request`), `rows` u32 row indices into it; without,
    /// as in `lease`: `rows × spec.input` f32 features, then `rows` u32 labels. `round` and `shard` name the outer
    /// round and the lease's share of it (the v1 `step` and `micro_batch`).
    LocalLease {
        lease: LeaseId,
        job: JobId,
        version: u64,
        round: u64,
        shard: u32,
        rows: u32,
        plan: LeasePlan,
        quant: Quant,
        deadline_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dataset: Option<String>,
    },
    /// v2: a job's training set, the answer to `dataset_request`. Binary payload: the dataset in `encoding` (one
    /// the request listed in `accept`; `raw`, the SDS1 bytes of `core::data::encode_raw`, when left out). `sha256`
    /// (lower-case hex) is the SHA-256 of the decoded SDS1 bytes, whatever the encoding; the worker checks it.
    Dataset {
        job: JobId,
        sha256: String,
        #[serde(default, skip_serializing_if = "dataset::is_raw")]
        encoding: DatasetEncoding,
    },
    /// The fate of a submitted result, once known. `credits` is the worker's new total.
    Verdict {
        lease: LeaseId,
        outcome: Outcome,
        credits: f64,
    },
    /// A fatal error; the coordinator closes the connection after sending it.
    Error { code: ErrorCode, message: String },
    /// This coordinator node leads no work; the node at `url` (a `ws://` or `wss://` WebSocket URL) does. The
    /// worker closes this connection and connects there, keeping its token (nothing it was told is lost).
    Redirect { url: String },
}

/// A frame as it travels on a WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum WireFrame {
    Text(String),
    Binary(Vec<u8>),
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("binary frame shorter than its 4-byte header length")]
    Truncated,
    #[error("header length {0} is over the limit of {MAX_HEADER_BYTES} or past the frame's end")]
    HeaderLength(usize),
    #[error("header length {0} is not a multiple of 4")]
    Misaligned(usize),
    #[error("invalid message: {0}")]
    Json(String),
    #[error("`{0}` carries no payload but one was sent")]
    UnexpectedPayload(&'static str),
    #[error("`{0}` needs a binary payload")]
    MissingPayload(&'static str),
    #[error("payload of {0} bytes is not a whole number of 4-byte values")]
    PayloadAlignment(usize),
}

/// Encodes a message and its payload: a text frame when the payload is empty, a binary frame otherwise.
pub fn encode<M: Serialize>(msg: &M, payload: &[u8]) -> WireFrame {
    // Serialising our own enums cannot fail (string keys, finite or null floats).
    let json = serde_json::to_string(msg).unwrap_or_default();
    if payload.is_empty() {
        return WireFrame::Text(json);
    }
    let mut header = json.into_bytes();
    while !header.len().is_multiple_of(4) {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(4 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    WireFrame::Binary(out)
}

/// Splits a binary frame into its parsed header and payload; a text frame has an empty payload.
fn split<M: DeserializeOwned>(
    text: Option<&str>,
    binary: Option<&[u8]>,
) -> Result<(M, std::ops::Range<usize>), ProtocolError> {
    if let Some(t) = text {
        if t.len() > MAX_HEADER_BYTES {
            return Err(ProtocolError::HeaderLength(t.len()));
        }
        let msg = serde_json::from_str(t).map_err(|e| ProtocolError::Json(e.to_string()))?;
        return Ok((msg, 0..0));
    }
    let b = binary.unwrap_or_default();
    let len_bytes: [u8; 4] = b
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or(ProtocolError::Truncated)?;
    let h = u32::from_le_bytes(len_bytes) as usize;
    if h > MAX_HEADER_BYTES || 4 + h > b.len() {
        return Err(ProtocolError::HeaderLength(h));
    }
    if !h.is_multiple_of(4) {
        return Err(ProtocolError::Misaligned(h));
    }
    let msg =
        serde_json::from_slice(&b[4..4 + h]).map_err(|e| ProtocolError::Json(e.to_string()))?;
    let payload = 4 + h..b.len();
    if payload.len() % 4 != 0 {
        return Err(ProtocolError::PayloadAlignment(payload.len()));
    }
    Ok((msg, payload))
}

/// Whether a message must, or must not, carry a binary payload.
fn check_payload(name: &'static str, needs: bool, len: usize) -> Result<(), ProtocolError> {
    match (needs, len) {
        (true, 0) => Err(ProtocolError::MissingPayload(name)),
        (false, n) if n > 0 => Err(ProtocolError::UnexpectedPayload(name)),
        _ => Ok(()),
    }
}

impl WorkerMsg {
    fn name_and_payload(&self) -> (&'static str, bool) {
        match self {
            Self::Hello { .. } => ("hello", false),
            Self::Ready => ("ready", false),
            Self::Result { .. } => ("result", true),
            Self::Failed { .. } => ("failed", false),
            Self::LocalResult { .. } => ("local_result", true),
            Self::DatasetRequest { .. } => ("dataset_request", false),
        }
    }

    /// Decodes a text frame.
    pub fn decode_text(text: &str) -> Result<Self, ProtocolError> {
        let (msg, _): (Self, _) = split(Some(text), None)?;
        let (name, needs) = msg.name_and_payload();
        check_payload(name, needs, 0)?;
        Ok(msg)
    }

    /// Decodes a binary frame, returning the message and its payload bytes.
    pub fn decode_binary(bytes: &[u8]) -> Result<(Self, &[u8]), ProtocolError> {
        let (msg, range): (Self, _) = split(None, Some(bytes))?;
        let (name, needs) = msg.name_and_payload();
        check_payload(name, needs, range.len())?;
        Ok((msg, &bytes[range]))
    }
}

impl CoordinatorMsg {
    fn name_and_payload(&self) -> (&'static str, bool) {
        match self {
            Self::Welcome { .. } => ("welcome", false),
            Self::Model { .. } => ("model", true),
            Self::Lease { .. } => ("lease", true),
            Self::Waiting { .. } => ("waiting", false),
            Self::ModelDelta { .. } => ("model_delta", true),
            Self::LocalLease { .. } => ("local_lease", true),
            Self::Dataset { .. } => ("dataset", true),
            Self::Verdict { .. } => ("verdict", false),
            Self::Error { .. } => ("error", false),
            Self::Redirect { .. } => ("redirect", false),
        }
    }

    pub fn decode_text(text: &str) -> Result<Self, ProtocolError> {
        let (msg, _): (Self, _) = split(Some(text), None)?;
        let (name, needs) = msg.name_and_payload();
        check_payload(name, needs, 0)?;
        Ok(msg)
    }

    pub fn decode_binary(bytes: &[u8]) -> Result<(Self, &[u8]), ProtocolError> {
        let (msg, range): (Self, _) = split(None, Some(bytes))?;
        let (name, needs) = msg.name_and_payload();
        check_payload(name, needs, range.len())?;
        Ok((msg, &bytes[range]))
    }
}
