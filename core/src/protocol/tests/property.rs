//! Random structured messages, then random mutations of their frames: encoding and decoding never panic, and
//! an unmutated frame decodes to exactly what was encoded (or to the documented framing error).

use super::super::*;
use super::decode_worker;
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
        (CoordinatorMsg::LocalLease { plan, .. }, CoordinatorMsg::LocalLease { plan: p, .. }) => {
            use crate::optim::OptimizerSpec::Sgd;
            let (Sgd { lr, momentum }, Sgd { lr: l, momentum: m }) = (plan.optimizer, p.optimizer)
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
            strip(a) == strip(b) && close(lr as f64, l as f64) && close(momentum as f64, m as f64)
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

/// Decodes a frame into a message and its payload.
type Decode<M> = fn(&WireFrame) -> Result<(M, Vec<u8>), ProtocolError>;

/// Encodes `msg` with a random payload, decodes the frame and checks the result against the documented framing
/// outcome ([`expected`]): the frame, and whether it round-tripped (else it was the expected framing error).
fn check<M: std::fmt::Debug + Serialize>(
    r: &mut SplitMix64,
    msg: M,
    name_and_payload: fn(&M) -> (&'static str, bool),
    decode: Decode<M>,
    same: fn(&M, &M) -> bool,
) -> (WireFrame, bool) {
    let (name, needs) = name_and_payload(&msg);
    let payload = payload(r, needs);
    let frame = encode(&msg, &payload);
    let want = expected(needs, header_len(&frame), payload.len(), name);
    match (decode(&frame), want) {
        (Ok((m, p)), Ok(())) => {
            assert!(same(&m, &msg), "{msg:?} came back as {m:?}");
            assert_eq!(p, payload);
            (frame, true)
        }
        (Err(e), Err(w)) => {
            assert_eq!(e, w, "{msg:?} with {} payload bytes", payload.len());
            (frame, false)
        }
        (got, want) => panic!(
            "{msg:?} with {} payload bytes: got {got:?}, expected {want:?}",
            payload.len()
        ),
    }
}

fn decode_coordinator(frame: &WireFrame) -> Result<(CoordinatorMsg, Vec<u8>), ProtocolError> {
    match frame {
        WireFrame::Text(t) => CoordinatorMsg::decode_text(t).map(|m| (m, vec![])),
        WireFrame::Binary(b) => CoordinatorMsg::decode_binary(b).map(|(m, p)| (m, p.to_vec())),
    }
}

#[test]
fn random_structured_messages_round_trip_and_their_mutations_never_panic() {
    let mut r = SplitMix64::new(0x5eed_57a7);
    let (mut round_trips, mut framing_errors) = (0, 0);
    for i in 0..ITERATIONS {
        let (frame, round_trip) = if i % 2 == 0 {
            let msg = worker_msg(&mut r);
            check(
                &mut r,
                msg,
                WorkerMsg::name_and_payload,
                decode_worker,
                same_worker,
            )
        } else {
            let msg = coordinator_msg(&mut r);
            check(
                &mut r,
                msg,
                CoordinatorMsg::name_and_payload,
                decode_coordinator,
                same_coordinator,
            )
        };
        if round_trip {
            round_trips += 1;
        } else {
            framing_errors += 1;
        }
        let mut bytes = frame_bytes(&frame);
        mutate(&mut r, &mut bytes);
        decode_all(&bytes);
    }
    println!("{round_trips} round trips, {framing_errors} expected framing errors of {ITERATIONS}");
    assert!(
        round_trips > ITERATIONS / 2 && framing_errors > ITERATIONS / 20,
        "{round_trips} round trips, {framing_errors} framing errors"
    );
}
