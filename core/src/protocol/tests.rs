//! Round trips, framing errors and fuzzed frames of both protocol versions.

mod dataset; // The `dataset` frame's payload encodings.
mod property; // Random structured messages and random mutations of their frames.

use super::*;

fn decode_worker(frame: &WireFrame) -> Result<(WorkerMsg, Vec<u8>), ProtocolError> {
    match frame {
        WireFrame::Text(t) => WorkerMsg::decode_text(t).map(|m| (m, vec![])),
        WireFrame::Binary(b) => WorkerMsg::decode_binary(b).map(|(m, p)| (m, p.to_vec())),
    }
}

#[test]
fn v2_messages_round_trip_with_int8_payloads_and_v1_frames_are_unchanged() {
    let delta: Vec<f32> = (0..600).map(|i| (i as f32 - 300.0) * 1e-4).collect();
    let bytes = encode_delta(Quant::Int8, &delta).unwrap();
    assert_eq!(bytes.len(), crate::quant::encoded_len(600));
    let msg = WorkerMsg::LocalResult {
        lease: LeaseId(3),
        losses: vec![2.25, 2.0],
        correct: vec![3, 4],
        quant: Quant::Int8,
        commit: None,
    };
    let WireFrame::Binary(frame) = encode(&msg, &bytes) else {
        panic!("a delta is binary")
    };
    let (back, payload) = WorkerMsg::decode_binary(&frame).unwrap();
    assert_eq!(back, msg);
    let deq = decode_delta(Quant::Int8, payload, 600).unwrap();
    assert_eq!(deq, crate::quant::round_trip(&delta).unwrap());
    assert!(decode_delta(Quant::Int8, payload, 601).is_err());
    assert!(decode_delta(Quant::F32, payload, 600).is_err());
    assert!(encode_delta(Quant::F32, &[1.0, f32::INFINITY]).is_err());
    // v1 frames keep their exact bytes: a lease is still `{"type":"lease",...}` with the same fields.
    let lease = CoordinatorMsg::Lease {
        lease: LeaseId(1),
        job: JobId(2),
        version: 3,
        step: 3,
        micro_batch: 0,
        rows: 1,
        deadline_ms: 5,
    };
    let WireFrame::Binary(b) = encode(&lease, &[0; 8]) else {
        panic!("a lease is binary")
    };
    let h = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    assert_eq!(
        std::str::from_utf8(&b[4..4 + h]).unwrap().trim_end(),
        r#"{"type":"lease","lease":1,"job":2,"version":3,"step":3,"micro_batch":0,"rows":1,"deadline_ms":5}"#
    );
    assert_eq!(negotiate(1, PROTOCOL_V2), Some(1));
    assert_eq!(negotiate(2, PROTOCOL_V2), Some(2));
    assert_eq!(negotiate(9, PROTOCOL_V2), None);
    assert_eq!(negotiate(0, PROTOCOL_V2), None);
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
