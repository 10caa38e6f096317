//! The causal multi-head attention core: forward and its backward in two passes, query rows (ds, dq) then key /
//! value columns (dk, dv), each gradient element written by one invocation (deterministic). Every pass has two
//! kernels with the same math, summation order and bindings: one invocation per row reading storage directly
//! (`shaders/attention_{forward,grad_rows,grad_cols}.wgsl`, any head width) and a workgroup-tiled one that stages
//! keys / values (or queries / output gradients) through workgroup memory (`shaders/attention_*_tiled.wgsl`, head
//! widths up to [`TILED_MAX_HEAD`]). The engine runs [`AttnVariant::ENGINE`], the per-row kernels: on lavapipe the
//! tiled ones measured 0.55–0.75× their speed (`examples/attention_bench.rs`: llvmpipe's workgroup barriers and
//! per-invocation accumulator arrays cost more than the storage reads they save); they stay, tested, for adapters
//! with real workgroup memory, where they are not yet measured.

use starling_core::transformer::AttnDims;

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// Widest head the tiled kernels take: their per-invocation accumulators and 32-row tiles hold 64 values per row.
pub const TILED_MAX_HEAD: usize = 64;
/// Rows (queries or key positions) per workgroup of the tiled kernels.
const TILED_ROWS: usize = 64;

/// Which kernel runs an attention pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnVariant {
    /// One invocation per row, reading storage directly (any head width).
    PerRow,
    /// Workgroup-tiled (head width ≤ [`TILED_MAX_HEAD`]).
    Tiled,
}

impl AttnVariant {
    /// What the engine runs (see the module docs for why).
    pub const ENGINE: Self = Self::PerRow;

    /// Whether this kernel takes heads of `dims` (a tiled request for a wider head runs per row).
    pub fn fits(self, dims: AttnDims) -> bool {
        self == Self::PerRow || dims.head_width() <= TILED_MAX_HEAD
    }
}

/// Mirrors `Params` of the six attention kernels.
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

/// Per-row kernels: one invocation per (sequence, head, position), `B·H·T` of them in workgroups of 64. Tiled
/// kernels: one workgroup per (sequence, head, block of 64 positions).
fn grid(ctx: &GpuContext, dims: AttnDims, variant: AttnVariant) -> [u32; 3] {
    let groups = match variant {
        AttnVariant::PerRow => (dims.batch * dims.heads * dims.seq).div_ceil(64),
        AttnVariant::Tiled => dims.batch * dims.heads * dims.seq.div_ceil(TILED_ROWS),
    };
    transfer::grid_1d(ctx, groups as u32)
}

/// One attention pass as both kernels, built once.
#[derive(Debug, Clone)]
struct Pass {
    per_row: Kernel,
    tiled: Kernel,
}

impl Pass {
    fn new(ctx: &GpuContext, names: [&'static str; 2], sources: [&str; 2]) -> Self {
        Self {
            per_row: Kernel::new(ctx, names[0], sources[0], &[]),
            tiled: Kernel::new(ctx, names[1], sources[1], &[]),
        }
    }

    fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        variant: AttnVariant,
        buffers: &[&wgpu::Buffer],
    ) -> Dispatch {
        // A head too wide for the tiled kernel runs per row whatever was asked (the tiled one would do nothing).
        let variant = if variant.fits(dims) {
            variant
        } else {
            AttnVariant::PerRow
        };
        let kernel = match variant {
            AttnVariant::PerRow => &self.per_row,
            AttnVariant::Tiled => &self.tiled,
        };
        kernel.dispatch(ctx, what, &params(dims), buffers, grid(ctx, dims, variant))
    }
}

/// `probs`, `y` from `qkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionKernel(Pass);

impl AttentionKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Pass::new(
            ctx,
            ["attention_forward", "attention_forward_tiled"],
            [
                include_str!("../../../../shaders/attention_forward.wgsl"),
                include_str!("../../../../shaders/attention_forward_tiled.wgsl"),
            ],
        ))
    }

    #[allow(clippy::too_many_arguments)] // the pass, its shape and kernel, and its three buffers.
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        variant: AttnVariant,
        qkv: &wgpu::Buffer,
        probs: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        self.0.dispatch(ctx, what, dims, variant, &[qkv, probs, y])
    }
}

/// The buffers of both backward passes, in binding order: `qkv`, `probs`, `dy`, `ds`, `dqkv`.
pub(crate) type GradBuffers<'a> = [&'a wgpu::Buffer; 5];

/// `ds` and the q columns of `dqkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionGradRowsKernel(Pass);

impl AttentionGradRowsKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Pass::new(
            ctx,
            ["attention_grad_rows", "attention_grad_rows_tiled"],
            [
                include_str!("../../../../shaders/attention_grad_rows.wgsl"),
                include_str!("../../../../shaders/attention_grad_rows_tiled.wgsl"),
            ],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        variant: AttnVariant,
        buffers: GradBuffers<'_>,
    ) -> Dispatch {
        self.0.dispatch(ctx, what, dims, variant, &buffers)
    }
}

/// The k and v columns of `dqkv`.
#[derive(Debug, Clone)]
pub(crate) struct AttentionGradColsKernel(Pass);

impl AttentionGradColsKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Pass::new(
            ctx,
            ["attention_grad_cols", "attention_grad_cols_tiled"],
            [
                include_str!("../../../../shaders/attention_grad_cols.wgsl"),
                include_str!("../../../../shaders/attention_grad_cols_tiled.wgsl"),
            ],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        dims: AttnDims,
        variant: AttnVariant,
        buffers: GradBuffers<'_>,
    ) -> Dispatch {
        self.0.dispatch(ctx, what, dims, variant, &buffers)
    }
}
