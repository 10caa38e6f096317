//! What each layer kind records on the GPU, forward and backward, against caller-owned buffers: the engine's
//! plans and the kernel tests' one-layer helpers (`ops`) record the same dispatch sequences from here.
//!
//! [`Kernels`] holds every pipeline, each built on first use: a dense model never compiles the conv kernels
//! (building a pipeline costs seconds on SwiftShader).

use std::sync::OnceLock;

use starling_core::Activation;
use starling_core::reference::MatmulForm;

use super::kernels::{
    ActBackwardKernel, ActGradKernel, ActKernel, BiasActKernel, ChannelSumKernel, Col2ImKernel,
    ColSumKernel, ConvShape, ElementwiseAct, Im2ColKernel, MatmulKernel, MatmulParams,
    NormGradKernel, NormKernel, NormParamGradKernel, NormShape, PoolBackwardKernel, PoolKernel,
    PoolKind, PoolShape, SoftmaxXentKernel, SwapBiasKernel,
};
use super::kernels::{
    AttentionGradColsKernel, AttentionGradRowsKernel, AttentionKernel, EmbedGradKernel,
    EmbedKernel, ResidualAddKernel,
};
use super::transfer::Dispatch;
use super::{GpuContext, GpuError};

/// Every kernel a model may need, each pipeline built the first time it is asked for.
#[derive(Debug, Clone)]
pub struct Kernels {
    ctx: GpuContext,
    matmul: OnceLock<MatmulKernel>,
    bias_act: OnceLock<BiasActKernel>,
    act_backward: OnceLock<ActBackwardKernel>,
    softmax: OnceLock<SoftmaxXentKernel>,
    col_sum: OnceLock<ColSumKernel>,
    im2col: OnceLock<Im2ColKernel>,
    col2im: OnceLock<Col2ImKernel>,
    swap_bias: OnceLock<SwapBiasKernel>,
    channel_sum: OnceLock<ChannelSumKernel>,
    pool: OnceLock<PoolKernel>,
    pool_backward: OnceLock<PoolBackwardKernel>,
    norm: OnceLock<NormKernel>,
    norm_grad: OnceLock<NormGradKernel>,
    norm_param_grad: OnceLock<NormParamGradKernel>,
    act: OnceLock<ActKernel>,
    act_grad: OnceLock<ActGradKernel>,
    embed: OnceLock<EmbedKernel>,
    embed_grad: OnceLock<EmbedGradKernel>,
    residual_add: OnceLock<ResidualAddKernel>,
    attention: OnceLock<AttentionKernel>,
    attention_grad_rows: OnceLock<AttentionGradRowsKernel>,
    attention_grad_cols: OnceLock<AttentionGradColsKernel>,
}

impl Kernels {
    /// No pipeline is built yet; the matmul is the adapter's chosen variant.
    pub fn new(ctx: &GpuContext) -> Self {
        Self {
            ctx: ctx.clone(),
            matmul: OnceLock::new(),
            bias_act: OnceLock::new(),
            act_backward: OnceLock::new(),
            softmax: OnceLock::new(),
            col_sum: OnceLock::new(),
            im2col: OnceLock::new(),
            col2im: OnceLock::new(),
            swap_bias: OnceLock::new(),
            channel_sum: OnceLock::new(),
            pool: OnceLock::new(),
            pool_backward: OnceLock::new(),
            norm: OnceLock::new(),
            norm_grad: OnceLock::new(),
            norm_param_grad: OnceLock::new(),
            act: OnceLock::new(),
            act_grad: OnceLock::new(),
            embed: OnceLock::new(),
            embed_grad: OnceLock::new(),
            residual_add: OnceLock::new(),
            attention: OnceLock::new(),
            attention_grad_rows: OnceLock::new(),
            attention_grad_cols: OnceLock::new(),
        }
    }

    pub fn ctx(&self) -> &GpuContext {
        &self.ctx
    }

    pub(crate) fn matmul(&self) -> &MatmulKernel {
        self.matmul
            .get_or_init(|| MatmulKernel::new(&self.ctx, self.ctx.variant))
    }
    pub(crate) fn bias_act(&self) -> &BiasActKernel {
        self.bias_act.get_or_init(|| BiasActKernel::new(&self.ctx))
    }
    pub(crate) fn act_backward(&self) -> &ActBackwardKernel {
        self.act_backward
            .get_or_init(|| ActBackwardKernel::new(&self.ctx))
    }
    pub(crate) fn softmax(&self) -> &SoftmaxXentKernel {
        self.softmax
            .get_or_init(|| SoftmaxXentKernel::new(&self.ctx))
    }
    pub(crate) fn col_sum(&self) -> &ColSumKernel {
        self.col_sum.get_or_init(|| ColSumKernel::new(&self.ctx))
    }
    fn im2col(&self) -> &Im2ColKernel {
        self.im2col.get_or_init(|| Im2ColKernel::new(&self.ctx))
    }
    fn col2im(&self) -> &Col2ImKernel {
        self.col2im.get_or_init(|| Col2ImKernel::new(&self.ctx))
    }
    fn swap_bias(&self) -> &SwapBiasKernel {
        self.swap_bias
            .get_or_init(|| SwapBiasKernel::new(&self.ctx))
    }
    fn channel_sum(&self) -> &ChannelSumKernel {
        self.channel_sum
            .get_or_init(|| ChannelSumKernel::new(&self.ctx))
    }
    fn pool(&self) -> &PoolKernel {
        self.pool.get_or_init(|| PoolKernel::new(&self.ctx))
    }
    fn pool_backward(&self) -> &PoolBackwardKernel {
        self.pool_backward
            .get_or_init(|| PoolBackwardKernel::new(&self.ctx))
    }
    fn norm(&self) -> &NormKernel {
        self.norm.get_or_init(|| NormKernel::new(&self.ctx))
    }
    fn norm_grad(&self) -> &NormGradKernel {
        self.norm_grad
            .get_or_init(|| NormGradKernel::new(&self.ctx))
    }
    fn norm_param_grad(&self) -> &NormParamGradKernel {
        self.norm_param_grad
            .get_or_init(|| NormParamGradKernel::new(&self.ctx))
    }
    fn act(&self) -> &ActKernel {
        self.act.get_or_init(|| ActKernel::new(&self.ctx))
    }
    fn act_grad(&self) -> &ActGradKernel {
        self.act_grad.get_or_init(|| ActGradKernel::new(&self.ctx))
    }
    pub(crate) fn embed(&self) -> &EmbedKernel {
        self.embed.get_or_init(|| EmbedKernel::new(&self.ctx))
    }
    pub(crate) fn embed_grad(&self) -> &EmbedGradKernel {
        self.embed_grad
            .get_or_init(|| EmbedGradKernel::new(&self.ctx))
    }
    pub(crate) fn residual_add(&self) -> &ResidualAddKernel {
        self.residual_add
            .get_or_init(|| ResidualAddKernel::new(&self.ctx))
    }
    pub(crate) fn attention(&self) -> &AttentionKernel {
        self.attention
            .get_or_init(|| AttentionKernel::new(&self.ctx))
    }
    pub(crate) fn attention_grad_rows(&self) -> &AttentionGradRowsKernel {
        self.attention_grad_rows
            .get_or_init(|| AttentionGradRowsKernel::new(&self.ctx))
    }
    pub(crate) fn attention_grad_cols(&self) -> &AttentionGradColsKernel {
        self.attention_grad_cols
            .get_or_init(|| AttentionGradColsKernel::new(&self.ctx))
    }
}

/// A conv2d layer's place in the parameter buffer and its geometry for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvLayer {
    pub shape: ConvShape,
    pub out_channels: usize,
    /// Element offsets of the weight `[OC, C, KH, KW]` and the bias `[OC]`.
    pub weight: usize,
    pub bias: usize,
}

impl ConvLayer {
    /// Floats of the unfolded input `col [CK, N·P]`.
    pub fn col_len(&self) -> usize {
        self.shape.ck() * self.shape.np()
    }

    /// Floats of the output (and of its `[OC, N·P]` matrix form).
    pub fn out_len(&self) -> usize {
        self.out_channels * self.shape.np()
    }
}

/// The dispatches [`conv_forward`] and [`conv_backward`] record, in order (for benchmark breakdowns).
pub const CONV_FORWARD_PARTS: [&str; 3] = ["im2col", "matmul W·col", "swap + bias"];
pub const CONV_BACKWARD_PARTS: [&str; 6] = [
    "swap dy",
    "channel sum (db)",
    "im2col",
    "matmul dW = dY·colᵀ",
    "matmul dcol = Wᵀ·dY",
    "col2im",
];

/// conv2d forward: `im2col(x) → col`, `ymat = W · col`, `y = act(swap(ymat) + b)` (NCHW).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_forward(
    k: &Kernels,
    l: &ConvLayer,
    relu: bool,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    col: &wgpu::Buffer,
    ymat: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Vec<Dispatch> {
    let ctx = k.ctx();
    let (ck, np, oc) = (l.shape.ck(), l.shape.np(), l.out_channels);
    let plane = l.shape.oh() * l.shape.ow();
    let mm = MatmulParams::new(MatmulForm::AB, oc, ck, np, l.weight, 0, 0);
    vec![
        k.im2col().dispatch(ctx, "conv", &l.shape, x, col),
        k.matmul().dispatch(ctx, "conv", mm, params, col, ymat),
        k.swap_bias().dispatch(
            ctx,
            "conv",
            (oc, l.shape.n, plane),
            Some(l.bias),
            relu,
            ymat,
            y,
            params,
        ),
    ]
}

/// conv2d backward from the NCHW output gradient `dy` (ReLU already applied): `dymat = swap(dy)`,
/// `db = channel_sum(dy)`, `col = im2col(x)` (recomputed: one shared scratch for every layer), `dW = dymat · colᵀ`,
/// and when `dx` is given `dcol = Wᵀ · dymat`, `dx = col2im(dcol)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_backward(
    k: &Kernels,
    l: &ConvLayer,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    col: &wgpu::Buffer,
    dymat: &wgpu::Buffer,
    dx: Option<(&wgpu::Buffer, &wgpu::Buffer)>,
) -> Result<Vec<Dispatch>, GpuError> {
    let ctx = k.ctx();
    let (ck, np, oc, n) = (l.shape.ck(), l.shape.np(), l.out_channels, l.shape.n);
    let plane = l.shape.oh() * l.shape.ow();
    let mut d = vec![
        k.swap_bias().dispatch(
            ctx,
            "conv grad",
            (n, oc, plane),
            None,
            false,
            dy,
            dymat,
            params,
        ),
        k.channel_sum()
            .dispatch(ctx, "conv bias grad", (n, oc, plane), l.bias, dy, grad)?,
        k.im2col().dispatch(ctx, "conv grad", &l.shape, x, col),
        k.matmul().dispatch(
            ctx,
            "conv weight grad",
            MatmulParams::new(MatmulForm::ABt, oc, np, ck, 0, 0, l.weight),
            dymat,
            col,
            grad,
        ),
    ];
    if let Some((dcol, dx)) = dx {
        d.push(k.matmul().dispatch(
            ctx,
            "conv input grad",
            MatmulParams::new(MatmulForm::AtB, ck, oc, np, l.weight, 0, 0),
            params,
            dymat,
            dcol,
        ));
        d.push(
            k.col2im()
                .dispatch(ctx, "conv input grad", &l.shape, dcol, dx),
        );
    }
    Ok(d)
}

/// A dense layer: `[rows, inputs] → [rows, outputs]`, weight `[inputs, outputs]` then bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseLayer {
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
    pub weight: usize,
    pub bias: usize,
}

/// Dense forward: `y = act(x · W + b)`.
pub(crate) fn dense_forward(
    k: &Kernels,
    l: &DenseLayer,
    relu: bool,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Vec<Dispatch> {
    let ctx = k.ctx();
    let mm = MatmulParams::new(MatmulForm::AB, l.rows, l.inputs, l.outputs, 0, l.weight, 0);
    let act = if relu {
        Activation::Relu
    } else {
        Activation::None
    };
    vec![
        k.matmul().dispatch(ctx, "forward", mm, x, params, y),
        k.bias_act()
            .dispatch(ctx, "forward", l.rows, l.outputs, l.bias, act, y, params),
    ]
}

/// Dense backward from `dz` (ReLU already applied): `dW = xᵀ · dz`, `db = Σ_r dz`, and when `dx` is given
/// `dx = dz · Wᵀ`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_backward(
    k: &Kernels,
    l: &DenseLayer,
    x: &wgpu::Buffer,
    dz: &wgpu::Buffer,
    params: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    dx: Option<&wgpu::Buffer>,
) -> Vec<Dispatch> {
    let ctx = k.ctx();
    let mut d = vec![
        k.matmul().dispatch(
            ctx,
            "weight grad",
            MatmulParams::new(MatmulForm::AtB, l.inputs, l.rows, l.outputs, 0, 0, l.weight),
            x,
            dz,
            grad,
        ),
        k.col_sum()
            .dispatch(ctx, "bias grad", l.rows, l.outputs, l.bias, dz, grad),
    ];
    if let Some(dx) = dx {
        d.push(k.matmul().dispatch(
            ctx,
            "input grad",
            MatmulParams::new(MatmulForm::ABt, l.rows, l.outputs, l.inputs, 0, l.weight, 0),
            dz,
            params,
            dx,
        ));
    }
    d
}

/// ReLU backward in place from the layer's post-activation output `a`: `dz *= [a > 0]`.
pub(crate) fn relu_backward_in_place(
    k: &Kernels,
    len: usize,
    dz: &wgpu::Buffer,
    a: &wgpu::Buffer,
) -> Dispatch {
    k.act_backward().dispatch(k.ctx(), "backward", len, dz, a)
}

/// Pooling forward; `idx` receives max pooling's arg-max (untouched by average pooling).
pub(crate) fn pool_forward(
    k: &Kernels,
    shape: &PoolShape,
    kind: PoolKind,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    idx: &wgpu::Buffer,
) -> Dispatch {
    k.pool().dispatch(k.ctx(), "pool", shape, kind, x, y, idx)
}

pub(crate) fn pool_backward(
    k: &Kernels,
    shape: &PoolShape,
    kind: PoolKind,
    dy: &wgpu::Buffer,
    idx: &wgpu::Buffer,
    dx: &wgpu::Buffer,
) -> Dispatch {
    k.pool_backward()
        .dispatch(k.ctx(), "pool grad", shape, kind, dy, idx, dx)
}

/// Normalisation forward, keeping the per-row statistics in `stats`.
pub(crate) fn norm_forward(
    k: &Kernels,
    shape: &NormShape,
    x: &wgpu::Buffer,
    params: &wgpu::Buffer,
    y: &wgpu::Buffer,
    stats: &wgpu::Buffer,
) -> Dispatch {
    k.norm()
        .dispatch(k.ctx(), "norm", shape, x, y, params, stats)
}

/// Normalisation backward: gamma / beta gradients into `grad`, and the input gradient when `dx` is given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward(
    k: &Kernels,
    shape: &NormShape,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    params: &wgpu::Buffer,
    stats: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    dx: Option<&wgpu::Buffer>,
) -> Vec<Dispatch> {
    let ctx = k.ctx();
    let mut d =
        vec![
            k.norm_param_grad()
                .dispatch(ctx, "norm param grad", shape, x, dy, stats, grad),
        ];
    if let Some(dx) = dx {
        d.push(
            k.norm_grad()
                .dispatch(ctx, "norm input grad", shape, x, dy, params, stats, dx),
        );
    }
    d
}

/// Elementwise activation forward, out of place.
pub(crate) fn act_forward(
    k: &Kernels,
    act: ElementwiseAct,
    len: usize,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Dispatch {
    k.act().dispatch(k.ctx(), "act", act, len, x, y)
}

/// Elementwise activation backward from the activation's input `x`, out of place.
pub(crate) fn act_backward(
    k: &Kernels,
    act: ElementwiseAct,
    len: usize,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
) -> Dispatch {
    k.act_grad()
        .dispatch(k.ctx(), "act grad", act, len, x, dy, dx)
}
