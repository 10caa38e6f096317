//! The language-model rows of `starling-bench kernels` (issue 13): the causal attention core at the demo LM's
//! shapes, forward and backward, ours vs burn-wgpu — its matmul, mask, softmax and matmul composed (the backward
//! written out the same way: burn's fused `module::attention` has no backward), plus its fused causal forward —
//! then the demo LM's whole micro-batch step per backend. Ours is timed with both of its kernels side by side: the
//! per-row one the engine uses and the workgroup-tiled one (`AttnVariant`).

use std::time::Instant;

use anyhow::Context as _;
use burn::prelude::{Device, Tensor};
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Distribution};
use serde_json::json;
use starling_core::cpu::CpuEngine;
use starling_core::rng::SplitMix64;
use starling_core::transformer::{AttnDims, LmSpec};
use starling_worker::gpu::{AttnVariant, GpuContext, GpuEngine, Kernels, ops};

use crate::{round2, step_ms};

/// The demo char-level LM (`LmSpec::char_lm`: 4 blocks, 4 heads, width 128, context 64) at batch 12, with
/// Moby-Dick's vocabulary size.
const BATCH: usize = 12;
const VOCAB: u32 = 83;

/// Prints the attention and LM step tables; returns their JSON rows `(attention, lm_step)`.
pub fn lm(
    ctx: &GpuContext,
    device: &Device,
) -> anyhow::Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    let spec = LmSpec::char_lm(VOCAB);
    let dims = AttnDims {
        batch: BATCH,
        seq: spec.context as usize,
        width: spec.width(),
        heads: spec.heads as usize,
    };
    let kernels = Kernels::new(ctx);
    let ours = ops::time_attention_with(&kernels, (dims, AttnVariant::PerRow), 10)?;
    let tiled = ops::time_attention_with(&kernels, (dims, AttnVariant::Tiled), 10)?;
    let (burn_f, burn_b) = burn_attention_ms(device, dims)?;
    let fused = burn_fused_forward_ms(device, dims)?;
    let fused_text = fused.map_or("n/a".to_string(), |ms| format!("{ms:.2}"));
    println!();
    println!(
        "causal attention core, batch {} × {} heads × context {} × head width {}, ms per pass (lower is better)",
        dims.batch,
        dims.heads,
        dims.seq,
        dims.head_width()
    );
    println!(
        "{:>11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>16} {:>10} {:>14}",
        "ours fwd",
        "ours bwd",
        "tiled fwd",
        "tiled bwd",
        "burn fwd",
        "burn bwd",
        "burn fused fwd",
        "burn/ours",
        "tiled/ours"
    );
    let total = ours.forward_ms + ours.backward_ms;
    let ratio = (burn_f + burn_b) / total;
    let gain = (tiled.forward_ms + tiled.backward_ms) / total;
    println!(
        "{:>11.2} {:>11.2} {:>9.2} {:>9.2} {burn_f:>9.2} {burn_b:>9.2} {fused_text:>16} {ratio:>10.2} {gain:>14.2}",
        ours.forward_ms, ours.backward_ms, tiled.forward_ms, tiled.backward_ms
    );
    println!("(ours: the per-row kernels the engine runs; tiled: the workgroup-tiled ones, times over ours)");
    let attention = vec![
        json!({"batch": dims.batch, "heads": dims.heads, "seq": dims.seq, "width": dims.width,
        "ours_fwd_ms": round2(ours.forward_ms), "ours_bwd_ms": round2(ours.backward_ms),
        "tiled_fwd_ms": round2(tiled.forward_ms), "tiled_bwd_ms": round2(tiled.backward_ms),
        "burn_fwd_ms": round2(burn_f), "burn_bwd_ms": round2(burn_b), "burn_fused_fwd_ms": fused.map(round2)}),
    ];

    let graph = spec.model_spec();
    let params = spec.init_params(1);
    let mut gpu = GpuEngine::new(ctx, graph.clone())?;
    pollster::block_on(gpu.load(&params))?;
    let mut cpu = CpuEngine::new(graph);
    cpu.load(&params)?;
    let mut rng = SplitMix64::new(5);
    let seq = dims.seq;
    let stream: Vec<u32> = (0..BATCH * seq + 1)
        .map(|_| rng.below(VOCAB as u64) as u32)
        .collect();
    let x: Vec<f32> = stream[..BATCH * seq].iter().map(|&i| i as f32).collect();
    let y = &stream[1..];
    let gpu_ms = step_ms(|| Ok(pollster::block_on(gpu.step(&x, y)).map(drop)?))?;
    let cpu_ms = step_ms(|| Ok(cpu.step(&x, y).map(drop)?))?;
    println!();
    println!(
        "demo LM ({} parameters) forward + backward micro-batch step at batch {BATCH}, ms (lower is better)",
        spec.param_count()
    );
    println!(
        "{:>6} {:>10} {:>10} {:>8}",
        "batch", "gpu", "cpu", "cpu/gpu"
    );
    println!(
        "{BATCH:>6} {gpu_ms:>10.2} {cpu_ms:>10.2} {:>8.2}",
        cpu_ms / gpu_ms
    );
    let step = vec![json!({"batch": BATCH, "gpu_ms": round2(gpu_ms), "cpu_ms": round2(cpu_ms)})];
    Ok((attention, step))
}

/// burn-wgpu's attention core on `[B, H, T, D]` tensors: forward `softmax(mask(q·kᵀ/√D))·v`; backward `dv = pᵀ·dy`,
/// `dp = dy·vᵀ`, `ds = p ⊙ (dp − rowsum(dp ⊙ p))`, `dq = ds·k/√D`, `dk = dsᵀ·q/√D` (the math of our kernels, in
/// burn's head-major layout). Each the mean of 10 runs after a warm-up that pays the JIT and autotuning.
fn burn_attention_ms(device: &Device, dims: AttnDims) -> anyhow::Result<(f64, f64)> {
    let (b, h, t, d) = (dims.batch, dims.heads, dims.seq, dims.head_width());
    let scale = 1.0 / (d as f64).sqrt();
    let rand = || Tensor::<4>::random([b, h, t, d], Distribution::Default, device);
    let (q, k, v, dy) = (rand(), rand(), rand(), rand());
    // True strictly above the diagonal: the future each query must not see (built `[1, 1, T, T]`, expanded).
    let mask = Tensor::<4, Bool>::tril_mask([b, h, t, t], 0, device).expand([b, h, t, t]);
    let forward = || {
        let s = q
            .clone()
            .matmul(k.clone().swap_dims(2, 3))
            .mul_scalar(scale)
            .mask_fill(mask.clone(), -1.0e9);
        let p = softmax(s, 3);
        let y = p.clone().matmul(v.clone());
        (p, y)
    };
    let (p, _) = forward();
    let backward = || {
        let dv = p.clone().swap_dims(2, 3).matmul(dy.clone());
        let dp = dy.clone().matmul(v.clone().swap_dims(2, 3));
        let row = (dp.clone() * p.clone()).sum_dim(3);
        let ds = p.clone() * (dp - row);
        let dq = ds.clone().matmul(k.clone()).mul_scalar(scale);
        let dk = ds.swap_dims(2, 3).matmul(q.clone()).mul_scalar(scale);
        (dq, dk, dv)
    };
    for _ in 0..3 {
        let _ = forward().1.into_data();
        let (dq, dk, dv) = backward();
        let _ = (dq.into_data(), dk.into_data(), dv.into_data());
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

/// burn-wgpu's fused causal `module::attention` forward at the same shape (mean of 10 runs after a warm-up), or
/// `None` when this adapter cannot run it (the call panics rather than returning an error).
fn burn_fused_forward_ms(device: &Device, dims: AttnDims) -> anyhow::Result<Option<f64>> {
    let (b, h, t, d) = (dims.batch, dims.heads, dims.seq, dims.head_width());
    let rand = || Tensor::<4>::random([b, h, t, d], Distribution::Default, device);
    let (q, k, v) = (rand(), rand(), rand());
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    let forward = || attention(q.clone(), k.clone(), v.clone(), None, None, options);
    let warm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..3 {
            let _ = forward().into_data();
        }
    }));
    if warm.is_err() {
        eprintln!("burn's fused attention does not run on this adapter; its column is n/a");
        return Ok(None);
    }
    device.sync().context("burn sync")?;
    let reps = 10;
    let start = Instant::now();
    let outs: Vec<_> = (0..reps).map(|_| forward()).collect();
    device.sync().context("burn sync")?;
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    drop(outs);
    Ok(Some(ms))
}
