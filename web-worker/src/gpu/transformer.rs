//! What the transformer layers (issue 13) record on the GPU, forward and backward, against caller-owned buffers:
//! the embeddings, the pre-norm block (layer norm, QKV projection, causal attention, output projection, residual,
//! layer norm, GELU MLP, residual) and the LM head, tied or not. The math is `starling_core::transformer`'s, step
//! for step, so the gradient layout and every rounding-sensitive choice (tanh GELU, `eps`, `1/√D`, the mean over
//! positions) match the CPU engine.
//!
//! Unlike the CPU engine, which keeps only layer outputs and recomputes a block's forward pass in its backward
//! pass, the GPU plan keeps every block's intermediates ([`BlockActs`]) resident: memory is cheaper there than a
//! second forward pass.

use starling_core::reference::MatmulForm;
use starling_core::transformer::{AttnDims, BlockLayout, LN_EPS, MLP_RATIO};

use super::kernels::{
    AttnVariant, ElementwiseAct, EmbedShape, MatmulParams, NormShape, stats_bytes,
};
use super::layers::{self, DenseLayer, Kernels};
use super::transfer::{self, Dispatch};
use super::{GpuContext, GpuError};

/// One transformer block over a batch: `dims.batch` sequences of `dims.seq` positions, its tensors at `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayer {
    pub dims: AttnDims,
    pub block: BlockLayout,
}

impl BlockLayer {
    fn positions(&self) -> usize {
        self.dims.batch * self.dims.seq
    }

    fn dense(&self, inputs: usize, outputs: usize, weight: usize, bias: usize) -> DenseLayer {
        DenseLayer {
            rows: self.positions(),
            inputs,
            outputs,
            weight,
            bias,
        }
    }

    fn qkv(&self) -> DenseLayer {
        let c = self.dims.width;
        self.dense(c, 3 * c, self.block.qkv_weight, self.block.qkv_bias)
    }

    fn out(&self) -> DenseLayer {
        let c = self.dims.width;
        self.dense(c, c, self.block.out_weight, self.block.out_bias)
    }

    fn fc(&self) -> DenseLayer {
        let c = self.dims.width;
        self.dense(c, MLP_RATIO * c, self.block.fc_weight, self.block.fc_bias)
    }

    fn proj(&self) -> DenseLayer {
        let c = self.dims.width;
        self.dense(
            MLP_RATIO * c,
            c,
            self.block.proj_weight,
            self.block.proj_bias,
        )
    }

    fn ln1(&self) -> NormShape {
        let b = &self.block;
        NormShape::layer(
            self.positions(),
            self.dims.width,
            LN_EPS,
            b.ln1_gamma,
            b.ln1_beta,
        )
    }

    fn ln2(&self) -> NormShape {
        let b = &self.block;
        NormShape::layer(
            self.positions(),
            self.dims.width,
            LN_EPS,
            b.ln2_gamma,
            b.ln2_beta,
        )
    }

    /// Floats one block keeps per position between its forward and backward passes (see [`BlockActs`]), plus the
    /// attention probabilities, per sequence: `T·(15·C + H·T)`.
    pub fn kept_per_sequence(seq: usize, width: usize, heads: usize) -> usize {
        seq * ((1 + 3 + 1 + 1 + 1 + 2 * MLP_RATIO) * width + heads * seq)
    }
}

/// Everything one block's forward pass keeps for its backward pass (`N = B·T` positions).
#[derive(Debug)]
pub(crate) struct BlockActs {
    /// `layer_norm₁(x)`, `[N, C]`, and its per-position statistics.
    h1: wgpu::Buffer,
    stats1: wgpu::Buffer,
    /// `[N, 3C]`.
    qkv: wgpu::Buffer,
    /// `[B, H, T, T]`.
    probs: wgpu::Buffer,
    /// The heads' outputs concatenated, `[N, C]`.
    y: wgpu::Buffer,
    /// The residual stream after attention, `[N, C]`.
    x1: wgpu::Buffer,
    /// `layer_norm₂(x1)` and its statistics.
    h2: wgpu::Buffer,
    stats2: wgpu::Buffer,
    /// MLP pre-activation and `gelu(u)`, `[N, 4C]`.
    u: wgpu::Buffer,
    g: wgpu::Buffer,
}

fn f32s(len: usize) -> u64 {
    (len * 4) as u64
}

impl BlockActs {
    pub(crate) fn new(ctx: &GpuContext, l: &BlockLayer) -> Result<Self, GpuError> {
        let (n, c) = (l.positions(), l.dims.width);
        let buf = |label, len| transfer::storage(ctx, label, f32s(len));
        Ok(Self {
            h1: buf("block h1", n * c)?,
            stats1: transfer::storage(ctx, "block ln1 stats", stats_bytes(n))?,
            qkv: buf("block qkv", n * 3 * c)?,
            probs: buf("block attention probs", l.dims.probs_len())?,
            y: buf("block attention y", n * c)?,
            x1: buf("block x1", n * c)?,
            h2: buf("block h2", n * c)?,
            stats2: transfer::storage(ctx, "block ln2 stats", stats_bytes(n))?,
            u: buf("block mlp u", n * MLP_RATIO * c)?,
            g: buf("block mlp gelu", n * MLP_RATIO * c)?,
        })
    }
}

/// Scratch every block of a plan shares, sized for the largest: one `[N, C]` sublayer output forward, and the
/// backward pass's intermediate gradients.
#[derive(Debug)]
pub(crate) struct BlockScratch {
    /// A sublayer's output before its residual add, `[N, C]`.
    tmp: wgpu::Buffer,
    /// `∂/∂gelu(u)` and `∂/∂u`, `[N, 4C]`.
    dg: wgpu::Buffer,
    du: wgpu::Buffer,
    /// `∂/∂h2`, then `∂/∂h1`, `[N, C]`.
    dh: wgpu::Buffer,
    /// A layer norm's input gradient, `[N, C]`.
    dxn: wgpu::Buffer,
    /// `∂/∂x1`, `[N, C]`.
    dx1: wgpu::Buffer,
    /// `∂/∂y` (the heads' outputs), `[N, C]`.
    dyh: wgpu::Buffer,
    /// `[N, 3C]`.
    dqkv: wgpu::Buffer,
    /// `∂/∂scores`, `[B, H, T, T]`.
    ds: wgpu::Buffer,
}

impl BlockScratch {
    /// Sized for every block in `blocks`; the backward buffers are minimal (16 bytes) unless `train`.
    pub(crate) fn new(
        ctx: &GpuContext,
        blocks: &[BlockLayer],
        train: bool,
    ) -> Result<Self, GpuError> {
        let max = |f: &dyn Fn(&BlockLayer) -> usize| blocks.iter().map(f).max().unwrap_or(0);
        let nc = max(&|l| l.positions() * l.dims.width);
        let back = |len: usize| if train { len } else { 0 };
        let buf = |label, len| transfer::storage(ctx, label, f32s(len));
        Ok(Self {
            tmp: buf("block sublayer out", nc)?,
            dg: buf("block dgelu", back(MLP_RATIO * nc))?,
            du: buf("block du", back(MLP_RATIO * nc))?,
            dh: buf("block dh", back(nc))?,
            dxn: buf("block dnorm", back(nc))?,
            dx1: buf("block dx1", back(nc))?,
            dyh: buf("block dy heads", back(nc))?,
            dqkv: buf("block dqkv", back(3 * nc))?,
            ds: buf("block dscores", back(max(&|l| l.dims.probs_len())))?,
        })
    }
}

/// Token embedding `y = table[ids]` (`x` holds the ids as f32) or positional embedding `y = x + pos`.
pub(crate) fn embed_forward(
    k: &Kernels,
    shape: &EmbedShape,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Dispatch {
    k.embed()
        .dispatch(k.ctx(), "embedding", shape, x, params, y)
}

/// The table gradient of an embedding from `dy`; `accumulate` adds to what a tied head wrote there first. (The
/// positional embedding's input gradient is `dy` itself, so it records nothing for it.)
pub(crate) fn embed_backward(
    k: &Kernels,
    shape: &EmbedShape,
    accumulate: bool,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    grad: &wgpu::Buffer,
) -> Dispatch {
    k.embed_grad()
        .dispatch(k.ctx(), "embedding grad", shape, accumulate, x, dy, grad)
}

/// The attention core forward: `probs`, `y` from `qkv`, by the `variant` kernel.
pub(crate) fn attention_forward(
    k: &Kernels,
    (dims, variant): (AttnDims, AttnVariant),
    qkv: &wgpu::Buffer,
    probs: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Dispatch {
    k.attention()
        .dispatch(k.ctx(), "attention", dims, variant, qkv, probs, y)
}

/// The attention core backward: `ds` (scratch), then all of `dqkv` (overwritten), by the `variant` kernels.
pub(crate) fn attention_backward(
    k: &Kernels,
    (dims, variant): (AttnDims, AttnVariant),
    (qkv, probs, dy): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    ds: &wgpu::Buffer,
    dqkv: &wgpu::Buffer,
) -> [Dispatch; 2] {
    let ctx = k.ctx();
    let buffers = [qkv, probs, dy, ds, dqkv];
    [
        k.attention_grad_rows()
            .dispatch(ctx, "attention grad dq", dims, variant, buffers),
        k.attention_grad_cols()
            .dispatch(ctx, "attention grad dk dv", dims, variant, buffers),
    ]
}

/// One block forward from the residual stream `x` into `out` (`[N, C]` each), keeping its intermediates in `a`.
pub(crate) fn block_forward(
    k: &Kernels,
    l: &BlockLayer,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    (a, s): (&BlockActs, &BlockScratch),
    out: &wgpu::Buffer,
) -> Vec<Dispatch> {
    let nc = l.positions() * l.dims.width;
    let mut d = vec![layers::norm_forward(
        k,
        &l.ln1(),
        x,
        params,
        &a.h1,
        &a.stats1,
    )];
    d.extend(layers::dense_forward(
        k,
        &l.qkv(),
        false,
        &a.h1,
        params,
        &a.qkv,
    ));
    d.push(attention_forward(
        k,
        (l.dims, AttnVariant::ENGINE),
        &a.qkv,
        &a.probs,
        &a.y,
    ));
    d.extend(layers::dense_forward(
        k,
        &l.out(),
        false,
        &a.y,
        params,
        &s.tmp,
    ));
    d.push(
        k.residual_add()
            .dispatch(k.ctx(), "attention residual", nc, x, &s.tmp, &a.x1),
    );
    d.push(layers::norm_forward(
        k,
        &l.ln2(),
        &a.x1,
        params,
        &a.h2,
        &a.stats2,
    ));
    d.extend(layers::dense_forward(
        k,
        &l.fc(),
        false,
        &a.h2,
        params,
        &a.u,
    ));
    d.push(layers::act_forward(
        k,
        ElementwiseAct::Gelu,
        MLP_RATIO * nc,
        &a.u,
        &a.g,
    ));
    d.extend(layers::dense_forward(
        k,
        &l.proj(),
        false,
        &a.g,
        params,
        &s.tmp,
    ));
    d.push(
        k.residual_add()
            .dispatch(k.ctx(), "mlp residual", nc, &a.x1, &s.tmp, out),
    );
    d
}

/// One block backward from `dy = ∂loss/∂out`: every parameter slot of the block in `grad` is overwritten, and
/// `dx = ∂loss/∂x` when given (both residual paths carry `dy` straight through).
#[allow(clippy::too_many_arguments)] // the block, its input, output gradient, parameters, gradient, kept state, dx.
pub(crate) fn block_backward(
    k: &Kernels,
    l: &BlockLayer,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    (a, s): (&BlockActs, &BlockScratch),
    dx: Option<&wgpu::Buffer>,
) -> Vec<Dispatch> {
    let ctx = k.ctx();
    let nc = l.positions() * l.dims.width;
    let mut d = layers::dense_backward(k, &l.proj(), &a.g, dy, params, grad, Some(&s.dg));
    d.push(layers::act_backward(
        k,
        ElementwiseAct::Gelu,
        MLP_RATIO * nc,
        &a.u,
        &s.dg,
        &s.du,
    ));
    d.extend(layers::dense_backward(
        k,
        &l.fc(),
        &a.h2,
        &s.du,
        params,
        grad,
        Some(&s.dh),
    ));
    d.extend(layers::norm_backward(
        k,
        &l.ln2(),
        &a.x1,
        &s.dh,
        params,
        &a.stats2,
        grad,
        Some(&s.dxn),
    ));
    d.push(
        k.residual_add()
            .dispatch(ctx, "mlp residual grad", nc, dy, &s.dxn, &s.dx1),
    );
    d.extend(layers::dense_backward(
        k,
        &l.out(),
        &a.y,
        &s.dx1,
        params,
        grad,
        Some(&s.dyh),
    ));
    d.extend(attention_backward(
        k,
        (l.dims, AttnVariant::ENGINE),
        (&a.qkv, &a.probs, &s.dyh),
        &s.ds,
        &s.dqkv,
    ));
    d.extend(layers::dense_backward(
        k,
        &l.qkv(),
        &a.h1,
        &s.dqkv,
        params,
        grad,
        Some(&s.dh),
    ));
    d.extend(layers::norm_backward(
        k,
        &l.ln1(),
        x,
        &s.dh,
        params,
        &a.stats1,
        grad,
        dx.map(|_| &s.dxn),
    ));
    if let Some(dx) = dx {
        d.push(
            k.residual_add()
                .dispatch(ctx, "attention residual grad", nc, &s.dx1, &s.dxn, dx),
        );
    }
    d
}

/// The LM head over `rows = B·T` positions of `width`: tied (`logits = h·tokᵀ`, the `[vocab, C]` table at `table`)
/// or untied (`h·W + b`, `W [C, vocab]` at `head.0`, `b` at `head.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayer {
    pub rows: usize,
    pub width: usize,
    pub vocab: usize,
    pub table: usize,
    pub head: Option<(usize, usize)>,
}

impl HeadLayer {
    fn dense(&self) -> Option<DenseLayer> {
        self.head.map(|(weight, bias)| DenseLayer {
            rows: self.rows,
            inputs: self.width,
            outputs: self.vocab,
            weight,
            bias,
        })
    }
}

pub(crate) fn head_forward(
    k: &Kernels,
    l: &HeadLayer,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Vec<Dispatch> {
    match l.dense() {
        Some(dense) => layers::dense_forward(k, &dense, false, x, params, y),
        None => {
            let mm = MatmulParams::new(MatmulForm::ABt, l.rows, l.width, l.vocab, 0, l.table, 0);
            vec![k.matmul().dispatch(k.ctx(), "tied head", mm, x, params, y)]
        }
    }
}

/// The head's backward pass from `dz = ∂loss/∂logits`: a tied head **overwrites** the token table's gradient with
/// `dzᵀ·h` (the embedding's backward pass adds its part after), an untied one its own slots; `dx = dz·tok` (or
/// `dz·Wᵀ`) when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_backward(
    k: &Kernels,
    l: &HeadLayer,
    x: &wgpu::Buffer,
    dz: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    dx: Option<&wgpu::Buffer>,
) -> Vec<Dispatch> {
    if let Some(dense) = l.dense() {
        return layers::dense_backward(k, &dense, x, dz, params, grad, dx);
    }
    let ctx = k.ctx();
    let (n, c, v) = (l.rows, l.width, l.vocab);
    let mut d = vec![k.matmul().dispatch(
        ctx,
        "tied head table grad",
        MatmulParams::new(MatmulForm::AtB, v, n, c, 0, 0, l.table),
        dz,
        x,
        grad,
    )];
    if let Some(dx) = dx {
        d.push(k.matmul().dispatch(
            ctx,
            "tied head input grad",
            MatmulParams::new(MatmulForm::AB, n, v, c, 0, l.table, 0),
            dz,
            params,
            dx,
        ));
    }
    d
}
