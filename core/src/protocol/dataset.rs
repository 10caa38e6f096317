//! How a v2 `dataset` frame's payload is encoded: the raw SDS1 bytes, or a compact lossless form (a palette of at
//! most 256 distinct feature values and one index byte per value, then DEFLATE), chosen per request from the
//! encodings the worker lists in `dataset_request.accept`.
//!
//! The dataset's identity (`sha256` in `local_lease` and `dataset`, and the key of every worker-side cache) is the
//! SHA-256 of its **decoded** SDS1 bytes (`core::data::encode_raw`), whatever encoding carried it: the same dataset
//! has one name, and a worker checks what it decoded, not what it received.

use serde::{Deserialize, Serialize};

use crate::data::{Dataset, encode_raw, parse_upload};

/// Largest decoded dataset a worker inflates (a bound on a hostile or broken frame, far above any job's split).
pub const MAX_DATASET_BYTES: usize = 1 << 30;
/// DEFLATE level the coordinator uses. Measured on the demo's MNIST split (palette body, 6.3 MB): level 1 gives
/// 1.51 MB in ~40 ms, level 6 1.30 MB in ~370 ms; the coordinator builds the frame on every job load, so level 1.
pub const DEFLATE_LEVEL: u8 = 1;
/// Magic of the palette body (before DEFLATE).
const PALETTE_MAGIC: &[u8; 4] = b"SDP1";

/// How a `dataset` payload is encoded. The wire names are those of `dataset_request.accept` and `dataset.encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetEncoding {
    /// The SDS1 bytes as they are (what a worker that lists no `accept` gets).
    #[default]
    Raw,
    /// DEFLATE (RFC 1951, no zlib or gzip wrapper) of the SDS1 bytes, then 0–3 zero bytes to a multiple of 4.
    Deflate,
    /// DEFLATE of the palette body: magic `SDP1`, u32 LE `N`, u32 LE `D`, u32 LE `P` (1 ≤ P ≤ 256), `P` f32 LE
    /// palette values (in any order; the coordinator's: order of first appearance), `N·D` u8 indices into the
    /// palette (feature i = palette[index i]), then `N` u32 LE labels. Only for datasets with at most 256 distinct
    /// feature values (bit patterns); lossless. Padded as `Deflate`.
    PaletteDeflate,
    /// A language model's token stream (issue 13): DEFLATE of its `STK1` bytes (docs/API.md, "Token datasets"),
    /// padded as `Deflate`; named by the SHA-256 of those `STK1` bytes (see [`encode_token_dataset`]).
    Stk1Deflate,
}

impl DatasetEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Deflate => "deflate",
            Self::PaletteDeflate => "palette_deflate",
            Self::Stk1Deflate => "stk1_deflate",
        }
    }

    /// The encoding named `name` (an unknown name is `None`: a newer worker may list encodings this side lacks).
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Raw,
            Self::Deflate,
            Self::PaletteDeflate,
            Self::Stk1Deflate,
        ]
        .into_iter()
        .find(|e| e.as_str() == name)
    }

    /// Every encoding this implementation decodes, most compact first (what a worker lists in `accept`).
    pub fn all() -> Vec<String> {
        [
            Self::PaletteDeflate,
            Self::Deflate,
            Self::Raw,
            Self::Stk1Deflate,
        ]
        .iter()
        .map(|e| e.as_str().to_string())
        .collect()
    }

    fn is_raw(&self) -> bool {
        *self == Self::Raw
    }
}

/// Whether `dataset.encoding` may be left out (it is `raw` then, as v2 workers from before the field expect).
pub(super) fn is_raw(e: &DatasetEncoding) -> bool {
    e.is_raw()
}

/// Why a dataset payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DatasetCodecError {
    #[error("dataset payload does not inflate: {0}")]
    Inflate(String),
    #[error("malformed palette dataset: {0}")]
    Palette(String),
    #[error("not a dataset: {0}")]
    Data(String),
    #[error("dataset has SHA-256 {got}, expected {want}")]
    Digest { got: String, want: String },
}

/// The palette of `features` (distinct bit patterns in order of first appearance) and every feature's index into
/// it, if there are at most 256 distinct values; one pass, a 512-slot open-addressing table.
fn palette(features: &[f32]) -> Option<(Vec<u32>, Vec<u8>)> {
    const SLOTS: usize = 512;
    let mut table = [(0u32, u16::MAX); SLOTS];
    let mut pal: Vec<u32> = Vec::with_capacity(256);
    let mut idx = Vec::with_capacity(features.len());
    let mut last: Option<(u32, u8)> = None;
    for v in features {
        let bits = v.to_bits();
        if let Some((b, i)) = last
            && b == bits
        {
            idx.push(i);
            continue;
        }
        let mut slot = (bits.wrapping_mul(0x9E37_79B1) >> 23) as usize % SLOTS;
        let i = loop {
            match table[slot] {
                (b, i) if i != u16::MAX && b == bits => break i as u8,
                (_, u16::MAX) => {
                    if pal.len() == 256 {
                        return None;
                    }
                    table[slot] = (bits, pal.len() as u16);
                    pal.push(bits);
                    break (pal.len() - 1) as u8;
                }
                _ => slot = (slot + 1) % SLOTS,
            }
        };
        last = Some((bits, i));
        idx.push(i);
    }
    Some((pal, idx))
}

/// The most compact encoding of `ds` among `accepted` (names from `dataset_request.accept`; unknown ones are
/// skipped) and its payload; `raw` when none is listed. Lossless: decoding gives the same SDS1 bytes.
pub fn encode_dataset(ds: &Dataset, accepted: &[String]) -> (DatasetEncoding, Vec<u8>) {
    let ok = |e: DatasetEncoding| accepted.iter().any(|a| a == e.as_str());
    if ok(DatasetEncoding::PaletteDeflate)
        && let Some((p, idx)) = palette(&ds.features)
    {
        let mut body = Vec::with_capacity(16 + 4 * p.len() + idx.len() + 4 * ds.labels.len());
        body.extend_from_slice(PALETTE_MAGIC);
        for n in [ds.rows(), ds.dim, p.len()] {
            body.extend_from_slice(&(n as u32).to_le_bytes());
        }
        p.iter()
            .for_each(|b| body.extend_from_slice(&b.to_le_bytes()));
        body.extend_from_slice(&idx);
        ds.labels
            .iter()
            .for_each(|l| body.extend_from_slice(&l.to_le_bytes()));
        return (DatasetEncoding::PaletteDeflate, deflate(&body));
    }
    let raw = encode_raw(ds);
    if ok(DatasetEncoding::Deflate) {
        return (DatasetEncoding::Deflate, deflate(&raw));
    }
    (DatasetEncoding::Raw, raw)
}

/// The DEFLATE stream of `bytes`, then zero bytes to a multiple of 4 (every binary payload is whole 4-byte words;
/// the inflater stops at the stream's final block, so the padding is never read).
fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut out = miniz_oxide::deflate::compress_to_vec(bytes, DEFLATE_LEVEL);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

fn inflate(payload: &[u8]) -> Result<Vec<u8>, DatasetCodecError> {
    miniz_oxide::inflate::decompress_to_vec_with_limit(payload, MAX_DATASET_BYTES)
        .map_err(|e| DatasetCodecError::Inflate(format!("{:?}", e.status)))
}

fn u32_at(b: &[u8], at: usize) -> Result<usize, DatasetCodecError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| DatasetCodecError::Palette("truncated header".into()))
}

/// The SDS1 bytes of a palette body.
fn unpalette(body: &[u8]) -> Result<Vec<u8>, DatasetCodecError> {
    let bad = |m: String| DatasetCodecError::Palette(m);
    if !body.starts_with(PALETTE_MAGIC) {
        return Err(bad("missing SDP1 magic".into()));
    }
    let (n, d, p) = (u32_at(body, 4)?, u32_at(body, 8)?, u32_at(body, 12)?);
    if !(1..=256).contains(&p) {
        return Err(bad(format!("palette of {p} values (1 to 256 allowed)")));
    }
    let values = n
        .checked_mul(d)
        .ok_or_else(|| bad("N·D overflows".into()))?;
    let want = 16 + 4 * p + values + 4 * n;
    if body.len() != want {
        return Err(bad(format!(
            "body is {} bytes, expected {want}",
            body.len()
        )));
    }
    let pal: Vec<[u8; 4]> = body[16..16 + 4 * p]
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    let idx = &body[16 + 4 * p..16 + 4 * p + values];
    let mut raw = Vec::with_capacity(12 + 4 * (values + n));
    raw.extend_from_slice(b"SDS1");
    raw.extend_from_slice(&(n as u32).to_le_bytes());
    raw.extend_from_slice(&(d as u32).to_le_bytes());
    for &i in idx {
        let v = pal
            .get(i as usize)
            .ok_or_else(|| bad(format!("index {i} past the palette's {p} values")))?;
        raw.extend_from_slice(v);
    }
    raw.extend_from_slice(&body[16 + 4 * p + values..]);
    Ok(raw)
}

/// The SDS1 bytes a `dataset` payload in `encoding` carries (not yet checked against any digest).
pub fn decode_dataset_bytes(
    encoding: DatasetEncoding,
    payload: &[u8],
) -> Result<Vec<u8>, DatasetCodecError> {
    match encoding {
        DatasetEncoding::Raw => Ok(payload.to_vec()),
        DatasetEncoding::Deflate => inflate(payload),
        DatasetEncoding::PaletteDeflate => unpalette(&inflate(payload)?),
        DatasetEncoding::Stk1Deflate => Err(DatasetCodecError::Data(
            "stk1_deflate carries a token stream, not rows".into(),
        )),
    }
}

/// Decodes a `dataset` payload, checks the SHA-256 of its SDS1 bytes against `sha256` (lower-case hex; compared
/// case-insensitively) and parses it.
pub fn decode_dataset(
    encoding: DatasetEncoding,
    payload: &[u8],
    sha256: &str,
) -> Result<Dataset, DatasetCodecError> {
    let raw = decode_dataset_bytes(encoding, payload)?;
    let got = crate::digest::sha256_hex(&raw);
    if !got.eq_ignore_ascii_case(sha256) {
        return Err(DatasetCodecError::Digest {
            got,
            want: sha256.to_string(),
        });
    }
    parse_upload(&raw)
        .map(|u| u.train)
        .map_err(|e| DatasetCodecError::Data(e.to_string()))
}

/// The dataset's name: SHA-256 (lower-case hex) of its SDS1 bytes, hashed as they stream out (the 25 MB of the
/// demo's split are never built for it).
pub fn dataset_sha256(ds: &Dataset) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"SDS1");
    h.update((ds.rows() as u32).to_le_bytes());
    h.update((ds.dim as u32).to_le_bytes());
    let mut buf = Vec::with_capacity(64 * 1024);
    for chunk in ds.features.chunks(16 * 1024) {
        buf.clear();
        chunk
            .iter()
            .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        h.update(&buf);
    }
    for chunk in ds.labels.chunks(16 * 1024) {
        buf.clear();
        chunk
            .iter()
            .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
        h.update(&buf);
    }
    crate::digest::hex(&h.finalize())
}

/// The `dataset` frame of a language model's training stream: its `STK1` bytes (`core::tokens::encode_tokens`,
/// as the job stores them), the SHA-256 (lower-case hex) of those bytes, which names the stream on every
/// `local_lease`, and the `stk1_deflate` payload.
pub fn encode_token_dataset(stk1: &[u8]) -> (String, Vec<u8>) {
    (crate::digest::sha256_hex(stk1), deflate(stk1))
}

/// Decodes a `stk1_deflate` payload, checks the SHA-256 of the inflated `STK1` bytes against `sha256` (compared
/// case-insensitively) and parses the stream (every id checked against the vocabulary).
pub fn decode_token_dataset(
    encoding: DatasetEncoding,
    payload: &[u8],
    sha256: &str,
) -> Result<crate::tokens::TokenDataset, DatasetCodecError> {
    if encoding != DatasetEncoding::Stk1Deflate {
        return Err(DatasetCodecError::Data(format!(
            "a token stream travels as stk1_deflate, not {}",
            encoding.as_str()
        )));
    }
    let raw = inflate(payload)?;
    let got = crate::digest::sha256_hex(&raw);
    if !got.eq_ignore_ascii_case(sha256) {
        return Err(DatasetCodecError::Digest {
            got,
            want: sha256.to_string(),
        });
    }
    crate::tokens::parse_tokens(&raw).map_err(|e| DatasetCodecError::Data(e.to_string()))
}
