//! Decoder-only transformer language models (issue 13): the spec, its flat parameter layout, and one forward /
//! backward composition shared by the plain-loop reference and the fast CPU path.
//!
//! A model maps `B` sequences of `T ≤ context` token ids to next-token logits at every position:
//!
//! ```text
//! x = tok[ids] + pos[0..T]                                  token + learned positional embedding, [B·T, C]
//! per block:  x = x + attn(layer_norm₁(x))                   causal multi-head self-attention, residual
//!             x = x + W₂·gelu(W₁·layer_norm₂(x) + b₁) + b₂    MLP (hidden 4·C), residual
//! logits = layer_norm_f(x)·tokᵀ        (tied)   or   layer_norm_f(x)·W_head + b_head
//! loss   = mean over all B·T positions of softmax cross-entropy against the next token
//! ```
//!
//! [`ops`] holds the cheap per-position layers (embeddings, layer norm, GELU); [`Kernels`] abstracts the two
//! matmul-shaped pieces (dense matmuls and the attention core), implemented by [`reference::Reference`] (plain
//! loops, f64 sums: the oracle) and [`fast::Fast`] (matrixmultiply's SGEMM, native and wasm32).

pub mod export; // LM checkpoints as safetensors: tensor names, shapes, the spec and vocabulary as metadata.
pub mod fast; // The fast CPU kernels: SGEMM for every matmul, attention head by head.
pub mod graph; // The transformer layers as layer-graph kinds: resolution, init, per-layer forward/backward.
pub mod layout; // The LM spec, its validation and the flat parameter layout.
pub mod ops; // Embedding, positional embedding, layer norm, GELU, dense bias: forward and backward loops.
pub mod reference; // Plain-loop kernels: the oracle the fast path and the GPU kernels are tested against.
pub mod sample; // Text generation from a trained model (temperature sampling, seeded).

#[cfg(test)]
mod tests;

use crate::reference::{
    MatmulForm, gelu_backward, gelu_forward, layer_norm_backward, layer_norm_forward, softmax_xent,
};
use crate::{EvalOutput, StepOutput};

pub use layout::{
    BlockLayout, INIT_STD, LN_EPS, LmBatchError, LmLayout, LmSpec, LmSpecError, MAX_CONTEXT,
    MAX_MODEL_WIDTH, MAX_VOCAB, MLP_RATIO, check_lm_batch,
};

/// Shape of a batch through the attention core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Sequences B.
    pub batch: usize,
    /// Tokens per sequence T.
    pub seq: usize,
    /// Model width C.
    pub width: usize,
    /// Heads H (head width `D = C / H`).
    pub heads: usize,
}

impl AttnDims {
    pub fn head_width(&self) -> usize {
        self.width / self.heads
    }

    /// Length of the attention-probability buffer `[B, H, T, T]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
}

/// The matmul-shaped work of a transformer, which the reference and the fast path implement differently.
///
/// Attention core, per sequence `b` and head `h`, with `q_i`, `k_j`, `v_j` the `D`-wide slices of row
/// `b·T + i` (resp. `j`) of `qkv [B·T, 3C]` at columns `h·D`, `C + h·D`, `2C + h·D`:
/// `p_ij = softmax_j(q_i·k_j / √D)` over `j ≤ i` (0 for `j > i`: the causal mask), `y_i[h·D..] = Σ_j p_ij·v_j`.
pub trait Kernels {
    /// `C[m, n] = op(A)·op(B)`, added to `C` when `accumulate`, else overwriting it.
    #[allow(clippy::too_many_arguments)] // BLAS-shaped: form, three sizes, three operands, the accumulate flag.
    fn matmul(
        &self,
        form: MatmulForm,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        accumulate: bool,
        c: &mut [f32],
    );

    /// Fills `probs [B, H, T, T]` and `y [B·T, C]` from `qkv [B·T, 3C]`.
    fn attention_forward(&self, dims: AttnDims, qkv: &[f32], probs: &mut [f32], y: &mut [f32]);

    /// Overwrites `dqkv [B·T, 3C]` with the gradient through the attention core, given `dy [B·T, C]`.
    fn attention_backward(
        &self,
        dims: AttnDims,
        qkv: &[f32],
        probs: &[f32],
        dy: &[f32],
        dqkv: &mut [f32],
    );

    /// `y = gelu(x)`, tanh form (the reference's f64 loop unless a backend has a faster one).
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]) {
        gelu_forward(x, y);
    }

    /// `dx = dy · gelu'(x)`.
    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        gelu_backward(x, dy, dx);
    }
}

/// What one block's forward pass keeps for its backward pass (all `[N, ·]` row-major, `N = B·T`).
#[derive(Debug, Clone)]
pub struct BlockCache {
    /// Residual stream entering the block, `[N, C]`.
    x0: Vec<f32>,
    /// `layer_norm₁(x0)`.
    h1: Vec<f32>,
    /// `[N, 3C]`.
    qkv: Vec<f32>,
    /// `[B, H, T, T]`.
    probs: Vec<f32>,
    /// Heads' outputs concatenated, `[N, C]`.
    y: Vec<f32>,
    /// Residual stream after the attention sublayer.
    x1: Vec<f32>,
    /// `layer_norm₂(x1)`.
    h2: Vec<f32>,
    /// MLP pre-activation, `[N, 4C]`.
    u: Vec<f32>,
    /// `gelu(u)`.
    g: Vec<f32>,
}

/// Everything the forward pass produced.
struct Forward {
    blocks: Vec<BlockCache>,
    /// Residual stream after the last block.
    xf: Vec<f32>,
    hf: Vec<f32>,
    /// `[N, vocab]`.
    logits: Vec<f32>,
}

/// `y[N, out] = x[N, in]·W + b`.
pub fn dense<K: Kernels>(
    k: &K,
    x: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    w: &[f32],
    b: &[f32],
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * out];
    k.matmul(MatmulForm::AB, rows, inp, out, x, w, false, &mut y);
    ops::add_bias(&mut y, b);
    y
}

/// Backward of [`dense`]: adds `xᵀ·dy` to the weight gradient at `w_off` and `Σ_rows dy` to the bias gradient at
/// `b_off` of `grad`; returns `dy·Wᵀ`.
#[allow(clippy::too_many_arguments)] // the dense layer's operands and both gradient slices.
pub fn dense_backward<K: Kernels>(
    k: &K,
    x: &[f32],
    dy: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    w: &[f32],
    grad: &mut [f32],
    (w_off, b_off): (usize, usize),
) -> Vec<f32> {
    k.matmul(
        MatmulForm::AtB,
        inp,
        rows,
        out,
        x,
        dy,
        true,
        &mut grad[w_off..w_off + inp * out],
    );
    ops::add_col_sum(dy, &mut grad[b_off..b_off + out]);
    let mut dx = vec![0.0f32; rows * inp];
    k.matmul(MatmulForm::ABt, rows, out, inp, dy, w, false, &mut dx);
    dx
}

/// Layer norm over rows of `C` values with `γ`, `β` at `(g, b)` of `p` (the reference's, so every backend
/// normalises identically).
pub fn norm(x: &[f32], p: &[f32], (g, b): (usize, usize), c: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    layer_norm_forward(x, &p[g..g + c], &p[b..b + c], c, LN_EPS, &mut y);
    y
}

/// Backward of [`norm`]: adds the input gradient to `dx` and the `γ`, `β` gradients to `grad` at `(g, b)`.
pub fn norm_backward(
    x: &[f32],
    p: &[f32],
    (g, b): (usize, usize),
    c: usize,
    dy: &[f32],
    dx: &mut [f32],
    grad: &mut [f32],
) {
    let mut d = vec![0.0f32; x.len()];
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    layer_norm_backward(x, &p[g..g + c], dy, c, LN_EPS, &mut d, &mut dg, &mut db);
    ops::add_into(dx, &d);
    ops::add_into(&mut grad[g..g + c], &dg);
    ops::add_into(&mut grad[b..b + c], &db);
}

/// One pre-norm block over the residual stream `x [B·T, C]`:
/// `x1 = x + out(attn(qkv(layer_norm₁(x))))`, `y = x1 + proj(gelu(fc(layer_norm₂(x1))))`.
pub fn block_forward<K: Kernels>(
    k: &K,
    b: &BlockLayout,
    dims: AttnDims,
    p: &[f32],
    x: &[f32],
) -> (Vec<f32>, BlockCache) {
    let c = dims.width;
    let hidden = MLP_RATIO * c;
    let n = dims.batch * dims.seq;
    let h1 = norm(x, p, (b.ln1_gamma, b.ln1_beta), c);
    let qkv = dense(
        k,
        &h1,
        n,
        c,
        3 * c,
        &p[b.qkv_weight..b.qkv_weight + 3 * c * c],
        &p[b.qkv_bias..b.qkv_bias + 3 * c],
    );
    let mut probs = vec![0.0f32; dims.probs_len()];
    let mut y = vec![0.0f32; n * c];
    k.attention_forward(dims, &qkv, &mut probs, &mut y);
    let a = dense(
        k,
        &y,
        n,
        c,
        c,
        &p[b.out_weight..b.out_weight + c * c],
        &p[b.out_bias..b.out_bias + c],
    );
    let mut x1 = x.to_vec();
    ops::add_into(&mut x1, &a);
    let h2 = norm(&x1, p, (b.ln2_gamma, b.ln2_beta), c);
    let u = dense(
        k,
        &h2,
        n,
        c,
        hidden,
        &p[b.fc_weight..b.fc_weight + c * hidden],
        &p[b.fc_bias..b.fc_bias + hidden],
    );
    let mut g = vec![0.0f32; u.len()];
    k.gelu_forward(&u, &mut g);
    let m = dense(
        k,
        &g,
        n,
        hidden,
        c,
        &p[b.proj_weight..b.proj_weight + hidden * c],
        &p[b.proj_bias..b.proj_bias + c],
    );
    let mut out = x1.clone();
    ops::add_into(&mut out, &m);
    let cache = BlockCache {
        x0: x.to_vec(),
        h1,
        qkv,
        probs,
        y,
        x1,
        h2,
        u,
        g,
    };
    (out, cache)
}

/// Backward of [`block_forward`]: adds the block's parameter gradients to `grad` and returns `∂loss/∂x` given
/// `dy = ∂loss/∂y`. Both residual paths carry `dy` straight through.
pub fn block_backward<K: Kernels>(
    k: &K,
    b: &BlockLayout,
    dims: AttnDims,
    p: &[f32],
    cache: &BlockCache,
    dy: &[f32],
    grad: &mut [f32],
) -> Vec<f32> {
    let c = dims.width;
    let hidden = MLP_RATIO * c;
    let n = dims.batch * dims.seq;
    let mut dx = dy.to_vec();
    let dg = dense_backward(
        k,
        &cache.g,
        dy,
        n,
        hidden,
        c,
        &p[b.proj_weight..b.proj_weight + hidden * c],
        grad,
        (b.proj_weight, b.proj_bias),
    );
    let mut du = vec![0.0f32; dg.len()];
    k.gelu_backward(&cache.u, &dg, &mut du);
    let dh2 = dense_backward(
        k,
        &cache.h2,
        &du,
        n,
        c,
        hidden,
        &p[b.fc_weight..b.fc_weight + c * hidden],
        grad,
        (b.fc_weight, b.fc_bias),
    );
    norm_backward(
        &cache.x1,
        p,
        (b.ln2_gamma, b.ln2_beta),
        c,
        &dh2,
        &mut dx,
        grad,
    );
    // dx is now ∂loss/∂x1; x1 = x0 + out(attn(qkv(ln1(x0)))).
    let dyh = dense_backward(
        k,
        &cache.y,
        &dx,
        n,
        c,
        c,
        &p[b.out_weight..b.out_weight + c * c],
        grad,
        (b.out_weight, b.out_bias),
    );
    let mut dqkv = vec![0.0f32; n * 3 * c];
    k.attention_backward(dims, &cache.qkv, &cache.probs, &dyh, &mut dqkv);
    let dh1 = dense_backward(
        k,
        &cache.h1,
        &dqkv,
        n,
        c,
        3 * c,
        &p[b.qkv_weight..b.qkv_weight + 3 * c * c],
        grad,
        (b.qkv_weight, b.qkv_bias),
    );
    norm_backward(
        &cache.x0,
        p,
        (b.ln1_gamma, b.ln1_beta),
        c,
        &dh1,
        &mut dx,
        grad,
    );
    dx
}

/// The LM head: `logits [N, V] = h·tokᵀ` (tied, `table` the `[V, C]` embedding) or `h·W + b` (untied, `W [C, V]`
/// at `head.0`, `b` at `head.1`).
pub fn head_forward<K: Kernels>(
    k: &K,
    h: &[f32],
    n: usize,
    (c, v): (usize, usize),
    p: &[f32],
    table: usize,
    head: Option<(usize, usize)>,
) -> Vec<f32> {
    match head {
        None => {
            let mut z = vec![0.0f32; n * v];
            k.matmul(
                MatmulForm::ABt,
                n,
                c,
                v,
                h,
                &p[table..table + v * c],
                false,
                &mut z,
            );
            z
        }
        Some((w, bias)) => dense(k, h, n, c, v, &p[w..w + c * v], &p[bias..bias + v]),
    }
}

/// Backward of [`head_forward`]: adds the head's gradients to `grad` (tied: `dlogitsᵀ·h` to the embedding table)
/// and returns `∂loss/∂h`.
#[allow(clippy::too_many_arguments)] // the head's operands, its gradient and where its parameters sit.
pub fn head_backward<K: Kernels>(
    k: &K,
    h: &[f32],
    dz: &[f32],
    n: usize,
    (c, v): (usize, usize),
    p: &[f32],
    table: usize,
    head: Option<(usize, usize)>,
    grad: &mut [f32],
) -> Vec<f32> {
    match head {
        None => {
            k.matmul(
                MatmulForm::AtB,
                v,
                n,
                c,
                dz,
                h,
                true,
                &mut grad[table..table + v * c],
            );
            let mut d = vec![0.0f32; n * c];
            k.matmul(
                MatmulForm::AB,
                n,
                v,
                c,
                dz,
                &p[table..table + v * c],
                false,
                &mut d,
            );
            d
        }
        Some((w, bias)) => dense_backward(k, h, dz, n, c, v, &p[w..w + c * v], grad, (w, bias)),
    }
}

fn dims_of(spec: &LmSpec, batch: usize, seq: usize) -> AttnDims {
    AttnDims {
        batch,
        seq,
        width: spec.width(),
        heads: spec.heads as usize,
    }
}

fn forward<K: Kernels>(
    k: &K,
    spec: &LmSpec,
    p: &[f32],
    ids: &[u32],
    batch: usize,
    seq: usize,
) -> Forward {
    let l = spec.layout();
    let (c, v) = (spec.width(), spec.vocab as usize);
    let dims = dims_of(spec, batch, seq);
    let mut x = ops::embed(ids, &p[l.tok..l.tok + v * c], c);
    ops::add_positional(&mut x, &p[l.pos..l.pos + seq * c], seq);
    let mut blocks = Vec::with_capacity(l.blocks.len());
    for b in &l.blocks {
        let (y, cache) = block_forward(k, b, dims, p, &x);
        blocks.push(cache);
        x = y;
    }
    let hf = norm(&x, p, (l.lnf_gamma, l.lnf_beta), c);
    let logits = head_forward(k, &hf, batch * seq, (c, v), p, l.tok, l.head);
    Forward {
        blocks,
        xf: x,
        hf,
        logits,
    }
}

/// Loss (mean nats per position), next-token hits and the full gradient over `batch` sequences of `seq` tokens:
/// `ids` and `targets` are `[batch, seq]` row-major (`targets[b, t]` is the token after `ids[b, t]`).
pub fn forward_backward<K: Kernels>(
    k: &K,
    spec: &LmSpec,
    params: &[f32],
    ids: &[u32],
    targets: &[u32],
    batch: usize,
    seq: usize,
) -> Result<StepOutput, LmBatchError> {
    check_lm_batch(spec, params.len(), ids, Some(targets), batch, seq)?;
    let p = params;
    let l = spec.layout();
    let (c, v) = (spec.width(), spec.vocab as usize);
    let n = batch * seq;
    let dims = dims_of(spec, batch, seq);
    let f = forward(k, spec, p, ids, batch, seq);
    let mut grad = vec![0.0f32; p.len()];
    let mut dlogits = vec![0.0f32; n * v];
    let (loss, correct) = softmax_xent(&f.logits, targets, v, Some(&mut dlogits));
    let dhf = head_backward(k, &f.hf, &dlogits, n, (c, v), p, l.tok, l.head, &mut grad);
    let mut dx = vec![0.0f32; n * c];
    norm_backward(
        &f.xf,
        p,
        (l.lnf_gamma, l.lnf_beta),
        c,
        &dhf,
        &mut dx,
        &mut grad,
    );
    for (b, cache) in l.blocks.iter().zip(&f.blocks).rev() {
        dx = block_backward(k, b, dims, p, cache, &dx, &mut grad);
    }
    ops::positional_backward(&dx, seq, &mut grad[l.pos..l.pos + seq * c]);
    ops::embed_backward(ids, &dx, &mut grad[l.tok..l.tok + v * c]);
    Ok(StepOutput {
        loss: (loss / n as f64) as f32,
        correct,
        grad,
    })
}

/// Next-token logits `[batch·seq, vocab]` (forward only).
pub fn logits<K: Kernels>(
    k: &K,
    spec: &LmSpec,
    params: &[f32],
    ids: &[u32],
    batch: usize,
    seq: usize,
) -> Result<Vec<f32>, LmBatchError> {
    check_lm_batch(spec, params.len(), ids, None, batch, seq)?;
    Ok(forward(k, spec, params, ids, batch, seq).logits)
}

/// Sequences evaluated per forward pass by [`evaluate`], bounding its memory.
pub const EVAL_CHUNK: usize = 16;

/// Forward-only loss (mean nats per predicted token) and next-token hits over `batch` sequences, in chunks.
/// `rows` of the result counts predicted positions (`batch·seq`).
pub fn evaluate<K: Kernels>(
    k: &K,
    spec: &LmSpec,
    params: &[f32],
    ids: &[u32],
    targets: &[u32],
    batch: usize,
    seq: usize,
) -> Result<EvalOutput, LmBatchError> {
    check_lm_batch(spec, params.len(), ids, Some(targets), batch, seq)?;
    let v = spec.vocab as usize;
    let (mut loss, mut correct) = (0.0f64, 0u32);
    for (xs, ys) in ids
        .chunks(EVAL_CHUNK * seq)
        .zip(targets.chunks(EVAL_CHUNK * seq))
    {
        let f = forward(k, spec, params, xs, xs.len() / seq, seq);
        let (l, c) = softmax_xent(&f.logits, ys, v, None);
        loss += l;
        correct += c;
    }
    Ok(EvalOutput {
        loss: (loss / ids.len() as f64) as f32,
        correct,
        rows: ids.len() as u32,
    })
}
