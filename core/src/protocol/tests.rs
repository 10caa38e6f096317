//! Round trips, framing errors and fuzzed frames of both protocol versions.

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
/// Random structured messages, then random mutations of their frames: encoding and decoding never panic, and
/// an unmutated frame decodes to exactly what was encoded (or to the documented framing error).
mod property {
    use super::super::*;
    use crate::rng::SplitMix64;
    use crate::spec::{Activation, Input, Layer};

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
            "a", "Z", "0", " ", "\"", "\\", "\n", "\t", "\u{0}", "\u{1f}", "é", "ß", "漢", "😀",
            "\u{202e}", "\u{feff}", "}", "{", "\"type\"", "/", "\u{7f}",
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
            .map(|_| match r.below(6) {
                0 => Layer::Conv2d {
                    out_channels: num32(r),
                    kernel: num32(r),
                    stride: num32(r),
                    padding: num32(r),
                },
                1 => Layer::MaxPool2d {
                    kernel: num32(r),
                    stride: (r.below(2) == 0).then(|| num32(r)),
                },
                2 => Layer::GroupNorm {
                    groups: num32(r),
                    eps: float32(r),
                },
                3 => Layer::Flatten,
                _ => Layer::dense(
                    num32(r),
                    if r.below(2) == 0 {
                        Activation::Relu
                    } else {
                        Activation::None
                    },
                ),
            })
            .collect();
        ModelSpec {
            input: if r.below(2) == 0 {
                Input::Features(num32(r))
            } else {
                Input::Shape((0..r.below(4)).map(|_| num32(r)).collect())
            },
            layers,
        }
    }

    fn worker_msg(r: &mut SplitMix64) -> WorkerMsg {
        let opt = |r: &mut SplitMix64| if r.below(3) == 0 { None } else { Some(text(r)) };
        match r.below(6) {
            5 => WorkerMsg::DatasetRequest {
                job: JobId(num(r)),
                sha256: text(r),
                accept: (0..r.below(4)).map(|_| text(r)).collect(),
            },
            4 => WorkerMsg::LocalResult {
                lease: LeaseId(num(r)),
                losses: (0..r.below(5)).map(|_| float32(r)).collect(),
                correct: (0..r.below(5)).map(|_| num32(r)).collect(),
                quant: if r.below(2) == 0 {
                    Quant::F32
                } else {
                    Quant::Int8
                },
                commit: opt(r),
            },
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
        let opt = |r: &mut SplitMix64| if r.below(3) == 0 { None } else { Some(text(r)) };
        match r.below(10) {
            9 => CoordinatorMsg::Redirect { url: text(r) },
            6 => CoordinatorMsg::ModelDelta {
                job: JobId(num(r)),
                from: num(r),
                version: num(r),
                quant: if r.below(2) == 0 {
                    Quant::F32
                } else {
                    Quant::Int8
                },
            },
            7 => CoordinatorMsg::LocalLease {
                lease: LeaseId(num(r)),
                job: JobId(num(r)),
                version: num(r),
                round: num(r),
                shard: num32(r),
                rows: num32(r),
                plan: crate::local::LeasePlan {
                    h: num32(r),
                    inner_batch: num32(r),
                    seed: num(r),
                    optimizer: crate::optim::OptimizerSpec::Sgd {
                        lr: float32(r),
                        momentum: float32(r),
                    },
                },
                quant: Quant::Int8,
                deadline_ms: num(r),
                dataset: opt(r),
            },
            8 => CoordinatorMsg::Dataset {
                job: JobId(num(r)),
                sha256: text(r),
                encoding: [
                    DatasetEncoding::Raw,
                    DatasetEncoding::Deflate,
                    DatasetEncoding::PaletteDeflate,
                ][r.below(3) as usize],
            },
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
            (
                WorkerMsg::LocalResult {
                    lease,
                    losses,
                    correct,
                    quant,
                    commit,
                },
                WorkerMsg::LocalResult {
                    lease: l,
                    losses: x,
                    correct: c,
                    quant: q,
                    commit: k,
                },
            ) => {
                lease == l
                    && correct == c
                    && quant == q
                    && commit == k
                    && losses.len() == x.len()
                    && losses
                        .iter()
                        .zip(x)
                        .all(|(a, b)| close(*a as f64, *b as f64))
            }
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
            (
                CoordinatorMsg::LocalLease { plan, .. },
                CoordinatorMsg::LocalLease { plan: p, .. },
            ) => {
                use crate::optim::OptimizerSpec::Sgd;
                let (Sgd { lr, momentum }, Sgd { lr: l, momentum: m }) =
                    (plan.optimizer, p.optimizer)
                else {
                    return false;
                };
                // Everything but the optimizer's floats must match exactly.
                let strip = |m: &CoordinatorMsg| {
                    let mut m = m.clone();
                    if let CoordinatorMsg::LocalLease { plan, .. } = &mut m {
                        plan.optimizer = Sgd {
                            lr: 0.0,
                            momentum: 0.0,
                        };
                    }
                    m
                };
                strip(a) == strip(b)
                    && close(lr as f64, l as f64)
                    && close(momentum as f64, m as f64)
            }
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
