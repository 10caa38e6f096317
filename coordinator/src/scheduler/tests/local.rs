//! `local` jobs in the state machine: only v2 connections get local leases, a lease carries row indices and its
//! model as int8 deltas from the version the connection holds, agreeing replicas (delta and trace) settle a shard,
//! a disagreement is replayed, and the outer step's broadcast reproduces the coordinator's parameters bit for bit.

use axum::extract::ws::Message;

use super::*;
use crate::job::Mode;
use starling_core::local::LocalOutput;
use starling_core::protocol::{PROTOCOL_V2, Quant, decode_delta, f32s, u32s};

/// One round of two 8-row shards, H = 2 inner steps of 4 rows, R = 2.
pub(super) fn local() -> Hyper {
    Hyper {
        mode: Mode::Local,
        h: 2,
        inner_batch: 4,
        global_batch: 16,
        micro_batch: 8,
        audit: 0.0,
        ..hyper()
    }
}

/// Records `fx` like `Harness::take`, and returns every binary frame's message and payload per connection.
pub(super) fn frames(h: &mut Harness, fx: Effects) -> Vec<(ConnId, CoordinatorMsg, Vec<u8>)> {
    let mut out = Vec::new();
    for d in &fx.later {
        if let Action::Send {
            conn,
            out: Outbound::Frame(Message::Binary(b)),
            ..
        } = &d.action
            && let Ok((m, p)) = CoordinatorMsg::decode_binary(b)
        {
            out.push((*conn, m, p.to_vec()));
        }
    }
    h.take(fx);
    out
}

pub(super) fn v2(h: &mut Harness, w: u64) -> ConnId {
    let c = h.connect(w);
    h.st.set_protocol(c, PROTOCOL_V2);
    c
}

/// The local lease `conn` holds.
pub(super) fn held_local(h: &Harness, conn: ConnId) -> Option<(LeaseId, u32)> {
    h.inbox.get(&conn)?.iter().rev().find_map(|m| match m {
        CoordinatorMsg::LocalLease { lease, shard, .. } => Some((*lease, *shard)),
        _ => None,
    })
}

/// A shard's honest local result: any deterministic delta and trace will do.
pub(super) fn honest_local(round: u64, shard: u32) -> LocalOutput {
    LocalOutput {
        delta: (0..PARAMS)
            .map(|i| ((round * 5 + shard as u64 * 3 + i as u64) % 7) as f32 * 1e-3 - 2e-3)
            .collect(),
        losses: vec![0.7, 0.6],
        correct: vec![2, 3],
    }
}

pub(super) fn send_local(
    h: &mut Harness,
    conn: ConnId,
    out: &LocalOutput,
) -> Vec<(ConnId, CoordinatorMsg, Vec<u8>)> {
    let (lease, _) = held_local(h, conn).expect("holds a local lease");
    let payload = starling_core::protocol::encode_delta(Quant::Int8, &out.delta).expect("finite");
    let fx = h.st.local_result(
        conn,
        lease,
        out.losses.clone(),
        out.correct.clone(),
        Quant::Int8,
        &payload,
    );
    frames(h, fx)
}

#[test]
fn only_v2_connections_get_local_leases_with_row_indices() {
    let mut h = Harness::new();
    h.load(1, local(), vec![]);
    let old = h.connect(1);
    h.ready(old);
    assert!(
        h.held(old).is_none() && held_local(&h, old).is_none(),
        "a v1 worker gets no local lease"
    );
    let c = v2(&mut h, 2);
    let fx = h.st.ready(c);
    let sent = frames(&mut h, fx);
    assert!(
        matches!(sent[0].1, CoordinatorMsg::Model { .. }),
        "cold start: the full model first"
    );
    let (_, lease, payload) = &sent[1];
    let CoordinatorMsg::LocalLease {
        rows,
        plan,
        dataset,
        quant,
        ..
    } = lease
    else {
        panic!("expected a local lease, got {lease:?}")
    };
    assert_eq!(
        (*rows, plan.h, plan.inner_batch, *quant),
        (8, 2, 4, Quant::Int8)
    );
    assert!(dataset.is_some(), "a local lease names the dataset");
    let idx = u32s(payload);
    assert_eq!(idx.len(), 8, "the payload is the shard's row indices");
    assert!(idx.iter().all(|i| *i < 64));
}

#[test]
fn agreeing_replicas_settle_a_round_and_workers_follow_by_int8_deltas() {
    let mut h = Harness::new();
    h.load(1, local(), vec![]);
    let conns: Vec<ConnId> = (1..=4).map(|w| v2(&mut h, w)).collect();
    let mut held_params: HashMap<ConnId, Vec<f32>> = HashMap::new();
    for &c in &conns {
        let fx = h.st.ready(c);
        for (conn, m, p) in frames(&mut h, fx) {
            if let CoordinatorMsg::Model { .. } = m {
                held_params.insert(conn, f32s(&p));
            }
        }
    }
    let theta0 = h.job(1).params().to_vec();
    let mut sent = Vec::new();
    for &c in &conns {
        let (_, shard) = held_local(&h, c).expect("every worker holds a shard");
        sent.extend(send_local(&mut h, c, &honest_local(0, shard)));
    }
    assert!(h.verdicts(conns[0]).contains(&Outcome::Accepted));
    assert_eq!(
        h.job(1).step,
        1,
        "both shards settled: the outer step is applied"
    );
    let theta1 = h.job(1).params().to_vec();
    assert_ne!(theta0, theta1);
    for &c in &conns {
        let fx = h.st.ready(c);
        sent.extend(frames(&mut h, fx));
    }
    // Each connection's next lease comes with the int8 delta from version 0, and applying it gives θ_1 exactly.
    let deltas: Vec<_> = sent
        .iter()
        .filter(|(_, m, _)| matches!(m, CoordinatorMsg::ModelDelta { .. }))
        .collect();
    assert!(!deltas.is_empty(), "the next leases come with model deltas");
    for (conn, m, p) in deltas {
        let CoordinatorMsg::ModelDelta {
            from,
            version,
            quant,
            ..
        } = m
        else {
            unreachable!()
        };
        assert_eq!((*from, *version), (0, 1));
        let d = decode_delta(*quant, p, PARAMS).expect("decodes");
        let mut mine = held_params[conn].clone();
        mine.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
        assert_eq!(
            mine, theta1,
            "a worker's parameters are the coordinator's, bit for bit"
        );
    }
    // The accepted rows are durable (the deltas, dequantised) before their verdicts.
    assert!(
        h.ops
            .iter()
            .any(|op| matches!(op, StoreOp::Accepted { .. }))
    );
}

#[test]
fn a_trace_disagreement_is_replayed_and_the_liar_is_rejected() {
    let mut h = Harness::new();
    h.load(1, local(), vec![]);
    let (a, b) = (v2(&mut h, 1), v2(&mut h, 2));
    h.ready(a);
    h.ready(b);
    let (_, sa) = held_local(&h, a).expect("a holds");
    let (_, sb) = held_local(&h, b).expect("b holds");
    // a and b hold different shards (least replicated first); a third worker gets a replica of one of them.
    let c = v2(&mut h, 3);
    h.ready(c);
    let (_, sc) = held_local(&h, c).expect("c holds");
    let twin = if sc == sa { a } else { b };
    let shard = if sc == sa { sa } else { sb };
    assert_eq!(sc, shard);
    send_local(&mut h, twin, &honest_local(0, shard));
    let mut lie = honest_local(0, shard);
    lie.losses[1] *= 1.5; // Same delta, a different loss trace: not the same computation.
    send_local(&mut h, c, &lie);
    assert_eq!(h.job(1).counters.arbitrations, 1);
    let r = h.recomputes.remove(0);
    assert!(
        r.local.is_some(),
        "a local lease is replayed, not recomputed as one step"
    );
    let mut reference = honest_local(0, shard);
    reference.delta = starling_core::quant::round_trip(&reference.delta).expect("finite");
    let fx = h.st.replayed(r.job, r.step, r.micro, Some(reference));
    h.take(fx);
    assert_eq!(h.last_verdict(twin), Some(Outcome::Accepted));
    assert_eq!(h.last_verdict(c), Some(Outcome::Rejected));
}

#[test]
fn malformed_local_results_and_v1_results_for_local_leases_are_rejected() {
    let mut h = Harness::new();
    h.load(1, local(), vec![]);
    let c = v2(&mut h, 1);
    h.ready(c);
    let (lease, shard) = held_local(&h, c).expect("holds");
    let out = honest_local(0, shard);
    let payload = starling_core::protocol::encode_delta(Quant::Int8, &out.delta).expect("finite");
    // One loss short of H.
    let fx = h.st.local_result(
        c,
        lease,
        vec![0.5],
        out.correct.clone(),
        Quant::Int8,
        &payload,
    );
    h.take(fx);
    assert_eq!(h.last_verdict(c), Some(Outcome::Rejected));
    h.ready(c);
    let (lease, _) = held_local(&h, c).expect("holds another");
    let fx = h.st.result(c, lease, 0.5, 1, out.delta.clone());
    h.take(fx);
    assert_eq!(
        h.last_verdict(c),
        Some(Outcome::Rejected),
        "a v1 result cannot answer a local lease"
    );
}

/// A `local` language-model job (issue 13) leases token windows: its leases name the stream's `stk1_deflate`
/// dataset frame, a lease's payload is its shard of the round's windows (`core::tokens::lease_windows`, the same
/// draw a `sync` step makes), only a worker that accepts `stk1_deflate` gets the frame, and a trace counts correct
/// *positions* (T per row), not rows.
#[test]
fn a_local_lm_job_leases_its_shard_of_the_rounds_token_windows() {
    use crate::examples::Examples;
    use starling_core::protocol::{DatasetEncoding, decode_token_dataset};
    use starling_core::tokens::{TokenStream, lease_windows};
    use starling_core::transformer::LmSpec;

    let lm = LmSpec {
        vocab: 5,
        context: 4,
        width: 4,
        heads: 2,
        layers: 1,
        tied: true,
    };
    let tokens: Vec<u32> = (0..60u32).map(|i| i * 7 % 5).collect();
    let examples = |tokens: Vec<u32>| Examples::Tokens {
        stream: TokenStream { tokens, context: 4 },
        vocab_size: 5,
        vocab: None,
    };
    let hyper = local();
    let mut h = Harness::new();
    h.st.load_job(JobLoad {
        id: JobId(1),
        owner: Some(1),
        owner_name: Some("alice".into()),
        name: "lm".into(),
        spec: lm.model_spec(),
        hyper: hyper.clone(),
        status: JobStatus::Running,
        created_ms: 0,
        train: examples(tokens.clone()),
        test: examples(tokens[..20].to_vec()),
        checkpoint: None,
        accepted: vec![],
    });
    let c = v2(&mut h, 2);
    let fx = h.st.ready(c);
    let sent = frames(&mut h, fx);
    let (_, lease, payload) = &sent[1];
    let CoordinatorMsg::LocalLease {
        round,
        shard,
        rows,
        dataset: Some(sha),
        ..
    } = lease
    else {
        panic!("expected a local lease naming its dataset, got {lease:?}")
    };
    let windows = lease_windows(
        tokens.len() - 4,
        (hyper.global_batch as usize, hyper.micro_batch as usize),
        hyper.seed,
        *round,
        *shard as usize,
    );
    assert_eq!(*rows, 8);
    assert_eq!(
        u32s(payload),
        windows,
        "the payload is the shard's window starts"
    );

    // The dataset is the training stream, content-addressed by its STK1 bytes.
    let fx =
        h.st.dataset_request(c, JobId(1), sha, &DatasetEncoding::all());
    let sent = frames(&mut h, fx);
    let (_, msg, frame) = &sent[0];
    let CoordinatorMsg::Dataset {
        encoding, sha256, ..
    } = msg
    else {
        panic!("expected the dataset, got {msg:?}")
    };
    assert_eq!(*encoding, DatasetEncoding::Stk1Deflate);
    let ds = decode_token_dataset(*encoding, frame, sha256).expect("the frame decodes");
    assert_eq!((ds.tokens, ds.context), (tokens.clone(), 4));
    let mut bad = frame.clone();
    bad[0] ^= 1;
    assert!(decode_token_dataset(*encoding, &bad, sha256).is_err());
    let fx =
        h.st.dataset_request(c, JobId(1), sha, &["raw".into(), "deflate".into()]);
    assert!(
        frames(&mut h, fx).is_empty(),
        "a worker that cannot decode a token stream gets no frame"
    );

    // 4 rows × T = 4 positions per inner step: 16 correct is possible, 17 is not.
    let n = lm.param_count();
    let ok = LocalOutput {
        delta: vec![1e-3; n],
        losses: vec![1.5, 1.4],
        correct: vec![16, 9],
    };
    send_local(&mut h, c, &ok);
    assert!(
        !h.verdicts(c).contains(&Outcome::Rejected),
        "{:?}",
        h.inbox.get(&c)
    );
    let c2 = v2(&mut h, 3);
    let fx = h.st.ready(c2);
    frames(&mut h, fx);
    let lie = LocalOutput {
        correct: vec![17, 9],
        ..ok
    };
    send_local(&mut h, c2, &lie);
    assert_eq!(h.last_verdict(c2), Some(Outcome::Rejected));
}
