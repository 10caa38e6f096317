//! Transformer tests: fast vs reference on odd shapes, the causal mask, the whole backward pass against finite
//! differences, spec validation and the batch checks.

use super::fast::Fast;
use super::reference::Reference;
use super::*;
use crate::rng::SplitMix64;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn randn(n: usize, rng: &mut SplitMix64, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn tiny(tied: bool, heads: u32, width: u32) -> LmSpec {
    LmSpec {
        vocab: 7,
        context: 5,
        width,
        heads,
        layers: 2,
        tied,
    }
}

/// Initial parameters plus noise, so layer-norm gains, biases and the head are all away from their init values.
fn noisy_params(spec: &LmSpec, seed: u64, std: f64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ 0x55);
    let mut p = spec.init_params(seed);
    p.iter_mut().for_each(|v| *v += (rng.normal() * std) as f32);
    p
}

fn tokens(n: usize, vocab: u32, rng: &mut SplitMix64) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

#[test]
fn attention_core_fast_matches_reference_on_odd_shapes() {
    let mut rng = SplitMix64::new(1);
    for &(batch, seq, width, heads) in &[
        (1, 1, 24, 1),
        (2, 17, 24, 3),
        (3, 17, 24, 1),
        (2, 1, 24, 3),
        (1, 9, 6, 2),
    ] {
        let dims = AttnDims {
            batch,
            seq,
            width,
            heads,
        };
        let n = batch * seq;
        let qkv = randn(n * 3 * width, &mut rng, 1.0);
        let dy = randn(n * width, &mut rng, 1.0);
        let (mut p_ref, mut y_ref) = (vec![0.0; dims.probs_len()], vec![0.0; n * width]);
        Reference.attention_forward(dims, &qkv, &mut p_ref, &mut y_ref);
        let (mut p_fast, mut y_fast) = (vec![9.0; dims.probs_len()], vec![9.0; n * width]);
        Fast.attention_forward(dims, &qkv, &mut p_fast, &mut y_fast);
        assert!(rel_l2(&y_fast, &y_ref) < 1e-5, "y {dims:?}");
        assert!(rel_l2(&p_fast, &p_ref) < 1e-5, "probs {dims:?}");
        let mut d_ref = vec![0.0; n * 3 * width];
        Reference.attention_backward(dims, &qkv, &p_ref, &dy, &mut d_ref);
        let mut d_fast = vec![9.0; n * 3 * width];
        Fast.attention_backward(dims, &qkv, &p_fast, &dy, &mut d_fast);
        assert!(
            rel_l2(&d_fast, &d_ref) < 1e-4,
            "dqkv {dims:?}: {}",
            rel_l2(&d_fast, &d_ref)
        );
        // Every probability row sums to one over the visible positions and is zero beyond them.
        for (r, row) in p_ref.chunks_exact(seq).enumerate() {
            let i = r % seq;
            assert!((row.iter().map(|v| *v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
            assert!(row[i + 1..].iter().all(|v| *v == 0.0));
        }
    }
}

#[test]
fn attention_core_backward_matches_finite_differences() {
    let dims = AttnDims {
        batch: 2,
        seq: 4,
        width: 6,
        heads: 3,
    };
    let n = dims.batch * dims.seq;
    let mut rng = SplitMix64::new(4);
    let qkv = randn(n * 18, &mut rng, 1.0);
    let w = randn(n * 6, &mut rng, 1.0); // loss = Σ w ⊙ y
    let loss = |qkv: &[f32]| {
        let (mut p, mut y) = (vec![0.0; dims.probs_len()], vec![0.0; n * 6]);
        Reference.attention_forward(dims, qkv, &mut p, &mut y);
        y.iter()
            .zip(&w)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
    };
    let (mut p, mut y) = (vec![0.0; dims.probs_len()], vec![0.0; n * 6]);
    Reference.attention_forward(dims, &qkv, &mut p, &mut y);
    let mut d = vec![0.0; qkv.len()];
    Reference.attention_backward(dims, &qkv, &p, &w, &mut d);
    let h = 1e-2f32;
    for i in 0..qkv.len() {
        let (mut a, mut b) = (qkv.clone(), qkv.clone());
        a[i] += h;
        b[i] -= h;
        let num = (loss(&a) - loss(&b)) / (2.0 * h as f64);
        assert!(
            (num - d[i] as f64).abs() < 2e-3 * (1.0 + num.abs()),
            "qkv[{i}]: numeric {num}, analytic {}",
            d[i]
        );
    }
}

#[test]
fn whole_model_fast_matches_reference_width_24() {
    for (tied, heads, seq, batch) in [
        (true, 3, 17, 2),
        (false, 1, 17, 2),
        (true, 1, 1, 3),
        (false, 3, 1, 1),
    ] {
        let spec = LmSpec {
            vocab: 11,
            context: 17,
            width: 24,
            heads,
            layers: 2,
            tied,
        };
        spec.validate().unwrap();
        let params = noisy_params(&spec, 3, 0.05);
        let mut rng = SplitMix64::new(8);
        let ids = tokens(batch * seq, spec.vocab, &mut rng);
        let targets = tokens(batch * seq, spec.vocab, &mut rng);
        let want =
            forward_backward(&Reference, &spec, &params, &ids, &targets, batch, seq).unwrap();
        let got = forward_backward(&Fast, &spec, &params, &ids, &targets, batch, seq).unwrap();
        let what = format!("tied {tied} heads {heads} seq {seq}");
        assert!(
            (got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
            "{what}"
        );
        assert_eq!(got.correct, want.correct, "{what}");
        assert!(
            rel_l2(&got.grad, &want.grad) < 1e-4,
            "{what}: {}",
            rel_l2(&got.grad, &want.grad)
        );
        let e = evaluate(&Fast, &spec, &params, &ids, &targets, batch, seq).unwrap();
        assert!(
            (e.loss - want.loss).abs() < 1e-5 && e.rows == (batch * seq) as u32,
            "{what}"
        );
    }
}

#[test]
fn no_position_sees_the_future() {
    let spec = LmSpec {
        vocab: 13,
        context: 17,
        width: 24,
        heads: 3,
        layers: 2,
        tied: true,
    };
    let params = noisy_params(&spec, 5, 0.05);
    let mut rng = SplitMix64::new(2);
    let ids = tokens(17, spec.vocab, &mut rng);
    let v = spec.vocab as usize;
    for cut in [0, 8, 16] {
        let mut changed = ids.clone();
        changed[cut] = (changed[cut] + 1) % spec.vocab;
        for (name, a, b) in [
            (
                "reference",
                logits(&Reference, &spec, &params, &ids, 1, 17).unwrap(),
                logits(&Reference, &spec, &params, &changed, 1, 17).unwrap(),
            ),
            (
                "fast",
                logits(&Fast, &spec, &params, &ids, 1, 17).unwrap(),
                logits(&Fast, &spec, &params, &changed, 1, 17).unwrap(),
            ),
        ] {
            // Positions before the change see exactly the same inputs, so their logits are bit-identical ...
            assert_eq!(
                a[..cut * v],
                b[..cut * v],
                "{name}: a position before {cut} saw token {cut}"
            );
            // ... and the changed position itself does change (the test can fail).
            assert_ne!(
                a[cut * v..(cut + 1) * v],
                b[cut * v..(cut + 1) * v],
                "{name}"
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences_on_a_tiny_transformer() {
    for (tied, heads) in [(true, 2), (false, 3), (true, 1)] {
        let spec = tiny(tied, heads, 6);
        spec.validate().unwrap();
        let params = noisy_params(&spec, 11, 0.2);
        let mut rng = SplitMix64::new(3);
        let (batch, seq) = (2, 5);
        let ids = tokens(batch * seq, spec.vocab, &mut rng);
        let targets = tokens(batch * seq, spec.vocab, &mut rng);
        let out = forward_backward(&Reference, &spec, &params, &ids, &targets, batch, seq).unwrap();
        let loss_at = |p: &[f32]| {
            let z = logits(&Reference, &spec, p, &ids, batch, seq).unwrap();
            crate::reference::softmax_xent(&z, &targets, spec.vocab as usize, None).0
                / (batch * seq) as f64
        };
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        for i in 0..params.len() {
            let (mut plus, mut minus) = (params.clone(), params.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64);
            let err = (numeric - out.grad[i] as f64).abs() / (1e-2 + numeric.abs());
            worst = worst.max(err);
            assert!(
                err < 2e-2,
                "tied {tied} heads {heads} param {i}: numeric {numeric}, analytic {}",
                out.grad[i]
            );
        }
        assert!(
            out.grad.iter().any(|g| g.abs() > 1e-3),
            "gradient is not trivially zero"
        );
        eprintln!("tied {tied} heads {heads}: worst relative FD error {worst:.2e}");
    }
}

#[test]
fn char_lm_has_the_documented_size_and_layout() {
    let spec = LmSpec::char_lm(83);
    spec.validate().unwrap();
    let c = 128;
    let block = 2 * c + 3 * c * c + 3 * c + c * c + c + 2 * c + 4 * c * c + 4 * c + 4 * c * c + c;
    assert_eq!(spec.param_count(), 83 * c + 64 * c + 4 * block + 2 * c);
    assert!(
        (790_000..830_000).contains(&spec.param_count()),
        "{}",
        spec.param_count()
    );
    let l = spec.layout();
    assert_eq!(
        (l.tok, l.pos, l.blocks[0].ln1_gamma),
        (0, 83 * c, 83 * c + 64 * c)
    );
    assert_eq!(l.blocks[1].ln1_gamma, l.blocks[0].proj_bias + c);
    assert_eq!(l.head, None);
    let untied = LmSpec {
        tied: false,
        ..spec
    };
    assert_eq!(untied.param_count(), spec.param_count() + c * 83 + 83);
    let p = spec.init_params(1);
    assert_eq!(p, spec.init_params(1));
    assert!(
        p[l.blocks[0].ln1_gamma..l.blocks[0].ln1_beta]
            .iter()
            .all(|g| *g == 1.0)
    );
    let tok = &p[..83 * c];
    let var = tok.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / tok.len() as f64;
    assert!(
        (var.sqrt() - INIT_STD).abs() < 0.1 * INIT_STD,
        "tok std {}",
        var.sqrt()
    );
}

#[test]
fn invalid_specs_and_batches_are_rejected_with_reasons() {
    let bad = |json: &str| LmSpec::from_json(json).unwrap_err();
    assert_eq!(
        bad(r#"{"vocab":1,"context":4,"width":8,"heads":2,"layers":1}"#),
        LmSpecError::Vocab(1)
    );
    assert_eq!(
        bad(r#"{"vocab":5,"context":0,"width":8,"heads":2,"layers":1}"#),
        LmSpecError::Context(0)
    );
    assert_eq!(
        bad(r#"{"vocab":5,"context":4,"width":8,"heads":3,"layers":1}"#),
        LmSpecError::Heads { width: 8, heads: 3 }
    );
    assert_eq!(
        bad(r#"{"vocab":5,"context":4,"width":8,"heads":2,"layers":0}"#),
        LmSpecError::Layers(0)
    );
    assert!(
        matches!(bad(r#"{"vocab":5,"context":4,"width":8,"heads":2,"layers":1,"dropout":0.1}"#), LmSpecError::Json(m) if m.contains("dropout"))
    );
    assert!(matches!(
        bad(r#"{"vocab":1000000,"context":4096,"width":8192,"heads":2,"layers":32}"#),
        LmSpecError::TooManyParams(_)
    ));
    let spec =
        LmSpec::from_json(r#"{"vocab":5,"context":4,"width":8,"heads":2,"layers":1}"#).unwrap();
    assert!(!spec.tied);
    let p = spec.init_params(0);
    let run =
        |ids: &[u32], t: &[u32], b, s| forward_backward(&Fast, &spec, &p, ids, t, b, s).map(|_| ());
    assert_eq!(
        run(&[0, 1, 5, 2], &[0; 4], 1, 4),
        Err(LmBatchError::TokenRange {
            position: 2,
            id: 5,
            vocab: 5
        })
    );
    assert_eq!(
        run(&[0; 4], &[0, 0, 0, 9], 1, 4),
        Err(LmBatchError::TokenRange {
            position: 3,
            id: 9,
            vocab: 5
        })
    );
    assert_eq!(
        run(&[0; 5], &[0; 5], 1, 5),
        Err(LmBatchError::TooLong { seq: 5, context: 4 })
    );
    assert_eq!(
        run(&[0; 6], &[0; 8], 2, 4),
        Err(LmBatchError::Shape {
            got: 6,
            batch: 2,
            seq: 4
        })
    );
    assert_eq!(run(&[], &[], 0, 4), Err(LmBatchError::Empty));
    assert_eq!(
        forward_backward(&Fast, &spec, &p[1..], &[0; 4], &[0; 4], 1, 4).map(|_| ()),
        Err(LmBatchError::ParamCount {
            got: p.len() - 1,
            expected: p.len()
        })
    );
}

#[test]
fn a_few_adam_steps_learn_a_repeating_sequence() {
    // The pattern 0 1 2 3 0 1 2 3 ... is fully predictable from one token of context: loss must fall far below
    // ln(vocab) within a few dozen steps, on the fast path, with the optimizer the coordinator applies.
    let spec = LmSpec {
        vocab: 5,
        context: 8,
        width: 16,
        heads: 2,
        layers: 1,
        tied: true,
    };
    let mut params = spec.init_params(2);
    let mut opt = crate::optim::Optimizer::new(
        crate::optim::OptimizerSpec::Adam {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        params.len(),
    );
    let stream: Vec<u32> = (0..64).map(|i| i % 4).collect();
    let (ids, targets) = (&stream[..8 * 4], &stream[1..8 * 4 + 1]);
    let first = forward_backward(&Fast, &spec, &params, ids, targets, 4, 8)
        .unwrap()
        .loss;
    let mut last = first;
    for _ in 0..60 {
        let out = forward_backward(&Fast, &spec, &params, ids, targets, 4, 8).unwrap();
        opt.step(&mut params, &out.grad);
        last = out.loss;
    }
    assert!(first > 1.4 && last < 0.1, "loss {first} -> {last}");
    let text = sample::generate(&spec, &params, &[0, 1], 6, 0.0, 1).unwrap();
    assert_eq!(text, vec![2, 3, 0, 1, 2, 3]);
}

#[test]
fn sampling_is_seeded_and_respects_temperature() {
    let mut rng = SplitMix64::new(1);
    assert_eq!(sample::draw(&[0.0, 3.0, 1.0], 0.0, &mut rng), 1);
    let counts = |t: f32| {
        let mut rng = SplitMix64::new(9);
        let mut c = [0u32; 3];
        for _ in 0..2000 {
            c[sample::draw(&[0.0, 1.0, 2.0], t, &mut rng) as usize] += 1;
        }
        c
    };
    let (cold, hot) = (counts(0.25), counts(4.0));
    assert!(cold[2] > 1900, "{cold:?}");
    assert!(hot.iter().all(|c| *c > 450), "{hot:?}");
    let spec = tiny(true, 2, 6);
    let p = spec.init_params(4);
    let a = sample::generate(&spec, &p, &[1, 2], 12, 1.0, 7).unwrap();
    assert_eq!(a, sample::generate(&spec, &p, &[1, 2], 12, 1.0, 7).unwrap());
    assert_eq!(a.len(), 12);
    assert!(a.iter().all(|t| *t < spec.vocab));
    assert!(
        sample::generate(&spec, &p, &[9], 1, 1.0, 7).is_err(),
        "a prompt outside the vocabulary is refused"
    );
}

fn as_features(ids: &[u32]) -> Vec<f32> {
    ids.iter().map(|&i| i as f32).collect()
}

#[test]
fn lm_spec_as_a_layer_graph_has_the_same_layout() {
    for tied in [true, false] {
        let spec = LmSpec {
            vocab: 11,
            context: 9,
            width: 12,
            heads: 3,
            layers: 2,
            tied,
        };
        let graph = spec.model_spec();
        graph.validate().unwrap();
        assert_eq!(graph.param_count(), spec.param_count());
        assert_eq!(graph.classes(), 11);
        assert_eq!(graph.labels_per_row(), 9);
        assert_eq!(graph.token_vocab(), Some(11));
        let l = spec.layout();
        let plans = graph.plan();
        assert!(matches!(plans[0].op, crate::spec::Op::Embedding { table, .. } if table == l.tok));
        assert!(
            matches!(plans[1].op, crate::spec::Op::PositionalEmbedding { table, .. } if table == l.pos)
        );
        assert!(
            matches!(plans[3].op, crate::spec::Op::TransformerBlock { block, .. } if block == l.blocks[1])
        );
        assert!(
            matches!(plans[4].op, crate::spec::Op::LayerNorm { gamma, .. } if gamma == l.lnf_gamma)
        );
        assert!(matches!(plans[5].op, crate::spec::Op::LmHead { head, .. } if head == l.head));
        // The JSON form round-trips through the owner-facing parser.
        let json = serde_json::to_string(&graph).unwrap();
        assert!(
            json.contains(r#""type":"transformer_block","heads":3"#),
            "{json}"
        );
        assert_eq!(crate::ModelSpec::from_json(&json).unwrap(), graph);
    }
}

#[test]
fn graph_passes_match_the_composition_on_both_kernels() {
    for (tied, heads, seq, batch) in [(true, 3, 17, 2), (false, 1, 17, 2), (true, 3, 1, 3)] {
        let spec = LmSpec {
            vocab: 11,
            context: seq as u32,
            width: 24,
            heads,
            layers: 2,
            tied,
        };
        let graph = spec.model_spec();
        let params = noisy_params(&spec, 6, 0.05);
        let mut rng = SplitMix64::new(12);
        let ids = tokens(batch * seq, spec.vocab, &mut rng);
        let targets = tokens(batch * seq, spec.vocab, &mut rng);
        let what = format!("tied {tied} heads {heads} seq {seq}");
        let want =
            forward_backward(&Reference, &spec, &params, &ids, &targets, batch, seq).unwrap();
        let got = crate::reference::forward_backward(&graph, &params, &as_features(&ids), &targets)
            .unwrap();
        assert!(
            (got.loss - want.loss).abs() < 1e-6 * want.loss.abs().max(1.0),
            "{what}"
        );
        assert_eq!(got.correct, want.correct, "{what}");
        assert!(
            rel_l2(&got.grad, &want.grad) < 1e-6,
            "reference graph {what}: {}",
            rel_l2(&got.grad, &want.grad)
        );
        let mut engine = crate::cpu::CpuEngine::new(graph.clone());
        engine.load(&params).unwrap();
        let fast = engine.step(&as_features(&ids), &targets).unwrap();
        assert!(
            (fast.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0),
            "{what}"
        );
        assert!(
            rel_l2(&fast.grad, &want.grad) < 1e-4,
            "cpu engine {what}: {}",
            rel_l2(&fast.grad, &want.grad)
        );
        let e = engine.evaluate(&as_features(&ids), &targets).unwrap();
        assert_eq!(e.rows, (batch * seq) as u32);
        assert!((e.loss - want.loss).abs() < 1e-5, "{what}");
    }
}

#[test]
fn misplaced_transformer_layers_and_bad_token_batches_are_refused() {
    use crate::{BatchError, ModelSpec, SpecError};
    let bad = |json: &str| match ModelSpec::from_json(json).unwrap_err() {
        SpecError::Layer {
            layer,
            kind,
            reason,
        } => format!("{layer} {kind}: {reason}"),
        other => panic!("{other:?}"),
    };
    let e = bad(r#"{"input":[8],"layers":[{"type":"positional_embedding"},{"type":"lm_head"}]}"#);
    assert!(
        e.starts_with("0 positional_embedding") && e.contains("needs a sequence"),
        "{e}"
    );
    let e = bad(
        r#"{"input":[1,4,4],"layers":[{"type":"embedding","vocab":5,"width":8},{"type":"lm_head"}]}"#,
    );
    assert!(e.contains("row of token ids"), "{e}");
    let e = bad(
        r#"{"input":[8],"layers":[{"type":"embedding","vocab":5,"width":8},{"type":"transformer_block","heads":3},{"type":"lm_head"}]}"#,
    );
    assert!(
        e.starts_with("1 transformer_block") && e.contains("heads must divide the width 8"),
        "{e}"
    );
    let e = bad(
        r#"{"input":[8],"layers":[{"type":"embedding","vocab":1,"width":8},{"type":"lm_head"}]}"#,
    );
    assert!(e.contains("vocab must be between 2"), "{e}");
    let e = bad(r#"{"input":[1,4,4],"layers":[{"type":"flatten"},{"type":"lm_head"}]}"#);
    assert!(e.starts_with("1 lm_head") && e.contains("sequence"), "{e}");
    let e = bad(
        r#"{"input":[8],"layers":[{"type":"embedding","vocab":5,"width":8},{"type":"dense","units":3}]}"#,
    );
    assert!(e.contains("dense needs a flat input"), "{e}");
    // A classifier may not end in a transformer block: its logits come from dense or lm_head.
    assert_eq!(
        ModelSpec::from_json(
            r#"{"input":[8],"layers":[{"type":"embedding","vocab":5,"width":8},{"type":"transformer_block","heads":2}]}"#
        ),
        Err(SpecError::LastActivation)
    );
    let spec = LmSpec {
        vocab: 5,
        context: 4,
        width: 8,
        heads: 2,
        layers: 1,
        tied: true,
    }
    .model_spec();
    let p = spec.init_params(1);
    let step =
        |x: &[f32], y: &[u32]| crate::reference::forward_backward(&spec, &p, x, y).map(|_| ());
    assert_eq!(step(&[0.0, 1.0, 4.0, 2.0], &[0, 0, 0, 0]), Ok(()));
    assert_eq!(
        step(&[0.0, 1.0, 5.0, 2.0], &[0; 4]),
        Err(BatchError::TokenId {
            row: 0,
            position: 2,
            value: 5.0,
            vocab: 5
        })
    );
    assert_eq!(
        step(&[0.0, 1.0, 1.0, 2.0, 0.0, 0.5, 1.0, 1.0], &[0; 8]),
        Err(BatchError::TokenId {
            row: 1,
            position: 1,
            value: 0.5,
            vocab: 5
        })
    );
    assert_eq!(
        step(&[0.0; 4], &[0; 3]),
        Err(BatchError::LabelShape { got: 3, per_row: 4 })
    );
    assert_eq!(
        step(&[0.0; 4], &[0, 0, 5, 0]),
        Err(BatchError::LabelRange {
            row: 0,
            label: 5,
            classes: 5
        })
    );
    assert!(matches!(
        step(&[0.0; 4], &[0; 8]),
        Err(BatchError::FeatureShape { .. })
    ));
}

#[test]
fn fast_gelu_matches_the_reference_across_its_range() {
    let x: Vec<f32> = (-4000..=4000)
        .map(|i| i as f32 * 0.005)
        .chain([-1e4, -60.0, 60.0, 1e4, 0.0])
        .collect();
    let dy: Vec<f32> = x.iter().map(|v| 1.0 + 0.1 * v.sin()).collect();
    let (mut want, mut got) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    Reference.gelu_forward(&x, &mut want);
    Fast.gelu_forward(&x, &mut got);
    for ((w, g), v) in want.iter().zip(&got).zip(&x) {
        assert!(
            (w - g).abs() <= 1e-6 * (1.0 + w.abs()),
            "gelu({v}): {g} vs {w}"
        );
    }
    Reference.gelu_backward(&x, &dy, &mut want);
    Fast.gelu_backward(&x, &dy, &mut got);
    for ((w, g), v) in want.iter().zip(&got).zip(&x) {
        assert!(
            (w - g).abs() <= 1e-5 * (1.0 + w.abs()),
            "gelu'({v}): {g} vs {w}"
        );
    }
}
