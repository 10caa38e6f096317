//! conv2d's kernels around the matmul: im2col, col2im, the axis swap with bias (+ ReLU), per-channel sums.
//!
//! The convolution of a whole batch is one matmul: `Y [OC, N·P] = W [OC, CK] · col [CK, N·P]` with `col` from
//! `im2col.wgsl`; `swap_bias.wgsl` turns `Y` into NCHW and adds the bias. Backward, `swap_bias` turns the NCHW
//! output gradient into `dY [OC, N·P]`; then `dW = dY · colᵀ` (form A·Bᵀ, straight into the weight's gradient slot),
//! `db = channel_sum(dy)`, `dcol = Wᵀ · dY` (form Aᵀ·B) and `col2im` folds `dcol` into the input gradient.

use super::Kernel;
use crate::gpu::transfer::{self, Dispatch};
use crate::gpu::{GpuContext, GpuError};

/// The geometry of one conv2d (or pooling) layer over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch rows.
    pub n: usize,
    /// Input channels, height and width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Output height: `(H + 2·pad − KH) / stride + 1`.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }

    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }

    /// Rows of the unfolded matrix: `C·KH·KW`.
    pub fn ck(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the unfolded matrix: `N·OH·OW`.
    pub fn np(&self) -> usize {
        self.n * self.oh() * self.ow()
    }

    fn params(&self, x_off: usize) -> ConvParams {
        ConvParams {
            n: self.n as u32,
            c: self.c as u32,
            h: self.h as u32,
            w: self.w as u32,
            kh: self.kh as u32,
            kw: self.kw as u32,
            stride: self.stride as u32,
            pad: self.pad as u32,
            oh: self.oh() as u32,
            ow: self.ow() as u32,
            x_off: x_off as u32,
            _pad: 0,
        }
    }
}

/// Mirrors `Params` of `shaders/im2col.wgsl` and `shaders/col2im.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvParams {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    x_off: u32,
    _pad: u32,
}

/// `col [CK, N·P]` from the NCHW input (`shaders/im2col.wgsl`).
#[derive(Debug, Clone)]
pub(crate) struct Im2ColKernel(Kernel);

impl Im2ColKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "im2col",
            include_str!("../../../../shaders/im2col.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &ConvShape,
        x: &wgpu::Buffer,
        col: &wgpu::Buffer,
    ) -> Dispatch {
        let plane = shape.oh() * shape.ow();
        let groups = transfer::grid_3d(ctx, [plane.div_ceil(64), shape.ck(), shape.n]);
        self.0
            .dispatch(ctx, what, &shape.params(0), &[x, col], groups)
    }
}

/// The input gradient `dx` (NCHW) from `dcol [CK, N·P]` (`shaders/col2im.wgsl`).
#[derive(Debug, Clone)]
pub(crate) struct Col2ImKernel(Kernel);

impl Col2ImKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "col2im",
            include_str!("../../../../shaders/col2im.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &ConvShape,
        dcol: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let groups = transfer::grid_3d(ctx, [(shape.h * shape.w).div_ceil(64), shape.c, shape.n]);
        self.0
            .dispatch(ctx, what, &shape.params(0), &[dcol, dx], groups)
    }
}

/// Mirrors `Params` of `shaders/swap_bias.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SwapParams {
    a: u32,
    b: u32,
    plane: u32,
    bias_off: u32,
    has_bias: u32,
    relu: u32,
    _pad: [u32; 2],
}

/// `out [B, A, P] = act(in [A, B, P] + bias[a])` (`shaders/swap_bias.wgsl`).
#[derive(Debug, Clone)]
pub(crate) struct SwapBiasKernel(Kernel);

impl SwapBiasKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "swap_bias",
            include_str!("../../../../shaders/swap_bias.wgsl"),
            &[],
        ))
    }

    /// `bias`: the bias's element offset in `params`, or `None` for a plain swap.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        (a, b, plane): (usize, usize, usize),
        bias: Option<usize>,
        relu: bool,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        params: &wgpu::Buffer,
    ) -> Dispatch {
        let p = SwapParams {
            a: a as u32,
            b: b as u32,
            plane: plane as u32,
            bias_off: bias.unwrap_or(0) as u32,
            has_bias: u32::from(bias.is_some()),
            relu: u32::from(relu),
            _pad: [0; 2],
        };
        let groups = transfer::grid_3d(ctx, [plane.div_ceil(64), a, b]);
        self.0.dispatch(ctx, what, &p, &[src, dst, params], groups)
    }
}

/// Mirrors `Params` of `shaders/channel_sum.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ChannelSumParams {
    n: u32,
    c: u32,
    plane: u32,
    out_off: u32,
}

/// `out[out_off + c] = Σ_n Σ_q dy[n, c, q]` (`shaders/channel_sum.wgsl`): the conv bias gradient.
#[derive(Debug, Clone)]
pub(crate) struct ChannelSumKernel(Kernel);

impl ChannelSumKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "channel_sum",
            include_str!("../../../../shaders/channel_sum.wgsl"),
            &[],
        ))
    }

    /// One workgroup per channel, so `c` must fit one grid axis.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        (n, c, plane): (usize, usize, usize),
        out_off: usize,
        dy: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch, GpuError> {
        let limit = ctx.limits.max_compute_workgroups_per_dimension;
        if c as u32 > limit {
            return Err(GpuError::Grid {
                groups: c as u32,
                limit,
            });
        }
        let p = ChannelSumParams {
            n: n as u32,
            c: c as u32,
            plane: plane as u32,
            out_off: out_off as u32,
        };
        Ok(self.0.dispatch(ctx, what, &p, &[dy, out], [c as u32, 1, 1]))
    }
}
