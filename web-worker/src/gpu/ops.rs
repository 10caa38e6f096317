//! One layer at a time on the GPU, for the kernel tests and the benchmark: each helper uploads its operands,
//! records exactly the dispatches the engine records for that layer (`layers`), runs them and reads back.

use starling_core::transformer::AttnDims;

use super::GpuError;
use super::kernels::{
    AttnVariant, ElementwiseAct, EmbedShape, EmbedTable, NormShape, PoolKind, PoolShape,
    stats_bytes,
};
use super::layers::{self, ConvLayer, Kernels};
use super::transfer::{self, Dispatch};
use super::transformer;

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

fn bytes(len: usize) -> u64 {
    (len * 4) as u64
}

fn expect(name: &'static str, got: usize, expected: usize) -> Result<(), GpuError> {
    if got == expected {
        Ok(())
    } else {
        Err(GpuError::Operand {
            name,
            got,
            expected,
        })
    }
}

/// conv2d forward over NCHW `x` (`[n, c, h, w]`): the weight `[oc, c, kh, kw]` at element `weight` and the bias
/// `[oc]` at element `bias` of `params`; `relu` fuses a following ReLU. Returns the NCHW output.
pub async fn conv2d_forward(
    k: &Kernels,
    layer: &ConvLayer,
    relu: bool,
    x: &[f32],
    params: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    let s = layer.shape;
    expect("x", x.len(), s.n * s.c * s.h * s.w)?;
    let x_buf = transfer::storage_init(ctx, "conv x", bytemuck::cast_slice(x))?;
    let p_buf = transfer::storage_init(ctx, "conv params", bytemuck::cast_slice(params))?;
    let col = transfer::storage(ctx, "conv col", bytes(layer.col_len()))?;
    let ymat = transfer::storage(ctx, "conv ymat", bytes(layer.out_len()))?;
    let y = transfer::storage(ctx, "conv y", bytes(layer.out_len()))?;
    let d = layers::conv_forward(k, layer, relu, &x_buf, &p_buf, &col, &ymat, &y);
    let out = transfer::run(ctx, "conv forward", &d, &[(&y, bytes(layer.out_len()))]).await?;
    Ok(f32s(&out[0]))
}

/// conv2d backward from the NCHW output gradient `dy`: returns (the gradient buffer, as long as `params`, with the
/// layer's weight and bias slots written and everything else 0; the input gradient).
pub async fn conv2d_backward(
    k: &Kernels,
    layer: &ConvLayer,
    x: &[f32],
    dy: &[f32],
    params: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
    let ctx = k.ctx();
    let s = layer.shape;
    let x_len = s.n * s.c * s.h * s.w;
    expect("x", x.len(), x_len)?;
    expect("dy", dy.len(), layer.out_len())?;
    let x_buf = transfer::storage_init(ctx, "conv x", bytemuck::cast_slice(x))?;
    let dy_buf = transfer::storage_init(ctx, "conv dy", bytemuck::cast_slice(dy))?;
    let p_buf = transfer::storage_init(ctx, "conv params", bytemuck::cast_slice(params))?;
    let g_buf = transfer::storage(ctx, "conv grad", bytes(params.len()))?;
    let col = transfer::storage(ctx, "conv col", bytes(layer.col_len()))?;
    let dcol = transfer::storage(ctx, "conv dcol", bytes(layer.col_len()))?;
    let dymat = transfer::storage(ctx, "conv dymat", bytes(layer.out_len()))?;
    let dx = transfer::storage(ctx, "conv dx", bytes(x_len))?;
    let d = layers::conv_backward(
        k,
        layer,
        &x_buf,
        &dy_buf,
        &p_buf,
        &g_buf,
        &col,
        &dymat,
        Some((&dcol, &dx)),
    )?;
    let out = transfer::run(
        ctx,
        "conv backward",
        &d,
        &[(&g_buf, bytes(params.len())), (&dx, bytes(x_len))],
    )
    .await?;
    Ok((f32s(&out[0]), f32s(&out[1])))
}

/// Pooling forward over NCHW `x` (`shape.c` planes per row): returns (y, arg-max per output — meaningful for max
/// pooling only).
pub async fn pool_forward(
    k: &Kernels,
    shape: &PoolShape,
    kind: PoolKind,
    x: &[f32],
) -> Result<(Vec<f32>, Vec<u32>), GpuError> {
    let ctx = k.ctx();
    expect("x", x.len(), shape.n * shape.c * shape.h * shape.w)?;
    let out_len = shape.n * shape.c * shape.oh() * shape.ow();
    let x_buf = transfer::storage_init(ctx, "pool x", bytemuck::cast_slice(x))?;
    let y = transfer::storage(ctx, "pool y", bytes(out_len))?;
    let idx = transfer::storage(ctx, "pool idx", bytes(out_len))?;
    let d = layers::pool_forward(k, shape, kind, &x_buf, &y, &idx);
    let out = transfer::run(
        ctx,
        "pool forward",
        &[d],
        &[(&y, bytes(out_len)), (&idx, bytes(out_len))],
    )
    .await?;
    Ok((f32s(&out[0]), bytemuck::pod_collect_to_vec(&out[1])))
}

/// Pooling backward: `dx` from `dy` and (max pooling) the forward arg-max `idx`.
pub async fn pool_backward(
    k: &Kernels,
    shape: &PoolShape,
    kind: PoolKind,
    dy: &[f32],
    idx: &[u32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    let out_len = shape.n * shape.c * shape.oh() * shape.ow();
    expect("dy", dy.len(), out_len)?;
    expect("idx", idx.len(), out_len)?;
    let x_len = shape.n * shape.c * shape.h * shape.w;
    let dy_buf = transfer::storage_init(ctx, "pool dy", bytemuck::cast_slice(dy))?;
    let idx_buf = transfer::storage_init(ctx, "pool idx", bytemuck::cast_slice(idx))?;
    let dx = transfer::storage(ctx, "pool dx", bytes(x_len))?;
    let d = layers::pool_backward(k, shape, kind, &dy_buf, &idx_buf, &dx);
    let out = transfer::run(ctx, "pool backward", &[d], &[(&dx, bytes(x_len))]).await?;
    Ok(f32s(&out[0]))
}

/// Normalisation forward: returns (y, per-row `(μ, ρ)` statistics).
pub async fn norm_forward(
    k: &Kernels,
    shape: &NormShape,
    x: &[f32],
    params: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
    let ctx = k.ctx();
    let len = shape.rows * shape.len;
    expect("x", x.len(), len)?;
    let x_buf = transfer::storage_init(ctx, "norm x", bytemuck::cast_slice(x))?;
    let p_buf = transfer::storage_init(ctx, "norm params", bytemuck::cast_slice(params))?;
    let y = transfer::storage(ctx, "norm y", bytes(len))?;
    let stats = transfer::storage(ctx, "norm stats", stats_bytes(shape.rows))?;
    let d = layers::norm_forward(k, shape, &x_buf, &p_buf, &y, &stats);
    let out = transfer::run(
        ctx,
        "norm forward",
        &[d],
        &[(&y, bytes(len)), (&stats, stats_bytes(shape.rows))],
    )
    .await?;
    Ok((f32s(&out[0]), f32s(&out[1])))
}

/// Normalisation backward (the forward pass runs first for its statistics): returns (the gradient buffer, as long
/// as `params`, with gamma's and beta's slots written; the input gradient).
pub async fn norm_backward(
    k: &Kernels,
    shape: &NormShape,
    x: &[f32],
    dy: &[f32],
    params: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
    let ctx = k.ctx();
    let len = shape.rows * shape.len;
    expect("x", x.len(), len)?;
    expect("dy", dy.len(), len)?;
    let x_buf = transfer::storage_init(ctx, "norm x", bytemuck::cast_slice(x))?;
    let dy_buf = transfer::storage_init(ctx, "norm dy", bytemuck::cast_slice(dy))?;
    let p_buf = transfer::storage_init(ctx, "norm params", bytemuck::cast_slice(params))?;
    let y = transfer::storage(ctx, "norm y", bytes(len))?;
    let stats = transfer::storage(ctx, "norm stats", stats_bytes(shape.rows))?;
    let g_buf = transfer::storage(ctx, "norm grad", bytes(params.len()))?;
    let dx = transfer::storage(ctx, "norm dx", bytes(len))?;
    let mut d: Vec<Dispatch> = vec![layers::norm_forward(k, shape, &x_buf, &p_buf, &y, &stats)];
    d.extend(layers::norm_backward(
        k,
        shape,
        &x_buf,
        &dy_buf,
        &p_buf,
        &stats,
        &g_buf,
        Some(&dx),
    ));
    let out = transfer::run(
        ctx,
        "norm backward",
        &d,
        &[(&g_buf, bytes(params.len())), (&dx, bytes(len))],
    )
    .await?;
    Ok((f32s(&out[0]), f32s(&out[1])))
}

/// Elementwise activation forward.
pub async fn act_forward(
    k: &Kernels,
    act: ElementwiseAct,
    x: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    let x_buf = transfer::storage_init(ctx, "act x", bytemuck::cast_slice(x))?;
    let y = transfer::storage(ctx, "act y", bytes(x.len()))?;
    let d = layers::act_forward(k, act, x.len(), &x_buf, &y);
    let out = transfer::run(ctx, "act forward", &[d], &[(&y, bytes(x.len()))]).await?;
    Ok(f32s(&out[0]))
}

/// Elementwise activation backward: `dx = dy·f'(x)`.
pub async fn act_backward(
    k: &Kernels,
    act: ElementwiseAct,
    x: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    expect("dy", dy.len(), x.len())?;
    let x_buf = transfer::storage_init(ctx, "act x", bytemuck::cast_slice(x))?;
    let dy_buf = transfer::storage_init(ctx, "act dy", bytemuck::cast_slice(dy))?;
    let dx = transfer::storage(ctx, "act dx", bytes(x.len()))?;
    let d = layers::act_backward(k, act, x.len(), &x_buf, &dy_buf, &dx);
    let out = transfer::run(ctx, "act backward", &[d], &[(&dx, bytes(x.len()))]).await?;
    Ok(f32s(&out[0]))
}

/// What [`time_conv2d`] measured, in milliseconds: each the mean of back-to-back runs after an untimed warm-up.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvTiming {
    pub forward_ms: f64,
    /// Weight, bias and input gradients.
    pub backward_ms: f64,
    /// Every dispatch of both passes timed alone, in recording order.
    pub parts: Vec<(&'static str, f64)>,
}

/// Benchmark helper: one conv2d layer's forward and backward passes (as the engine records them, ReLU fused) on
/// resident buffers, `reps` runs each.
#[cfg(not(target_arch = "wasm32"))]
pub fn time_conv2d(k: &Kernels, layer: &ConvLayer, reps: usize) -> Result<ConvTiming, GpuError> {
    let ctx = k.ctx();
    let s = layer.shape;
    let x_len = s.n * s.c * s.h * s.w;
    let params_len = layer.bias + layer.out_channels;
    let fill = |len: usize, m: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i % m) as f32 - m as f32 / 2.0) / m as f32)
            .collect()
    };
    let x = transfer::storage_init(ctx, "bench x", bytemuck::cast_slice(&fill(x_len, 17)))?;
    let p = transfer::storage_init(
        ctx,
        "bench params",
        bytemuck::cast_slice(&fill(params_len, 13)),
    )?;
    let dy = transfer::storage_init(
        ctx,
        "bench dy",
        bytemuck::cast_slice(&fill(layer.out_len(), 11)),
    )?;
    let grad = transfer::storage(ctx, "bench grad", bytes(params_len))?;
    let col = transfer::storage(ctx, "bench col", bytes(layer.col_len()))?;
    let dcol = transfer::storage(ctx, "bench dcol", bytes(layer.col_len()))?;
    let mat = transfer::storage(ctx, "bench mat", bytes(layer.out_len()))?;
    let y = transfer::storage(ctx, "bench y", bytes(layer.out_len()))?;
    let dx = transfer::storage(ctx, "bench dx", bytes(x_len))?;
    let forward = layers::conv_forward(k, layer, true, &x, &p, &col, &mat, &y);
    let backward =
        layers::conv_backward(k, layer, &x, &dy, &p, &grad, &col, &mat, Some((&dcol, &dx)))?;
    let time = |d: &[Dispatch]| -> Result<f64, GpuError> {
        transfer::submit_and_wait(ctx, d, 1)?;
        let start = std::time::Instant::now();
        transfer::submit_and_wait(ctx, d, reps)?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
    };
    let names = layers::CONV_FORWARD_PARTS
        .iter()
        .chain(layers::CONV_BACKWARD_PARTS.iter());
    let mut parts = Vec::new();
    for (name, d) in names.zip(forward.iter().chain(&backward)) {
        parts.push((*name, time(std::slice::from_ref(d))?));
    }
    Ok(ConvTiming {
        forward_ms: time(&forward)?,
        backward_ms: time(&backward)?,
        parts,
    })
}

/// Token or positional embedding forward over `shape.positions` rows: `x` holds the ids as f32 (token) or the
/// `[N, C]` stream (positional); the table sits at `shape.table` of `params`.
pub async fn embed_forward(
    k: &Kernels,
    shape: &EmbedShape,
    x: &[f32],
    params: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    let y_len = shape.positions * shape.width;
    let x_len = match shape.kind {
        EmbedTable::Token { .. } => shape.positions,
        EmbedTable::Positional => y_len,
    };
    expect("x", x.len(), x_len)?;
    let x_buf = transfer::storage_init(ctx, "embed x", bytemuck::cast_slice(x))?;
    let p_buf = transfer::storage_init(ctx, "embed params", bytemuck::cast_slice(params))?;
    let y = transfer::storage(ctx, "embed y", bytes(y_len))?;
    let d = transformer::embed_forward(k, shape, &x_buf, &p_buf, &y);
    let out = transfer::run(ctx, "embed forward", &[d], &[(&y, bytes(y_len))]).await?;
    Ok(f32s(&out[0]))
}

/// The table gradient of an embedding from `dy [N, C]` written into (or, `accumulate`, added to) a copy of `grad`,
/// which is returned whole.
pub async fn embed_backward(
    k: &Kernels,
    shape: &EmbedShape,
    accumulate: bool,
    x: &[f32],
    dy: &[f32],
    grad: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    expect("dy", dy.len(), shape.positions * shape.width)?;
    let x_buf = transfer::storage_init(ctx, "embed x", bytemuck::cast_slice(x))?;
    let dy_buf = transfer::storage_init(ctx, "embed dy", bytemuck::cast_slice(dy))?;
    let g_buf = transfer::storage_init(ctx, "embed grad", bytemuck::cast_slice(grad))?;
    let d = transformer::embed_backward(k, shape, accumulate, &x_buf, &dy_buf, &g_buf);
    let out = transfer::run(ctx, "embed backward", &[d], &[(&g_buf, bytes(grad.len()))]).await?;
    Ok(f32s(&out[0]))
}

/// The causal attention core forward from `qkv [B·T, 3C]`: returns (`probs [B, H, T, T]`, `y [B·T, C]`), by the
/// kernel the engine uses for `dims`.
pub async fn attention_forward(
    k: &Kernels,
    dims: AttnDims,
    qkv: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
    attention_forward_with(k, (dims, AttnVariant::ENGINE), qkv).await
}

/// [`attention_forward`] by a chosen kernel.
pub async fn attention_forward_with(
    k: &Kernels,
    (dims, variant): (AttnDims, AttnVariant),
    qkv: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
    let ctx = k.ctx();
    let n = dims.batch * dims.seq;
    expect("qkv", qkv.len(), n * 3 * dims.width)?;
    let q_buf = transfer::storage_init(ctx, "attention qkv", bytemuck::cast_slice(qkv))?;
    let probs = transfer::storage(ctx, "attention probs", bytes(dims.probs_len()))?;
    let y = transfer::storage(ctx, "attention y", bytes(n * dims.width))?;
    let d = transformer::attention_forward(k, (dims, variant), &q_buf, &probs, &y);
    let out = transfer::run(
        ctx,
        "attention forward",
        &[d],
        &[
            (&probs, bytes(dims.probs_len())),
            (&y, bytes(n * dims.width)),
        ],
    )
    .await?;
    Ok((f32s(&out[0]), f32s(&out[1])))
}

/// The causal attention core backward: `dqkv [B·T, 3C]` from `qkv`, the forward's `probs` and `dy [B·T, C]`, by
/// the kernels the engine uses for `dims`.
pub async fn attention_backward(
    k: &Kernels,
    dims: AttnDims,
    qkv: &[f32],
    probs: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>, GpuError> {
    attention_backward_with(k, (dims, AttnVariant::ENGINE), qkv, probs, dy).await
}

/// [`attention_backward`] by chosen kernels.
pub async fn attention_backward_with(
    k: &Kernels,
    (dims, variant): (AttnDims, AttnVariant),
    qkv: &[f32],
    probs: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>, GpuError> {
    let ctx = k.ctx();
    let n = dims.batch * dims.seq;
    expect("qkv", qkv.len(), n * 3 * dims.width)?;
    expect("probs", probs.len(), dims.probs_len())?;
    expect("dy", dy.len(), n * dims.width)?;
    let q_buf = transfer::storage_init(ctx, "attention qkv", bytemuck::cast_slice(qkv))?;
    let p_buf = transfer::storage_init(ctx, "attention probs", bytemuck::cast_slice(probs))?;
    let dy_buf = transfer::storage_init(ctx, "attention dy", bytemuck::cast_slice(dy))?;
    let ds = transfer::storage(ctx, "attention ds", bytes(dims.probs_len()))?;
    let dqkv = transfer::storage(ctx, "attention dqkv", bytes(n * 3 * dims.width))?;
    let d =
        transformer::attention_backward(k, (dims, variant), (&q_buf, &p_buf, &dy_buf), &ds, &dqkv);
    let out = transfer::run(
        ctx,
        "attention backward",
        &d,
        &[(&dqkv, bytes(n * 3 * dims.width))],
    )
    .await?;
    Ok(f32s(&out[0]))
}

/// What [`time_attention`] measured, in milliseconds (means of back-to-back runs after an untimed warm-up).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionTiming {
    pub forward_ms: f64,
    pub backward_ms: f64,
}

/// Benchmark helper: the attention core's forward and backward passes on resident buffers, `reps` runs each, by
/// the kernels the engine uses for `dims`.
#[cfg(not(target_arch = "wasm32"))]
pub fn time_attention(
    k: &Kernels,
    dims: AttnDims,
    reps: usize,
) -> Result<AttentionTiming, GpuError> {
    time_attention_with(k, (dims, AttnVariant::ENGINE), reps)
}

/// [`time_attention`] by chosen kernels (the benchmark times both side by side).
#[cfg(not(target_arch = "wasm32"))]
pub fn time_attention_with(
    k: &Kernels,
    (dims, variant): (AttnDims, AttnVariant),
    reps: usize,
) -> Result<AttentionTiming, GpuError> {
    let ctx = k.ctx();
    let n = dims.batch * dims.seq;
    let fill = |len: usize, m: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i % m) as f32 - m as f32 / 2.0) / m as f32)
            .collect()
    };
    let qkv = transfer::storage_init(
        ctx,
        "bench qkv",
        bytemuck::cast_slice(&fill(n * 3 * dims.width, 17)),
    )?;
    let dy = transfer::storage_init(
        ctx,
        "bench dy",
        bytemuck::cast_slice(&fill(n * dims.width, 13)),
    )?;
    let probs = transfer::storage(ctx, "bench probs", bytes(dims.probs_len()))?;
    let ds = transfer::storage(ctx, "bench ds", bytes(dims.probs_len()))?;
    let y = transfer::storage(ctx, "bench y", bytes(n * dims.width))?;
    let dqkv = transfer::storage(ctx, "bench dqkv", bytes(n * 3 * dims.width))?;
    let forward = [transformer::attention_forward(
        k,
        (dims, variant),
        &qkv,
        &probs,
        &y,
    )];
    let backward =
        transformer::attention_backward(k, (dims, variant), (&qkv, &probs, &dy), &ds, &dqkv);
    let time = |d: &[Dispatch]| -> Result<f64, GpuError> {
        transfer::submit_and_wait(ctx, d, 1)?;
        let start = std::time::Instant::now();
        transfer::submit_and_wait(ctx, d, reps)?;
        Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
    };
    Ok(AttentionTiming {
        forward_ms: time(&forward)?,
        backward_ms: time(&backward)?,
    })
}
