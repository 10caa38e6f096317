//! The causal multi-head attention core: forward (`shaders/attention_forward.wgsl`) and its backward in two passes,
//! query rows (`shaders/attention_grad_rows.wgsl`: ds, dq) then key / value columns
//! (`shaders/attention_grad_cols.wgsl`: dk, dv), each gradient element written by one invocation (deterministic).

use starling_core::transformer::AttnDims;

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// Mirrors `Params` of the three attention kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    batch: u32,
    seq: u32,
    width: u32,
    heads: u32,
    scale: f32,
    _pad: [u32; 3],
}

fn params(dims: AttnDims) -> AttnParams {
    AttnParams {
        batch: dims.batch as u32,
        seq: dims.seq as u32,
        width: dims.width as u32,
        heads: dims.heads as u32,
        // The reference scales in f64; one rounding of 1/√D here.
        scale: (1.0 / (dims.head_width() as f64).sqrt()) as f32,
        _pad: [0; 3],
    }
}

/// One invocation per (sequence, head, position): `B·H·T` of them in workgroups of 64.
fn grid(ctx: &GpuContext, dims: AttnDims) -> [u32; 3] {
    let rows = (dims.batch * dims.heads * dims.seq) as u32;
    transfer::grid_1d(ctx, rows.div_ceil(64))
}

/// `probs`, `y` from `qkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionKernel(Kernel);

impl AttentionKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "attention_forward",
            include_str!("../../../../shaders/attention_forward.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        qkv: &wgpu::Buffer,
        probs: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        self.0
            .dispatch(ctx, what, &params(dims), &[qkv, probs, y], grid(ctx, dims))
    }
}

/// `ds` and the q columns of `dqkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionGradRowsKernel(Kernel);

impl AttentionGradRowsKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "attention_grad_rows",
            include_str!("../../../../shaders/attention_grad_rows.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        qkv: &wgpu::Buffer,
        probs: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        ds: &wgpu::Buffer,
        dqkv: &wgpu::Buffer,
    ) -> Dispatch {
        self.0.dispatch(
            ctx,
            what,
            &params(dims),
            &[qkv, probs, dy, ds, dqkv],
            grid(ctx, dims),
        )
    }
}

/// The k and v columns of `dqkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionGradColsKernel(Kernel);

impl AttentionGradColsKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "attention_grad_cols",
            include_str!("../../../../shaders/attention_grad_cols.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        qkv: &wgpu::Buffer,
        probs: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        ds: &wgpu::Buffer,
        dqkv: &wgpu::Buffer,
    ) -> Dispatch {
        self.0.dispatch(
            ctx,
            what,
            &params(dims),
            &[qkv, probs, dy, ds, dqkv],
            grid(ctx, dims),
        )
    }
}
