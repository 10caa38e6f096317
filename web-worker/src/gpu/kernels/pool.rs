//! Max and average pooling over NCHW planes, forward (`shaders/pool_forward.wgsl`) and backward
//! (`shaders/pool_backward.wgsl`); max pooling keeps the arg-max of each window for its backward pass.

use super::Kernel;
use super::conv::ConvShape;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// Which pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The first maximum of each window (row-major order) wins ties.
    Max,
    /// Mean over the window; `count_pad`: divide by `KH·KW` (padding counts as zeros) rather than by the cells
    /// inside the plane.
    Avg { count_pad: bool },
}

/// A pooling layer's geometry: the same fields as a convolution's (`c` counts planes per row).
pub type PoolShape = ConvShape;

/// Mirrors `Params` of `shaders/pool_forward.wgsl` and `shaders/pool_backward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PoolParams {
    planes: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    is_max: u32,
    count_pad: u32,
    _pad: u32,
}

fn params(shape: &PoolShape, kind: PoolKind) -> PoolParams {
    PoolParams {
        planes: (shape.n * shape.c) as u32,
        h: shape.h as u32,
        w: shape.w as u32,
        kh: shape.kh as u32,
        kw: shape.kw as u32,
        stride: shape.stride as u32,
        pad: shape.pad as u32,
        oh: shape.oh() as u32,
        ow: shape.ow() as u32,
        is_max: u32::from(kind == PoolKind::Max),
        count_pad: u32::from(kind == PoolKind::Avg { count_pad: true }),
        _pad: 0,
    }
}

/// `y` (and, for max, the arg-max `idx`) from `x`.
#[derive(Debug, Clone)]
pub(crate) struct PoolKernel(Kernel);

impl PoolKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "pool_forward",
            include_str!("../../../../shaders/pool_forward.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &PoolShape,
        kind: PoolKind,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        idx: &wgpu::Buffer,
    ) -> Dispatch {
        let len = (shape.n * shape.c * shape.oh() * shape.ow()) as u32;
        let groups = transfer::grid_1d(ctx, len.div_ceil(64));
        self.0
            .dispatch(ctx, what, &params(shape, kind), &[x, y, idx], groups)
    }
}

/// `dx` from `dy` (and, for max, the forward pass's arg-max `idx`).
#[derive(Debug, Clone)]
pub(crate) struct PoolBackwardKernel(Kernel);

impl PoolBackwardKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "pool_backward",
            include_str!("../../../../shaders/pool_backward.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &PoolShape,
        kind: PoolKind,
        dy: &wgpu::Buffer,
        idx: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let len = (shape.n * shape.c * shape.h * shape.w) as u32;
        let groups = transfer::grid_1d(ctx, len.div_ceil(64));
        self.0
            .dispatch(ctx, what, &params(shape, kind), &[dy, idx, dx], groups)
    }
}
