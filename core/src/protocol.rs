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

/// Little-endian bytes of an f32 slice.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    values
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// Little-endian bytes of a u32 slice.
pub fn u32_bytes(values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    values
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// f32 values of a little-endian payload (a trailing partial value is ignored; decoders reject those first).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// u32 values of a little-endian payload.
pub fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Builds a lease payload: features then labels.
pub fn lease_payload(x: &[f32], labels: &[u32]) -> Vec<u8> {
    let mut out = f32_bytes(x);
    out.extend_from_slice(&u32_bytes(labels));
    out
}

/// Splits a lease payload for a spec of input width `input` into features and labels.
pub fn split_lease_payload(
    payload: &[u8],
    rows: usize,
    input: usize,
) -> Result<(Vec<f32>, Vec<u32>), ProtocolError> {
    let want = rows * (input + 1) * 4;
    if payload.len() != want {
        return Err(ProtocolError::Json(format!(
            "lease payload is {} bytes, expected {want}",
            payload.len()
        )));
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

        let result = WorkerMsg::Result {
            lease: LeaseId(7),
            loss: 0.5,
            correct: 3,
            commit: None,
        };
        let grad = f32_bytes(&[1.0, -2.0, 3.5]);
        let WireFrame::Binary(bytes) = encode(&result, &grad) else {
            panic!("tensor messages are binary")
        };
        let h = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(h % 4, 0);
        let (msg, payload) = WorkerMsg::decode_binary(&bytes).unwrap();
        assert_eq!(msg, result);
        assert_eq!(f32s(payload), vec![1.0, -2.0, 3.5]);

        // `commit` is optional both ways: absent from the JSON when `None`, and a result without it still decodes.
        let header = std::str::from_utf8(&bytes[4..4 + h]).unwrap();
        assert!(!header.contains("commit"), "{header}");
        let committed = WorkerMsg::Result {
            lease: LeaseId(7),
            loss: 0.5,
            correct: 3,
            commit: Some("00ff".into()),
        };
        let WireFrame::Binary(bytes) = encode(&committed, &grad) else {
            panic!("tensor messages are binary")
        };
        assert_eq!(WorkerMsg::decode_binary(&bytes).unwrap().0, committed);
    }

    #[test]
    fn framing_violations_are_errors_not_panics() {
        assert_eq!(
            WorkerMsg::decode_binary(&[1, 2]),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            WorkerMsg::decode_binary(&[255, 255, 255, 255, 0]),
            Err(ProtocolError::HeaderLength(u32::MAX as usize))
        );
        assert!(matches!(
            WorkerMsg::decode_text("{\"type\":\"nope\"}"),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(
            WorkerMsg::decode_text("not json"),
            Err(ProtocolError::Json(_))
        ));
        assert_eq!(
            WorkerMsg::decode_text(r#"{"type":"result","lease":1,"loss":0.1,"correct":1}"#),
            Err(ProtocolError::MissingPayload("result"))
        );
        let WireFrame::Binary(b) = encode(&WorkerMsg::Ready, &[0, 0, 0, 0]) else {
            panic!()
        };
        assert_eq!(
            WorkerMsg::decode_binary(&b),
            Err(ProtocolError::UnexpectedPayload("ready"))
        );
        let WireFrame::Binary(mut b) = encode(
            &WorkerMsg::Result {
                lease: LeaseId(1),
                loss: 0.0,
                correct: 0,
                commit: None,
            },
            &[0; 8],
        ) else {
            panic!()
        };
        b.push(1);
        assert_eq!(
            WorkerMsg::decode_binary(&b),
            Err(ProtocolError::PayloadAlignment(9))
        );
    }

    #[test]
    fn every_prefix_and_byte_flip_of_a_frame_decodes_without_panic() {
        let WireFrame::Binary(b) = encode(
            &WorkerMsg::Result {
                lease: LeaseId(3),
                loss: 1.0,
                correct: 2,
                commit: Some("ab".repeat(32)),
            },
            &f32_bytes(&[1.0; 16]),
        ) else {
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
    /// Random structured messages, then random mutations of their frames: encoding and decoding never panic, and
    /// an unmutated frame decodes to exactly what was encoded (or to the documented framing error).
    mod property {
        use super::super::*;
        use crate::rng::SplitMix64;
        use crate::spec::{Activation, LayerSpec};

        const ITERATIONS: usize = 50_000;

        fn num(r: &mut SplitMix64) -> u64 {
            match r.below(6) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << 53,
                3 => r.below(10),
                _ => r.next_u64() >> r.below(64),
            }
        }

        fn num32(r: &mut SplitMix64) -> u32 {
            (num(r) & 0xffff_ffff) as u32
        }

        fn text(r: &mut SplitMix64) -> String {
            const POOL: &[&str] = &[
                "a", "Z", "0", " ", "\"", "\\", "\n", "\t", "\u{0}", "\u{1f}", "é", "ß", "漢",
                "😀", "\u{202e}", "\u{feff}", "}", "{", "\"type\"", "/", "\u{7f}",
            ];
            // Mostly short; now and then longer than a header may be, to cross the 16 KiB limit.
            let len = if r.below(200) == 0 {
                2_000 + r.below(6_000)
            } else {
                r.below(24)
            };
            (0..len)
                .map(|_| POOL[r.below(POOL.len() as u64) as usize])
                .collect()
        }

        fn float32(r: &mut SplitMix64) -> f32 {
            match r.below(7) {
                0 => 0.0,
                1 => -0.0,
                2 => f32::MAX,
                3 => f32::MIN_POSITIVE / 8.0,
                4 => f32::from_bits(r.next_u64() as u32 & 0x7f7f_ffff),
                _ => (r.normal() * 10f64.powi(r.below(20) as i32 - 10)) as f32,
            }
        }

        fn float64(r: &mut SplitMix64) -> f64 {
            match r.below(5) {
                0 => 0.0,
                1 => f64::MAX,
                2 => 1e-300,
                _ => r.normal().abs() * 10f64.powi(r.below(40) as i32 - 10),
            }
        }

        fn spec(r: &mut SplitMix64) -> ModelSpec {
            let layers = (0..r.below(4))
                .map(|_| LayerSpec {
                    units: num32(r),
                    activation: if r.below(2) == 0 {
                        Activation::Relu
                    } else {
                        Activation::None
                    },
                })
                .collect();
            ModelSpec {
                input: num32(r),
                layers,
            }
        }

        fn worker_msg(r: &mut SplitMix64) -> WorkerMsg {
            let opt = |r: &mut SplitMix64| if r.below(3) == 0 { None } else { Some(text(r)) };
            match r.below(4) {
                0 => WorkerMsg::Hello {
                    protocol: num32(r),
                    token: opt(r),
                    name: opt(r),
                    backend: if r.below(2) == 0 {
                        Backend::Gpu
                    } else {
                        Backend::Cpu
                    },
                    adapter: text(r),
                    platform: if r.below(2) == 0 {
                        Platform::Native
                    } else {
                        Platform::Browser
                    },
                },
                1 => WorkerMsg::Ready,
                2 => WorkerMsg::Result {
                    lease: LeaseId(num(r)),
                    loss: float32(r),
                    correct: num32(r),
                    commit: opt(r),
                },
                _ => WorkerMsg::Failed {
                    lease: LeaseId(num(r)),
                    reason: text(r),
                },
            }
        }

        fn coordinator_msg(r: &mut SplitMix64) -> CoordinatorMsg {
            const OUTCOMES: [Outcome; 3] = [Outcome::Accepted, Outcome::Rejected, Outcome::Late];
            const CODES: [ErrorCode; 6] = [
                ErrorCode::BadFrame,
                ErrorCode::OutOfProtocol,
                ErrorCode::ProtocolVersion,
                ErrorCode::Refused,
                ErrorCode::Limit,
                ErrorCode::ShuttingDown,
            ];
            match r.below(7) {
                0 => CoordinatorMsg::Welcome {
                    protocol: num32(r),
                    worker: WorkerId(num(r)),
                    token: text(r),
                    credits: float64(r),
                },
                1 => CoordinatorMsg::Model {
                    job: JobId(num(r)),
                    version: num(r),
                    spec: spec(r),
                },
                2 => CoordinatorMsg::Lease {
                    lease: LeaseId(num(r)),
                    job: JobId(num(r)),
                    version: num(r),
                    step: num(r),
                    micro_batch: num32(r),
                    rows: num32(r),
                    deadline_ms: num(r),
                },
                3 => CoordinatorMsg::Waiting { reason: text(r) },
                4 => CoordinatorMsg::Verdict {
                    lease: LeaseId(num(r)),
                    outcome: OUTCOMES[r.below(3) as usize],
                    credits: float64(r),
                },
                5 => CoordinatorMsg::Redirect { url: text(r) },
                _ => CoordinatorMsg::Error {
                    code: CODES[r.below(6) as usize],
                    message: text(r),
                },
            }
        }

        /// serde_json parses floats best-effort (it lacks `float_roundtrip`), so decoded floats may differ from the
        /// encoded ones in the last bit; everything else must match exactly.
        fn close(a: f64, b: f64) -> bool {
            a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
        }

        fn same_worker(a: &WorkerMsg, b: &WorkerMsg) -> bool {
            match (a, b) {
                (
                    WorkerMsg::Result {
                        lease,
                        loss,
                        correct,
                        commit,
                    },
                    WorkerMsg::Result {
                        lease: l,
                        loss: x,
                        correct: c,
                        commit: k,
                    },
                ) => lease == l && correct == c && commit == k && close(*loss as f64, *x as f64),
                _ => a == b,
            }
        }

        fn same_coordinator(a: &CoordinatorMsg, b: &CoordinatorMsg) -> bool {
            match (a, b) {
                (
                    CoordinatorMsg::Welcome {
                        protocol,
                        worker,
                        token,
                        credits,
                    },
                    CoordinatorMsg::Welcome {
                        protocol: p,
                        worker: w,
                        token: t,
                        credits: c,
                    },
                ) => protocol == p && worker == w && token == t && close(*credits, *c),
                (
                    CoordinatorMsg::Verdict {
                        lease,
                        outcome,
                        credits,
                    },
                    CoordinatorMsg::Verdict {
                        lease: l,
                        outcome: o,
                        credits: c,
                    },
                ) => lease == l && outcome == o && close(*credits, *c),
                _ => a == b,
            }
        }

        fn payload(r: &mut SplitMix64, needs: bool) -> Vec<u8> {
            // Mostly what the message wants; sometimes none, an unwanted one, or a length that is not a multiple of 4.
            let len = match r.below(8) {
                0 => 0,
                1 => 1 + r.below(63),
                _ if needs => 4 * (1 + r.below(32)),
                _ => 0,
            };
            (0..len).map(|_| r.next_u64() as u8).collect()
        }

        /// What decoding an unmutated frame must give.
        fn expected(
            needs: bool,
            header: usize,
            payload: usize,
            name: &'static str,
        ) -> Result<(), ProtocolError> {
            if header > MAX_HEADER_BYTES {
                return Err(ProtocolError::HeaderLength(header));
            }
            match (needs, payload) {
                (_, n) if n % 4 != 0 => Err(ProtocolError::PayloadAlignment(n)),
                (true, 0) => Err(ProtocolError::MissingPayload(name)),
                (false, n) if n > 0 => Err(ProtocolError::UnexpectedPayload(name)),
                _ => Ok(()),
            }
        }

        fn header_len(frame: &WireFrame) -> usize {
            match frame {
                WireFrame::Text(t) => t.len(),
                WireFrame::Binary(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            }
        }

        /// Flips, overwrites, truncates, inserts or duplicates bytes.
        fn mutate(r: &mut SplitMix64, bytes: &mut Vec<u8>) {
            for _ in 0..1 + r.below(3) {
                let n = bytes.len() as u64;
                match r.below(5) {
                    0 if n > 0 => {
                        let i = r.below(n) as usize;
                        bytes[i] ^= 1 << r.below(8);
                    }
                    1 if n > 0 => {
                        let i = r.below(n) as usize;
                        bytes[i] = r.next_u64() as u8;
                    }
                    2 => bytes.truncate(r.below(n + 1) as usize),
                    3 => {
                        let i = r.below(n + 1) as usize;
                        bytes.insert(
                            i,
                            [b'"', b'{', b'}', b',', b'\\', 0xff, 0, b'9'][r.below(8) as usize],
                        );
                    }
                    _ if n > 0 => {
                        let (a, b) = (r.below(n) as usize, r.below(n) as usize);
                        let chunk = bytes[a.min(b)..a.max(b)].to_vec();
                        bytes.splice(a..a, chunk);
                    }
                    _ => {}
                }
            }
        }

        /// Decodes bytes every way a peer might receive them, in both directions; only panics matter here.
        fn decode_all(bytes: &[u8]) {
            let _ = WorkerMsg::decode_binary(bytes);
            let _ = CoordinatorMsg::decode_binary(bytes);
            let text = String::from_utf8_lossy(bytes);
            let _ = WorkerMsg::decode_text(&text);
            let _ = CoordinatorMsg::decode_text(&text);
        }

        fn frame_bytes(f: &WireFrame) -> Vec<u8> {
            match f {
                WireFrame::Text(t) => t.as_bytes().to_vec(),
                WireFrame::Binary(b) => b.clone(),
            }
        }

        #[test]
        fn random_structured_messages_round_trip_and_their_mutations_never_panic() {
            let mut r = SplitMix64::new(0x5eed_57a7);
            let (mut round_trips, mut framing_errors) = (0, 0);
            for i in 0..ITERATIONS {
                let frame = if i % 2 == 0 {
                    let msg = worker_msg(&mut r);
                    let (name, needs) = msg.name_and_payload();
                    let payload = payload(&mut r, needs);
                    let frame = encode(&msg, &payload);
                    let want = expected(needs, header_len(&frame), payload.len(), name);
                    let got = match &frame {
                        WireFrame::Text(t) => WorkerMsg::decode_text(t).map(|m| (m, vec![])),
                        WireFrame::Binary(b) => {
                            WorkerMsg::decode_binary(b).map(|(m, p)| (m, p.to_vec()))
                        }
                    };
                    match (got, want) {
                        (Ok((m, p)), Ok(())) => {
                            assert!(same_worker(&m, &msg), "{msg:?} came back as {m:?}");
                            assert_eq!(p, payload);
                            round_trips += 1;
                        }
                        (Err(e), Err(w)) => {
                            assert_eq!(e, w, "{msg:?} with {} payload bytes", payload.len());
                            framing_errors += 1;
                        }
                        (got, want) => panic!(
                            "{msg:?} with {} payload bytes: got {got:?}, expected {want:?}",
                            payload.len()
                        ),
                    }
                    frame
                } else {
                    let msg = coordinator_msg(&mut r);
                    let (name, needs) = msg.name_and_payload();
                    let payload = payload(&mut r, needs);
                    let frame = encode(&msg, &payload);
                    let want = expected(needs, header_len(&frame), payload.len(), name);
                    let got = match &frame {
                        WireFrame::Text(t) => CoordinatorMsg::decode_text(t).map(|m| (m, vec![])),
                        WireFrame::Binary(b) => {
                            CoordinatorMsg::decode_binary(b).map(|(m, p)| (m, p.to_vec()))
                        }
                    };
                    match (got, want) {
                        (Ok((m, p)), Ok(())) => {
                            assert!(same_coordinator(&m, &msg), "{msg:?} came back as {m:?}");
                            assert_eq!(p, payload);
                            round_trips += 1;
                        }
                        (Err(e), Err(w)) => {
                            assert_eq!(e, w, "{msg:?} with {} payload bytes", payload.len());
                            framing_errors += 1;
                        }
                        (got, want) => panic!(
                            "{msg:?} with {} payload bytes: got {got:?}, expected {want:?}",
                            payload.len()
                        ),
                    }
                    frame
                };
                let mut bytes = frame_bytes(&frame);
                mutate(&mut r, &mut bytes);
                decode_all(&bytes);
            }
            println!(
                "{round_trips} round trips, {framing_errors} expected framing errors of {ITERATIONS}"
            );
            assert!(
                round_trips > ITERATIONS / 2 && framing_errors > ITERATIONS / 20,
                "{round_trips} round trips, {framing_errors} framing errors"
            );
        }
    }
}
