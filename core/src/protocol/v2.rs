//! What protocol v2 adds to v1: version negotiation and the encoding of deltas (lease results and model
//! broadcasts), either plain f32 or the int8 blocks of [`crate::quant`].

use serde::{Deserialize, Serialize};

use super::{ProtocolError, f32_bytes, f32s};
use crate::quant;

/// Local-training leases, int8 deltas both ways.
pub const PROTOCOL_V2: u32 = 2;

/// The version a coordinator speaking 1 to `ours` picks for a worker whose `hello` names `theirs` (the highest
/// version the worker speaks; versions are cumulative, so naming 2 lists 1 and 2): `theirs` itself when this
/// coordinator speaks it, otherwise `None` (refused with `protocol_version`: a version from the future may have
/// changed what the older ones mean, so it is not silently talked down).
pub fn negotiate(theirs: u32, ours: u32) -> Option<u32> {
    (1..=ours).contains(&theirs).then_some(theirs)
}

/// How a delta's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quant {
    /// Little-endian f32, 4 bytes a value.
    F32,
    /// [`crate::quant`] blocks: 256 values share one f32 scale, one signed byte each.
    #[default]
    Int8,
}

impl Quant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        }
    }
}

/// Encodes a delta; a non-finite value is refused (int8 cannot carry it, and no honest delta holds one).
pub fn encode_delta(quant: Quant, values: &[f32]) -> Result<Vec<u8>, quant::QuantError> {
    match quant {
        Quant::F32 => match values.iter().position(|v| !v.is_finite()) {
            Some(index) => Err(quant::QuantError::NonFinite {
                index,
                value: values[index],
            }),
            None => Ok(f32_bytes(values)),
        },
        Quant::Int8 => quant::encode(values),
    }
}

/// Decodes a delta of `n` values, checking its length (and, for int8, its scales).
pub fn decode_delta(quant: Quant, bytes: &[u8], n: usize) -> Result<Vec<f32>, ProtocolError> {
    match quant {
        Quant::F32 if bytes.len() == 4 * n => Ok(f32s(bytes)),
        Quant::F32 => Err(ProtocolError::Json(format!(
            "f32 delta is {} bytes, expected {}",
            bytes.len(),
            4 * n
        ))),
        Quant::Int8 => quant::decode(bytes, n).map_err(|e| ProtocolError::Json(e.to_string())),
    }
}
