//! `starling-bench kernels`: our WGSL kernels vs burn-wgpu vs the CPU backend, measured side by side in one run.
//!
//! Prints a table, then as its last line one JSON object:
//! `{"adapter": "...", "matmul": [{"n", "ours_gflops", "tiled_gflops", "blocked_gflops", "burn_gflops", "cpu_gflops"}...],
//! "step": [{"batch", "gpu_ms", "cpu_ms"}...]}`. The MLP shapes per kernel (without burn) are in
//! `cargo run --release -p starling-worker --example matmul_bench`.
//! Everything runs on the same adapter (wgpu's high-performance pick, lavapipe on a GPU-less machine); burn is
//! warmed up first because its first matmul pays 10–20 s of JIT and autotuning.

use std::time::Instant;

use anyhow::{Context as _, bail};
use burn::prelude::{Device, DeviceKind, Tensor};
use burn::tensor::Distribution;
use serde_json::json;
use starling_core::ModelSpec;
use starling_core::cpu::{CpuEngine, sgemm};
use starling_core::reference::MatmulForm;
use starling_core::rng::SplitMix64;
use starling_worker::gpu::{BlockTile, GpuContext, GpuEngine, MatmulKernel, MatmulVariant};

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
    println!("{}", json!({"adapter": adapter, "matmul": matmul_rows, "step": step_rows}));
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
