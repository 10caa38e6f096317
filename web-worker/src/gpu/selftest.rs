//! A kernel self-test that runs wherever the worker runs: every matmul variant the adapter can run, in all three
//! forms on shapes that are not tile multiples, against the CPU backend's SGEMM, plus one full training step of the
//! GPU engine on the blocked kernel against the CPU engine, and one of a small language model (issue 13: embeddings,
//! causal attention, tied head). The browser test calls it through the wasm export
//! `kernel_selftest` (WebGPU on SwiftShader); `tests/kernels.rs` runs it on lavapipe, so both adapters check the
//! same thing.

use starling_core::cpu::{CpuEngine, sgemm};
use starling_core::reference::MatmulForm;
use starling_core::rng::SplitMix64;
use starling_core::transformer::LmSpec;
use starling_core::{ModelSpec, StepOutput};

use super::{BlockTile, GpuContext, GpuEngine, GpuError, MatmulKernel, MatmulVariant, matmul_on};

/// Shapes of the matmul checks: tiny, prime-ish, several tiles with ragged edges, and the MLP's first layer at
/// batch 37 in its three backprop orientations.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (7, 13, 5),
    (65, 127, 33),
    (37, 784, 128),
    (784, 37, 128),
    (37, 128, 784),
    (130, 17, 257),
];

/// Relative L2 distance the full step's gradient may have from the CPU engine's (as in `tests/kernels.rs`).
pub const STEP_TOLERANCE: f64 = 1e-4;

/// What the self-test found; `failures` is empty when everything agreed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelfTestReport {
    pub adapter: String,
    /// Every variant checked, as displayed in the adapter label.
    pub variants: Vec<String>,
    /// Matmul results compared (variants × forms × shapes).
    pub checks: usize,
    /// The largest |gpu − cpu| / tolerance seen over all elements (≤ 1 passes).
    pub worst_ratio: f64,
    /// The blocked engine's full-step gradient vs the CPU engine: relative L2 distance.
    pub step_rel_l2: f64,
    /// Milliseconds per 784-128-10 training step at batch 64 (mean of 3 after a warm-up), per matmul variant:
    /// informative only (this is a test, not a benchmark), so the browser log shows what SwiftShader runs at.
    pub step_ms: Vec<(String, f64)>,
    /// A small LM's full-step gradient (vocab 83, context 17, width 24, 3 heads, 2 blocks, tied) on the adapter's
    /// own matmul vs the CPU engine: relative L2 distance.
    pub lm_step_rel_l2: f64,
    pub failures: Vec<String>,
}

/// The variants this adapter can run: the tiled kernel, each blocked tile alone, the blocked shape table, and the
/// adapter's own choice where it is another (the subgroup kernel).
pub fn variants(ctx: &GpuContext) -> Vec<MatmulVariant> {
    let mut v = vec![MatmulVariant::Tiled];
    v.extend(
        BlockTile::ALL
            .iter()
            .filter(|t| t.fits(&ctx.limits))
            .map(|t| MatmulVariant::BlockedFixed(*t)),
    );
    v.push(MatmulVariant::Blocked {
        largest: BlockTile::LARGE,
    });
    if !v.contains(&ctx.variant) {
        v.push(ctx.variant);
    }
    v
}

/// Runs every check; a kernel that disagrees is a failure in the report, a GPU error is an `Err`.
pub async fn run(ctx: &GpuContext) -> Result<SelfTestReport, GpuError> {
    let mut rng = SplitMix64::new(15);
    let mut report = SelfTestReport {
        adapter: ctx.summary().label(),
        variants: Vec::new(),
        checks: 0,
        worst_ratio: 0.0,
        step_rel_l2: 0.0,
        step_ms: Vec::new(),
        lm_step_rel_l2: 0.0,
        failures: Vec::new(),
    };
    for variant in variants(ctx) {
        report.variants.push(variant.to_string());
        let kernel = MatmulKernel::new(ctx, variant);
        for form in [MatmulForm::AB, MatmulForm::AtB, MatmulForm::ABt] {
            for (m, k, n) in SHAPES {
                let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                let gpu = matmul_on(ctx, &kernel, form, m, k, n, &a, &b).await?;
                let mut cpu = vec![0.0; m * n];
                sgemm(form, m, k, n, &a, &b, 0.0, &mut cpu);
                // Tolerance: each side is an f32 dot product within k·ε·Σ|a·b| of the exact value, so they are
                // within twice that of each other; 1e-6 absorbs round-off of tiny sums.
                let (a_rs, a_cs, b_rs, b_cs) = form.strides(m, k, n);
                let mut worst = (0.0f64, 0usize);
                for i in 0..m {
                    for j in 0..n {
                        let abs: f64 = (0..k)
                            .map(|p| (a[i * a_rs + p * a_cs] * b[p * b_rs + j * b_cs]).abs() as f64)
                            .sum();
                        let tol = 2.0 * k as f64 * f32::EPSILON as f64 * abs + 1e-6;
                        let ratio = (gpu[i * n + j] as f64 - cpu[i * n + j] as f64).abs() / tol;
                        if ratio > worst.0 || ratio.is_nan() {
                            worst = (ratio, i * n + j);
                        }
                    }
                }
                report.checks += 1;
                report.worst_ratio = report.worst_ratio.max(worst.0);
                let within = worst.0 <= 1.0; // false for NaN too
                if !within {
                    let e = worst.1;
                    report.failures.push(format!(
                        "{variant} {form:?} {m}x{k}x{n} at ({}, {}): gpu {} vs cpu {}",
                        e / n,
                        e % n,
                        gpu[e],
                        cpu[e]
                    ));
                }
            }
        }
    }

    // One full training step of the 784-128-10 MLP on the blocked kernel's shape table vs the CPU engine.
    let spec = ModelSpec::mnist_mlp();
    let params = spec.init_params(2);
    let rows = 37;
    let x: Vec<f32> = (0..rows * spec.input_len())
        .map(|_| rng.next_f64() as f32)
        .collect();
    let labels: Vec<u32> = (0..rows)
        .map(|_| rng.below(spec.classes() as u64) as u32)
        .collect();
    let blocked = ctx.with_matmul_variant(MatmulVariant::Blocked {
        largest: BlockTile::LARGE,
    });
    let mut engine = GpuEngine::new(&blocked, spec.clone())?;
    engine.load(&params).await?;
    let gpu = engine.step(&x, &labels).await?;
    let mut cpu_engine = CpuEngine::new(spec.clone());
    let cpu = cpu_engine
        .load(&params)
        .and_then(|()| cpu_engine.step(&x, &labels))
        .map_err(GpuError::Batch)?;
    report.step_rel_l2 = rel_l2(&gpu, &cpu);
    let rows = 64;
    let x: Vec<f32> = (0..rows * spec.input_len())
        .map(|_| rng.next_f64() as f32)
        .collect();
    let labels: Vec<u32> = (0..rows).map(|i| (i % 10) as u32).collect();
    for variant in [MatmulVariant::Tiled, blocked.variant] {
        let mut engine = GpuEngine::new(&ctx.with_matmul_variant(variant), spec.clone())?;
        engine.load(&params).await?;
        engine.step(&x, &labels).await?;
        let start = crate::session::now_ms();
        for _ in 0..3 {
            engine.step(&x, &labels).await?;
        }
        let ms = (crate::session::now_ms() - start) / 3.0;
        report
            .step_ms
            .push((variant.to_string(), (ms * 10.0).round() / 10.0));
    }
    let within = report.step_rel_l2 < STEP_TOLERANCE; // false for NaN too
    if !within || gpu.correct != cpu.correct {
        report.failures.push(format!(
            "blocked training step: gradient rel L2 {:e} (tolerance {STEP_TOLERANCE:e}), correct {} vs {}",
            report.step_rel_l2, gpu.correct, cpu.correct
        ));
    }
    lm_step(ctx, &mut rng, &mut report).await?;
    Ok(report)
}

/// One training step of a small LM on the GPU engine against the CPU engine, into `report`.
async fn lm_step(
    ctx: &GpuContext,
    rng: &mut SplitMix64,
    report: &mut SelfTestReport,
) -> Result<(), GpuError> {
    let lm = LmSpec {
        vocab: 83,
        context: 17,
        width: 24,
        heads: 3,
        layers: 2,
        tied: true,
    };
    let spec = lm.model_spec();
    let params = lm.init_params(3);
    let rows = 3;
    let seq = lm.context as usize;
    let stream: Vec<u32> = (0..rows * seq + 1)
        .map(|_| rng.below(lm.vocab as u64) as u32)
        .collect();
    let x: Vec<f32> = stream[..rows * seq].iter().map(|&i| i as f32).collect();
    let labels = &stream[1..];
    let mut engine = GpuEngine::new(ctx, spec.clone())?;
    engine.load(&params).await?;
    let gpu = engine.step(&x, labels).await?;
    let mut cpu_engine = CpuEngine::new(spec);
    let cpu = cpu_engine
        .load(&params)
        .and_then(|()| cpu_engine.step(&x, labels))
        .map_err(GpuError::Batch)?;
    report.lm_step_rel_l2 = rel_l2(&gpu, &cpu);
    let within = report.lm_step_rel_l2 < STEP_TOLERANCE; // false for NaN too
    if !within || gpu.correct != cpu.correct {
        report.failures.push(format!(
            "LM training step: gradient rel L2 {:e} (tolerance {STEP_TOLERANCE:e}), correct {} vs {}",
            report.lm_step_rel_l2, gpu.correct, cpu.correct
        ));
    }
    Ok(())
}

fn rel_l2(a: &StepOutput, b: &StepOutput) -> f64 {
    let num: f64 = a
        .grad
        .iter()
        .zip(&b.grad)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.grad.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
