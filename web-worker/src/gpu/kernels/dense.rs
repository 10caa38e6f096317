//! The dense layers' kernels: bias + activation, ReLU backward, fused softmax-cross-entropy and column sums.

use starling_core::Activation;

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// Mirrors `Params` of `shaders/bias_act.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BiasActParams {
    rows: u32,
    cols: u32,
    bias_off: u32,
    relu: u32,
}

/// `z = act(z + bias)` in place, the bias read from the parameter buffer at an element offset.
#[derive(Debug, Clone)]
pub(crate) struct BiasActKernel(Kernel);

impl BiasActKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "bias_act",
            include_str!("../../../../shaders/bias_act.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        rows: usize,
        cols: usize,
        bias_off: usize,
        act: Activation,
        z: &wgpu::Buffer,
        params: &wgpu::Buffer,
    ) -> Dispatch {
        let p = BiasActParams {
            rows: rows as u32,
            cols: cols as u32,
            bias_off: bias_off as u32,
            relu: u32::from(act == Activation::Relu),
        };
        let groups = transfer::grid_1d(ctx, ((rows * cols) as u32).div_ceil(64));
        self.0.dispatch(ctx, what, &p, &[z, params], groups)
    }
}

/// Mirrors `Params` of `shaders/act_backward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ActBackwardParams {
    len: u32,
    _pad: [u32; 3],
}

/// `dz *= (a > 0)` in place (ReLU backward).
#[derive(Debug, Clone)]
pub(crate) struct ActBackwardKernel(Kernel);

impl ActBackwardKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "act_backward",
            include_str!("../../../../shaders/act_backward.wgsl"),
            &[],
        ))
    }

    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        len: usize,
        dz: &wgpu::Buffer,
        a: &wgpu::Buffer,
    ) -> Dispatch {
        let p = ActBackwardParams {
            len: len as u32,
            _pad: [0; 3],
        };
        let groups = transfer::grid_1d(ctx, (len as u32).div_ceil(64));
        self.0.dispatch(ctx, what, &p, &[dz, a], groups)
    }
}

/// Mirrors `Params` of `shaders/softmax_xent.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    rows: u32,
    classes: u32,
    write_grad: u32,
    _pad: u32,
}

/// Bytes of the softmax kernel's `Stats` output: `{loss_sum: f32, correct: u32}`.
pub(crate) const STATS_BYTES: u64 = 8;

/// Fused softmax-cross-entropy: loss sum, correct count and (optionally) dlogits of the mean loss.
#[derive(Debug, Clone)]
pub(crate) struct SoftmaxXentKernel(Kernel);

impl SoftmaxXentKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "softmax_xent",
            include_str!("../../../../shaders/softmax_xent.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        rows: usize,
        classes: usize,
        write_grad: bool,
        logits: &wgpu::Buffer,
        labels: &wgpu::Buffer,
        dlogits: &wgpu::Buffer,
        stats: &wgpu::Buffer,
    ) -> Dispatch {
        let p = SoftmaxParams {
            rows: rows as u32,
            classes: classes as u32,
            write_grad: u32::from(write_grad),
            _pad: 0,
        };
        self.0
            .dispatch(ctx, what, &p, &[logits, labels, dlogits, stats], [1, 1, 1])
    }
}

/// Decodes the softmax kernel's stats: (loss sum, correct rows).
pub(crate) fn decode_stats(bytes: &[u8]) -> (f32, u32) {
    let words: [u32; 2] = [
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    ];
    (f32::from_bits(words[0]), words[1])
}

/// Mirrors `Params` of `shaders/col_sum.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ColSumParams {
    rows: u32,
    cols: u32,
    out_off: u32,
    _pad: u32,
}

/// `out[out_off + j] = Σ_r dz[r, j]` (bias gradient).
#[derive(Debug, Clone)]
pub(crate) struct ColSumKernel(Kernel);

impl ColSumKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "col_sum",
            include_str!("../../../../shaders/col_sum.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        rows: usize,
        cols: usize,
        out_off: usize,
        dz: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Dispatch {
        let p = ColSumParams {
            rows: rows as u32,
            cols: cols as u32,
            out_off: out_off as u32,
            _pad: 0,
        };
        self.0.dispatch(
            ctx,
            what,
            &p,
            &[dz, out],
            [(cols as u32).div_ceil(64), 1, 1],
        )
    }
}
