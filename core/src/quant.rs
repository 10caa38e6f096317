//! The int8 block codec of protocol v2: model deltas and lease results travel as blocks of [`BLOCK`] values, each
//! block one f32 scale (`absmax / 127`) and one signed byte per value.
//!
//! Encoding is deterministic (round half away from zero, computed in f32 on every platform), so two replicas that
//! hold the same f32 delta send the same bytes, and decoding is exact multiplication in f32, so every replica that
//! applies the same bytes to the same parameters gets the same bits. The error of one value is at most half its
//! block's scale.
//!
//! Why 256 values per block: the scale costs 4 bytes per block, 1.6% of the int8 payload at 256 (6% at 64, 0.4% at
//! 1,024); the quantisation error of a value is bounded by its *block's* largest magnitude, and in the MLP deltas we
//! ship a block of 256 spans a third of one weight row of a 784-wide layer, small enough that one large weight only
//! coarsens its neighbours, not the whole layer. 256 is also a power of two, so blocks never straddle the 4-byte
//! alignment of the frame payload.
//!
//! Wire layout of an encoded vector of `n` values: `ceil(n / 256)` f32 LE scales, then `n` i8 values, then zero
//! bytes up to a multiple of 4 (so the payload stays a whole number of 4-byte words).

/// Values per block.
pub const BLOCK: usize = 256;

/// Why a vector cannot be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("value {index} is not finite ({value}); only finite deltas can be quantised")]
    NonFinite { index: usize, value: f32 },
    #[error("encoded delta is {got} bytes, {expected} expected for {values} values")]
    Length {
        got: usize,
        expected: usize,
        values: usize,
    },
    #[error("block {0} has a scale that is negative or not finite")]
    Scale(usize),
}

/// Bytes of an encoded vector of `n` values.
pub fn encoded_len(n: usize) -> usize {
    let blocks = n.div_ceil(BLOCK);
    4 * blocks + n.div_ceil(4) * 4
}

/// One value's code from `v / scale`: rounded half away from zero (`f32::round`), clamped to ±127.
fn code(ratio: f32) -> i8 {
    ratio.round().clamp(-127.0, 127.0) as i8
}

/// Encodes `values` (see the module docs); any NaN or infinity is refused with its index.
pub fn encode(values: &[f32]) -> Result<Vec<u8>, QuantError> {
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(QuantError::NonFinite { index, value });
    }
    let n = values.len();
    let mut out = Vec::with_capacity(encoded_len(n));
    let mut codes = Vec::with_capacity(n.div_ceil(4) * 4);
    for block in values.chunks(BLOCK) {
        let absmax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = absmax / 127.0;
        // Dividing by the scale, not multiplying by a reciprocal, keeps |v / scale| <= 127 exactly at the absmax.
        out.extend_from_slice(&scale.to_le_bytes());
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
        } else {
            codes.extend(block.iter().map(|&v| code(v / scale) as u8));
        }
    }
    codes.resize(n.div_ceil(4) * 4, 0);
    out.extend_from_slice(&codes);
    Ok(out)
}

/// Decodes `n` values written by [`encode`]: `code × scale` in f32.
pub fn decode(bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let expected = encoded_len(n);
    if bytes.len() != expected {
        return Err(QuantError::Length {
            got: bytes.len(),
            expected,
            values: n,
        });
    }
    let blocks = n.div_ceil(BLOCK);
    let (scales, codes) = bytes.split_at(4 * blocks);
    let mut out = Vec::with_capacity(n);
    for (b, s) in scales.chunks_exact(4).enumerate() {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(QuantError::Scale(b));
        }
        let start = b * BLOCK;
        let end = (start + BLOCK).min(n);
        out.extend(codes[start..end].iter().map(|&c| c as i8 as f32 * scale));
    }
    Ok(out)
}

/// `deq(Q(values))`: what the receiver of [`encode`]d `values` will hold.
pub fn round_trip(values: &[f32]) -> Result<Vec<f32>, QuantError> {
    decode(&encode(values)?, values.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_vec(r: &mut SplitMix64) -> Vec<f32> {
        let n = r.below(3 * BLOCK as u64 + 7) as usize;
        let mag = 10f64.powi(r.below(12) as i32 - 8);
        (0..n)
            .map(|_| match r.below(10) {
                0 => 0.0,
                1 => (mag * 1e3) as f32 * if r.below(2) == 0 { 1.0 } else { -1.0 },
                _ => (r.normal() * mag) as f32,
            })
            .collect()
    }

    #[test]
    fn error_is_at_most_half_a_scale_and_encoding_is_deterministic() {
        let mut r = SplitMix64::new(0x0b10c);
        for _ in 0..2_000 {
            let v = random_vec(&mut r);
            let bytes = encode(&v).unwrap();
            assert_eq!(bytes.len(), encoded_len(v.len()));
            assert_eq!(bytes.len() % 4, 0);
            assert_eq!(encode(&v).unwrap(), bytes, "same input, same bytes");
            let back = decode(&bytes, v.len()).unwrap();
            for (block, (orig, deq)) in v.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let scale = f32::from_le_bytes(bytes[4 * block..4 * block + 4].try_into().unwrap());
                let absmax = orig.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert_eq!(scale, absmax / 127.0);
                for (a, b) in orig.iter().zip(deq) {
                    // Half a scale, plus the rounding of the product itself (one ulp of the value).
                    let bound = scale as f64 / 2.0 + (a.abs() as f64) * f32::EPSILON as f64;
                    assert!(((a - b).abs() as f64) <= bound, "{a} -> {b}, scale {scale}");
                }
            }
            // Decoding what was decoded and re-encoded is a fixed point: a replica re-sending deq(Q(x)) sends Q(x).
            assert_eq!(round_trip(&back).unwrap(), back);
        }
    }

    #[test]
    fn non_finite_values_and_bad_frames_are_refused_clearly() {
        let mut v = vec![1.0f32; 300];
        v[257] = f32::NAN;
        assert_eq!(
            encode(&v).unwrap_err().to_string(),
            "value 257 is not finite (NaN); only finite deltas can be quantised"
        );
        v[257] = f32::NEG_INFINITY;
        assert!(matches!(
            encode(&v),
            Err(QuantError::NonFinite { index: 257, .. })
        ));
        let ok = encode(&[1.0, 2.0]).unwrap();
        assert!(matches!(decode(&ok, 5), Err(QuantError::Length { .. })));
        assert!(matches!(
            decode(&ok[..4], 2),
            Err(QuantError::Length { .. })
        ));
        let mut bad = ok.clone();
        bad[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bad, 2), Err(QuantError::Scale(0)));
        assert_eq!(encode(&[]).unwrap(), Vec::<u8>::new());
        assert_eq!(decode(&[], 0).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn extremes_map_to_plus_minus_127() {
        let v = [4.0f32, -4.0, 2.0, 0.0, 1.0 / 127.0 * 4.0 * 0.5];
        let bytes = encode(&v).unwrap();
        let codes: Vec<i8> = bytes[4..9].iter().map(|&c| c as i8).collect();
        assert_eq!(&codes[..4], &[127, -127, 64, 0]);
        // Exactly half a step rounds away from zero.
        assert_eq!(codes[4], 1);
    }
}
