//! `starling-bench kernels`: our WGSL kernels vs burn-wgpu vs the CPU backend, measured side by side in one run.
//!
//! Prints a table, then as its last line one JSON object:
//! `{"adapter": "...", "matmul": [{"n", "ours_gflops", "tiled_gflops", "blocked_gflops", "burn_gflops", "cpu_gflops"}...],
//! "step": [{"batch", "gpu_ms", "cpu_ms"}...], "conv": [{"layer", "batch", "ours_fwd_ms", "ours_bwd_ms", "burn_fwd_ms",
//! "burn_bwd_ms", "cpu_fwd_ms", "cpu_bwd_ms"}...], "cnn_step": [{"batch", "gpu_ms", "cpu_ms"}...], "attention": [{"batch",
//! "heads", "seq", "width", "ours_fwd_ms", "ours_bwd_ms", "burn_fwd_ms", "burn_bwd_ms", "burn_fused_fwd_ms"}], "lm_step": [{"batch", "gpu_ms",
//! "cpu_ms"}]}`. The MLP shapes per kernel (without burn) are in
//! `cargo run --release -p starling-worker --example matmul_bench`.
//! Everything runs on the same adapter (wgpu's high-performance pick, lavapipe on a GPU-less machine); burn is
//! warmed up first because its first matmul pays 10–20 s of JIT and autotuning.

mod lm; // The causal attention core vs burn-wgpu and the demo LM's step per backend (issue 13).

use std::time::Instant;

use anyhow::{Context as _, bail};
use burn::prelude::{Device, DeviceKind, Tensor};
use burn::tensor::Distribution;
use burn::tensor::module::{conv_transpose2d, conv2d, conv2d_weight_backward};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use serde_json::json;
use starling_core::ModelSpec;
use starling_core::cpu::{CpuEngine, sgemm};
use starling_core::reference::MatmulForm;
use starling_core::rng::SplitMix64;
use starling_worker::gpu::{
    BlockTile, ConvLayer, ConvShape, GpuContext, GpuEngine, Kernels, MatmulKernel, MatmulVariant, ops,
};

const SIZES: [usize; 3] = [256, 512, 1024];
const BATCHES: [usize; 2] = [64, 256];

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("kernels") | None => kernels(),
        Some(other) => bail!("unknown benchmark {other:?}; usage: starling-bench kernels"),
    }
}

/// Repetitions so that each measurement lasts roughly a fixed amount of work (about 4 GFLOP, at least 3 runs).
fn reps(n: usize) -> usize {
    (4e9 / (2.0 * (n * n * n) as f64)).ceil().clamp(3.0, 100.0) as usize
}

fn gflops(n: usize, reps: usize, secs: f64) -> f64 {
    2.0 * (n * n * n * reps) as f64 / secs / 1e9
}

fn burn_gflops(device: &Device, n: usize) -> anyhow::Result<f64> {
    let a = Tensor::<2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, device);
    // Warm-up: JIT, autotune, and one materialised result.
    for _ in 0..3 {
        let _ = a.clone().matmul(b.clone()).into_data();
    }
    device.sync().context("burn sync")?;
    let reps = reps(n);
    let start = Instant::now();
    let outs: Vec<_> = (0..reps).map(|_| a.clone().matmul(b.clone())).collect();
    device.sync().context("burn sync")?;
    let secs = start.elapsed().as_secs_f64();
    drop(outs);
    Ok(gflops(n, reps, secs))
}

fn cpu_gflops(n: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    sgemm(MatmulForm::AB, n, n, n, &a, &b, 0.0, &mut c);
    let reps = reps(n);
    let start = Instant::now();
    for _ in 0..reps {
        sgemm(MatmulForm::AB, n, n, n, &a, &b, 0.0, &mut c);
    }
    gflops(n, reps, start.elapsed().as_secs_f64())
}

/// Mean milliseconds of one forward + backward micro-batch step (after two warm-up steps).
fn step_ms(mut step: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    step()?;
    step()?;
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        step()?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

fn kernels() -> anyhow::Result<()> {
    let ctx = pollster::block_on(GpuContext::new()).context("no WebGPU adapter")?;
    let adapter = ctx.summary().label();
    let ours = MatmulKernel::new(&ctx, ctx.matmul_variant());
    let tiled = MatmulKernel::new(&ctx, MatmulVariant::Tiled);
    // The register-blocked kernel (shaders/matmul_blocked.wgsl), the hardware default, with its per-shape tile.
    let blocked = MatmulKernel::new(
        &ctx,
        MatmulVariant::Blocked {
            largest: BlockTile::LARGE,
        },
    );
    eprintln!("adapter: {adapter}; warming up burn-wgpu (JIT + autotune)...");
    let device = Device::wgpu(DeviceKind::DefaultDevice);

    println!("matmul n×n×n, GFLOP/s (higher is better)");
    println!("{:>6} {:>14} {:>12} {:>14} {:>12} {:>12} {:>14}", "n", format!("ours({})", ours.variant()), "ours(tiled)", "ours(blocked)", "burn-wgpu", "cpu sgemm", "blocked/tiled");
    let mut matmul_rows = Vec::new();
    for n in SIZES {
        let ours_g = ours.time_gflops(&ctx, n, n, n, reps(n))?;
        let tiled_g = if ours.variant() == MatmulVariant::Tiled { ours_g } else { tiled.time_gflops(&ctx, n, n, n, reps(n))? };
        let blocked_g = blocked.time_gflops(&ctx, n, n, n, reps(n))?;
        let burn_g = burn_gflops(&device, n)?;
        let cpu_g = cpu_gflops(n);
        println!("{n:>6} {ours_g:>14.2} {tiled_g:>12.2} {blocked_g:>14.2} {burn_g:>12.2} {cpu_g:>12.2} {:>14.2}", blocked_g / tiled_g);
        matmul_rows.push(json!({"n": n, "ours_gflops": round2(ours_g), "tiled_gflops": round2(tiled_g), "blocked_gflops": round2(blocked_g), "burn_gflops": round2(burn_g), "cpu_gflops": round2(cpu_g)}));
    }

    let spec = ModelSpec::mnist_mlp();
    let params = spec.init_params(1);
    let mut gpu = GpuEngine::new(&ctx, spec.clone())?;
    pollster::block_on(gpu.load(&params))?;
    let mut cpu = CpuEngine::new(spec.clone());
    cpu.load(&params)?;
    println!();
    println!("784-128-10 forward + backward step, ms (lower is better)");
    println!("{:>6} {:>10} {:>10} {:>8}", "batch", "gpu", "cpu", "cpu/gpu");
    let mut step_rows = Vec::new();
    let mut rng = SplitMix64::new(3);
    for batch in BATCHES {
        let x: Vec<f32> = (0..batch * 784).map(|_| rng.next_f64() as f32).collect();
        let y: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
        let gpu_ms = step_ms(|| Ok(pollster::block_on(gpu.step(&x, &y)).map(drop)?))?;
        let cpu_ms = step_ms(|| Ok(cpu.step(&x, &y).map(drop)?))?;
        println!("{batch:>6} {gpu_ms:>10.2} {cpu_ms:>10.2} {:>8.2}", cpu_ms / gpu_ms);
        step_rows.push(json!({"batch": batch, "gpu_ms": round2(gpu_ms), "cpu_ms": round2(cpu_ms)}));
    }
    let (conv_rows, cnn_rows) = cnn(&ctx, &device)?;
    let (attention_rows, lm_rows) = lm::lm(&ctx, &device)?;
    println!("{}", json!({"adapter": adapter, "matmul": matmul_rows, "step": step_rows, "conv": conv_rows, "cnn_step": cnn_rows, "attention": attention_rows, "lm_step": lm_rows}));
    Ok(())
}

/// The demo CNN (`serve --demo-cnn`): conv 5×5×16 → relu → pool → conv 5×5×32 → relu → pool → dense 128 → dense 10.
fn demo_cnn() -> anyhow::Result<ModelSpec> {
    Ok(ModelSpec::from_json(
        r#"{"input": [1, 28, 28], "layers": [
            {"type": "conv2d", "out_channels": 16, "kernel": 5, "padding": 2}, {"type": "relu"},
            {"type": "max_pool2d", "kernel": 2},
            {"type": "conv2d", "out_channels": 32, "kernel": 5, "padding": 2}, {"type": "relu"},
            {"type": "max_pool2d", "kernel": 2},
            {"type": "flatten"}, {"type": "dense", "units": 128, "activation": "relu"}, {"type": "dense", "units": 10}]}"#,
    )?)
}

/// The CNN's conv layers at batch `CNN_BATCH` (forward; backward = weight, bias and input gradients) on our kernels,
/// burn-wgpu's conv2d (backward: `conv2d_weight_backward` + `conv_transpose2d`) and the CPU backend, then the whole
/// CNN micro-batch step on each backend.
fn cnn(ctx: &GpuContext, device: &Device) -> anyhow::Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    const CNN_BATCH: usize = 64;
    let spec = demo_cnn()?;
    let kernels = Kernels::new(ctx);
    // (name, in channels, side, out channels): the two conv layers of the demo CNN.
    let layers = [("conv1 1→16 28²", 1, 28, 16), ("conv2 16→32 14²", 16, 14, 32)];
    println!();
    println!("demo CNN conv layers (k5 p2) at batch {CNN_BATCH}, ms per pass (lower is better)");
    println!("{:>18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}", "layer", "ours fwd", "ours bwd", "burn fwd", "burn bwd", "cpu fwd", "cpu bwd", "burn/ours", "cpu/ours");
    let mut rows = Vec::new();
    for (name, c, side, oc) in layers {
        let layer = ConvLayer {
            shape: ConvShape { n: CNN_BATCH, c, h: side, w: side, kh: 5, kw: 5, stride: 1, pad: 2 },
            out_channels: oc,
            weight: 0,
            bias: oc * c * 25,
        };
        let t = ops::time_conv2d(&kernels, &layer, 10)?;
        let (ours_f, ours_b) = (t.forward_ms, t.backward_ms);
        let (burn_f, burn_b) = burn_conv_ms(device, CNN_BATCH, c, side, oc)?;
        let (cpu_f, cpu_b) = cpu_conv_ms(CNN_BATCH, c, side, oc)?;
        let (ours, burn) = (ours_f + ours_b, burn_f + burn_b);
        println!("{name:>18} {ours_f:>9.2} {ours_b:>9.2} {burn_f:>9.2} {burn_b:>9.2} {cpu_f:>9.2} {cpu_b:>9.2} {:>10.2} {:>10.2}", burn / ours, (cpu_f + cpu_b) / ours);
        rows.push(json!({"layer": name, "batch": CNN_BATCH, "ours_fwd_ms": round2(ours_f), "ours_bwd_ms": round2(ours_b), "burn_fwd_ms": round2(burn_f), "burn_bwd_ms": round2(burn_b), "cpu_fwd_ms": round2(cpu_f), "cpu_bwd_ms": round2(cpu_b)}));
    }

    let params = spec.init_params(1);
    let mut gpu = GpuEngine::new(ctx, spec.clone())?;
    pollster::block_on(gpu.load(&params))?;
    let mut cpu = CpuEngine::new(spec.clone());
    cpu.load(&params)?;
    println!();
    println!("demo CNN forward + backward micro-batch step, ms (lower is better)");
    println!("{:>6} {:>10} {:>10} {:>8}", "batch", "gpu", "cpu", "cpu/gpu");
    let mut step_rows = Vec::new();
    let mut rng = SplitMix64::new(4);
    for batch in [32, 64] {
        let x: Vec<f32> = (0..batch * 784).map(|_| rng.next_f64() as f32).collect();
        let y: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
        let gpu_ms = step_ms(|| Ok(pollster::block_on(gpu.step(&x, &y)).map(drop)?))?;
        let cpu_ms = step_ms(|| Ok(cpu.step(&x, &y).map(drop)?))?;
        println!("{batch:>6} {gpu_ms:>10.2} {cpu_ms:>10.2} {:>8.2}", cpu_ms / gpu_ms);
        step_rows.push(json!({"batch": batch, "gpu_ms": round2(gpu_ms), "cpu_ms": round2(cpu_ms)}));
    }
    Ok((rows, step_rows))
}

/// burn-wgpu's conv2d at one layer's shape: (forward ms, backward ms), each the mean of 10 runs after a warm-up
/// that pays the JIT and autotuning.
fn burn_conv_ms(device: &Device, n: usize, c: usize, side: usize, oc: usize) -> anyhow::Result<(f64, f64)> {
    let x = Tensor::<4>::random([n, c, side, side], Distribution::Default, device);
    let w = Tensor::<4>::random([oc, c, 5, 5], Distribution::Default, device);
    let b = Tensor::<1>::random([oc], Distribution::Default, device);
    let dy = Tensor::<4>::random([n, oc, side, side], Distribution::Default, device);
    let opts = || ConvOptions::new([1, 1], [2, 2], [1, 1], 1);
    let forward = || conv2d(x.clone(), w.clone(), Some(b.clone()), opts());
    let backward = || {
        let dw = conv2d_weight_backward(x.clone(), w.clone(), dy.clone(), opts());
        let db = dy.clone().sum_dim(0).sum_dim(2).sum_dim(3);
        let dx = conv_transpose2d(dy.clone(), w.clone(), None, ConvTransposeOptions::new([1, 1], [2, 2], [0, 0], [1, 1], 1));
        (dw, db, dx)
    };
    for _ in 0..3 {
        let _ = forward().into_data();
        let (dw, db, dx) = backward();
        let _ = (dw.into_data(), db.into_data(), dx.into_data());
    }
    device.sync().context("burn sync")?;
    let reps = 10;
    let start = Instant::now();
    let outs: Vec<_> = (0..reps).map(|_| forward()).collect();
    device.sync().context("burn sync")?;
    let fwd = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    drop(outs);
    let start = Instant::now();
    let outs: Vec<_> = (0..reps).map(|_| backward()).collect();
    device.sync().context("burn sync")?;
    let bwd = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    drop(outs);
    Ok((fwd, bwd))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The CPU backend at one conv layer's shape: `CpuEngine` on `[group_norm (1 group), conv2d, global max pool, dense 2]`,
/// whose cost is the conv's (the norm makes the conv compute its input gradient; the pool and the 2-unit dense
/// layer are a few percent). Forward = `evaluate`; backward = `step` − `evaluate`.
fn cpu_conv_ms(n: usize, c: usize, side: usize, oc: usize) -> anyhow::Result<(f64, f64)> {
    let spec = ModelSpec::from_json(&format!(
        r#"{{"input": [{c}, {side}, {side}], "layers": [{{"type": "group_norm", "groups": 1}},
            {{"type": "conv2d", "out_channels": {oc}, "kernel": 5, "padding": 2}},
            {{"type": "max_pool2d", "kernel": {side}}}, {{"type": "flatten"}}, {{"type": "dense", "units": 2}}]}}"#
    ))?;
    let mut cpu = CpuEngine::new(spec.clone());
    cpu.load(&spec.init_params(1))?;
    let mut rng = SplitMix64::new(5);
    let x: Vec<f32> = (0..n * spec.input_len()).map(|_| rng.next_f64() as f32).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.below(2) as u32).collect();
    let fwd = step_ms(|| Ok(cpu.evaluate(&x, &y).map(drop)?))?;
    let step = step_ms(|| Ok(cpu.step(&x, &y).map(drop)?))?;
    Ok((fwd, (step - fwd).max(0.0)))
}
