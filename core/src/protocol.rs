//! The worker ⇄ coordinator wire protocol over WebSocket (specified in docs/PROTOCOL.md).
//!
//! One enum per direction, serde-tagged by `"type"`. A message without a tensor travels as a text frame holding its
//! JSON; a message with a tensor travels as one binary frame: `u32 LE header length H`, `H` bytes of the JSON
//! header (space-padded so `H % 4 == 0`, which keeps the payload 4-byte aligned for a zero-copy `Float32Array`), then
//! the payload of little-endian f32/u32 values. Tensors never travel as JSON arrays.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::spec::{MAX_PARAMS, ModelSpec};

/// Bumped on any incompatible change; sent in both hellos.
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
    Result { lease: LeaseId, loss: f32, correct: u32 },
    /// The worker could not compute a lease (e.g. its GPU device was lost); the lease is released, no strike.
    Failed { lease: LeaseId, reason: String },
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
    Welcome { protocol: u32, worker: WorkerId, token: String, credits: f64 },
    /// A model version's parameters. Binary payload: `spec.param_count()` f32 values. Sent once per version per
    /// connection, before the first lease that needs it.
    Model { job: JobId, version: u64, spec: ModelSpec },
    /// One micro-batch to compute against model `version`. Binary payload: `rows × spec.input` f32 features
    /// (row-major), then `rows` u32 labels.
    Lease { lease: LeaseId, job: JobId, version: u64, step: u64, micro_batch: u32, rows: u32, deadline_ms: u64 },
    /// No work right now; a `lease` will follow when there is some. Informational.
    Waiting { reason: String },
    /// The fate of a submitted result, once known. `credits` is the worker's new total.
    Verdict { lease: LeaseId, outcome: Outcome, credits: f64 },
    /// A fatal error; the coordinator closes the connection after sending it.
    Error { code: ErrorCode, message: String },
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
fn split<M: DeserializeOwned>(text: Option<&str>, binary: Option<&[u8]>) -> Result<(M, std::ops::Range<usize>), ProtocolError> {
    if let Some(t) = text {
        if t.len() > MAX_HEADER_BYTES {
            return Err(ProtocolError::HeaderLength(t.len()));
        }
        let msg = serde_json::from_str(t).map_err(|e| ProtocolError::Json(e.to_string()))?;
        return Ok((msg, 0..0));
    }
    let b = binary.unwrap_or_default();
    let len_bytes: [u8; 4] = b.get(..4).and_then(|s| s.try_into().ok()).ok_or(ProtocolError::Truncated)?;
    let h = u32::from_le_bytes(len_bytes) as usize;
    if h > MAX_HEADER_BYTES || 4 + h > b.len() {
        return Err(ProtocolError::HeaderLength(h));
    }
    if !h.is_multiple_of(4) {
        return Err(ProtocolError::Misaligned(h));
    }
    let msg = serde_json::from_slice(&b[4..4 + h]).map_err(|e| ProtocolError::Json(e.to_string()))?;
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
            Self::Verdict { .. } => ("verdict", false),
            Self::Error { .. } => ("error", false),
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

/// Little-endian bytes of an f32 slice.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// Little-endian bytes of a u32 slice.
pub fn u32_bytes(values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// f32 values of a little-endian payload (a trailing partial value is ignored; decoders reject those first).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// u32 values of a little-endian payload.
pub fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Builds a lease payload: features then labels.
pub fn lease_payload(x: &[f32], labels: &[u32]) -> Vec<u8> {
    let mut out = f32_bytes(x);
    out.extend_from_slice(&u32_bytes(labels));
    out
}

/// Splits a lease payload for a spec of input width `input` into features and labels.
pub fn split_lease_payload(payload: &[u8], rows: usize, input: usize) -> Result<(Vec<f32>, Vec<u32>), ProtocolError> {
    let want = rows * (input + 1) * 4;
    if payload.len() != want {
        return Err(ProtocolError::Json(format!("lease payload is {} bytes, expected {want}", payload.len())));
    }
    let (x, y) = payload.split_at(rows * input * 4);
    Ok((f32s(x), u32s(y)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_worker(frame: &WireFrame) -> Result<(WorkerMsg, Vec<u8>), ProtocolError> {
        match frame {
            WireFrame::Text(t) => WorkerMsg::decode_text(t).map(|m| (m, vec![])),
            WireFrame::Binary(b) => WorkerMsg::decode_binary(b).map(|(m, p)| (m, p.to_vec())),
        }
    }

    #[test]
    fn messages_round_trip_and_payloads_are_aligned() {
        let hello = WorkerMsg::Hello {
            protocol: PROTOCOL_VERSION,
            token: None,
            name: Some("t".into()),
            backend: Backend::Gpu,
            adapter: "llvmpipe".into(),
            platform: Platform::Native,
        };
        let f = encode(&hello, &[]);
        assert!(matches!(f, WireFrame::Text(_)));
        assert_eq!(decode_worker(&f).unwrap().0, hello);

        let result = WorkerMsg::Result { lease: LeaseId(7), loss: 0.5, correct: 3 };
        let grad = f32_bytes(&[1.0, -2.0, 3.5]);
        let WireFrame::Binary(bytes) = encode(&result, &grad) else { panic!("tensor messages are binary") };
        let h = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(h % 4, 0);
        let (msg, payload) = WorkerMsg::decode_binary(&bytes).unwrap();
        assert_eq!(msg, result);
        assert_eq!(f32s(payload), vec![1.0, -2.0, 3.5]);
    }

    #[test]
    fn framing_violations_are_errors_not_panics() {
        assert_eq!(WorkerMsg::decode_binary(&[1, 2]), Err(ProtocolError::Truncated));
        assert_eq!(WorkerMsg::decode_binary(&[255, 255, 255, 255, 0]), Err(ProtocolError::HeaderLength(u32::MAX as usize)));
        assert!(matches!(WorkerMsg::decode_text("{\"type\":\"nope\"}"), Err(ProtocolError::Json(_))));
        assert!(matches!(WorkerMsg::decode_text("not json"), Err(ProtocolError::Json(_))));
        assert_eq!(
            WorkerMsg::decode_text(r#"{"type":"result","lease":1,"loss":0.1,"correct":1}"#),
            Err(ProtocolError::MissingPayload("result"))
        );
        let WireFrame::Binary(b) = encode(&WorkerMsg::Ready, &[0, 0, 0, 0]) else { panic!() };
        assert_eq!(WorkerMsg::decode_binary(&b), Err(ProtocolError::UnexpectedPayload("ready")));
        let WireFrame::Binary(mut b) = encode(&WorkerMsg::Result { lease: LeaseId(1), loss: 0.0, correct: 0 }, &[0; 8]) else {
            panic!()
        };
        b.push(1);
        assert_eq!(WorkerMsg::decode_binary(&b), Err(ProtocolError::PayloadAlignment(9)));
    }

    #[test]
    fn every_prefix_and_byte_flip_of_a_frame_decodes_without_panic() {
        let WireFrame::Binary(b) = encode(&WorkerMsg::Result { lease: LeaseId(3), loss: 1.0, correct: 2 }, &f32_bytes(&[1.0; 16]))
        else {
            panic!()
        };
        for cut in 0..b.len() {
            let _ = WorkerMsg::decode_binary(&b[..cut]);
        }
        let mut rng = crate::rng::SplitMix64::new(1);
        for _ in 0..20_000 {
            let mut m = b.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(m.len() as u64) as usize;
                m[i] = rng.next_u64() as u8;
            }
            let _ = WorkerMsg::decode_binary(&m);
            if let Ok(s) = std::str::from_utf8(&m[4..]) {
                let _ = WorkerMsg::decode_text(s);
            }
        }
    }
}
