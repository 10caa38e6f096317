//! The `dataset` frame's payload encodings: lossless, compact, named by the decoded bytes.

use super::super::*;

#[test]
fn dataset_encodings_are_lossless_compact_and_named_by_the_decoded_bytes() {
    use crate::data::{Dataset, encode_raw};
    // MNIST-like: 256 distinct values (three decimals, not k/255), mostly zeros.
    let mut r = crate::rng::SplitMix64::new(7);
    let levels: Vec<f32> = (0..256)
        .map(|k| ((k as f32 / 255.0) * 1000.0).round() / 1000.0 + k as f32 * 1e-7)
        .collect();
    let features: Vec<f32> = (0..300 * 64)
        .map(|_| {
            if r.below(3) == 0 {
                levels[r.below(256) as usize]
            } else {
                0.0
            }
        })
        .collect();
    let labels: Vec<u32> = (0..300).map(|_| r.below(10) as u32).collect();
    let ds = Dataset::new(features, labels, 64).unwrap();
    let raw = encode_raw(&ds);
    let sha = dataset_sha256(&ds);
    assert_eq!(sha, crate::digest::sha256_hex(&raw));
    let (e, compact) = encode_dataset(&ds, &DatasetEncoding::all());
    assert_eq!(e, DatasetEncoding::PaletteDeflate);
    assert!(
        compact.len() * 4 < raw.len(),
        "{} vs {}",
        compact.len(),
        raw.len()
    );
    assert_eq!(decode_dataset_bytes(e, &compact).unwrap(), raw);
    assert_eq!(decode_dataset(e, &compact, &sha).unwrap(), ds);
    // Without `accept`, raw; with only `deflate` (or more than 256 distinct values), deflate of the SDS1 bytes.
    assert_eq!(
        encode_dataset(&ds, &[]),
        (DatasetEncoding::Raw, raw.clone())
    );
    let (e, d) = encode_dataset(&ds, &["zstd".into(), "deflate".into()]);
    assert_eq!(e, DatasetEncoding::Deflate);
    assert_eq!(decode_dataset(e, &d, &sha).unwrap(), ds);
    // 256 distinct values still take the palette (the levels above, 0.0 among them); 257 do not.
    let mut at_limit = ds.clone();
    at_limit.features[..256].copy_from_slice(&levels);
    assert_eq!(
        encode_dataset(&at_limit, &DatasetEncoding::all()).0,
        DatasetEncoding::PaletteDeflate
    );
    at_limit.features[256] = 0.123_456_7;
    let (e, d) = encode_dataset(&at_limit, &DatasetEncoding::all());
    assert_eq!(e, DatasetEncoding::Deflate);
    assert_eq!(decode_dataset_bytes(e, &d).unwrap(), encode_raw(&at_limit));
    let wide = Dataset::new(
        (0..300 * 64).map(|i| i as f32).collect(),
        ds.labels.clone(),
        64,
    )
    .unwrap();
    assert_eq!(
        encode_dataset(&wide, &DatasetEncoding::all()).0,
        DatasetEncoding::Deflate
    );
    // A wrong digest, a corrupt stream and a palette index past the palette are refused by name.
    assert!(matches!(
        decode_dataset(DatasetEncoding::PaletteDeflate, &compact, &"0".repeat(64)),
        Err(DatasetCodecError::Digest { .. })
    ));
    assert!(matches!(
        decode_dataset_bytes(
            DatasetEncoding::PaletteDeflate,
            &compact[..compact.len() / 2]
        ),
        Err(DatasetCodecError::Inflate(_))
    ));
    let mut body = b"SDP1".to_vec();
    for n in [1u32, 2, 1] {
        body.extend_from_slice(&n.to_le_bytes());
    }
    body.extend_from_slice(&0.5f32.to_le_bytes());
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(&3u32.to_le_bytes());
    let bad = miniz_oxide::deflate::compress_to_vec(&body, 6);
    assert!(matches!(
        decode_dataset_bytes(DatasetEncoding::PaletteDeflate, &bad),
        Err(DatasetCodecError::Palette(m)) if m.contains("index 1")
    ));
    // On the wire: `encoding` is left out when raw, so an old v2 frame is byte-identical.
    let old = encode(
        &CoordinatorMsg::Dataset {
            job: JobId(1),
            sha256: sha.clone(),
            encoding: DatasetEncoding::Raw,
        },
        &raw,
    );
    let WireFrame::Binary(b) = old else {
        panic!("a dataset is binary")
    };
    assert!(!String::from_utf8_lossy(&b[..64]).contains("encoding"));
    let req = encode(
        &WorkerMsg::DatasetRequest {
            job: JobId(1),
            sha256: sha,
            accept: vec![],
        },
        &[],
    );
    let WireFrame::Text(t) = req else {
        panic!("a request is text")
    };
    assert!(!t.contains("accept"));
}
