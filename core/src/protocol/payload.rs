//! Binary payloads of the v1 messages: little-endian f32/u32 tensors and the lease's features-then-labels layout.

use super::ProtocolError;

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

/// Splits a lease payload for a spec of input width `input` into features (`rows × input` f32) and labels: the
/// rest, a whole number of u32 labels per row (1 for a classifier, the context `T` for a language model, whose
/// labels are the next token at every position). The engine's `check_batch` then holds the labels per row to
/// exactly the spec's `labels_per_row`.
pub fn split_lease_payload(
    payload: &[u8],
    rows: usize,
    input: usize,
) -> Result<(Vec<f32>, Vec<u32>), ProtocolError> {
    let features = rows * input * 4;
    let labels = payload.len().saturating_sub(features);
    if rows == 0 || payload.len() < features + rows * 4 || !labels.is_multiple_of(rows * 4) {
        return Err(ProtocolError::Json(format!(
            "lease payload is {} bytes, expected {features} of features and a whole number of labels for each of {rows} rows",
            payload.len()
        )));
    }
    let (x, y) = payload.split_at(features);
    Ok((f32s(x), u32s(y)))
}
