//! The per-position transformer kernels: token / positional embedding forward (`shaders/embed_forward.wgsl`), their
//! table gradients without float atomics (`shaders/embed_grad.wgsl`) and the residual add
//! (`shaders/residual_add.wgsl`).

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// Which table an embedding kernel reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedTable {
    /// The `[vocab, C]` token table, indexed by the ids in `x`.
    Token { vocab: usize },
    /// The `[T, C]` positional table, indexed by the position within each sequence.
    Positional,
}

/// One embedding layer over `positions = B·T` rows of `width`, its table at element `table` of the parameter
/// (and gradient) buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    pub positions: usize,
    pub width: usize,
    pub seq: usize,
    pub kind: EmbedTable,
    pub table: usize,
}

impl EmbedShape {
    fn rows(&self) -> usize {
        match self.kind {
            EmbedTable::Token { vocab } => vocab,
            EmbedTable::Positional => self.seq,
        }
    }

    fn params(&self, accumulate: bool) -> EmbedParams {
        let (mode, vocab) = match self.kind {
            EmbedTable::Token { vocab } => (0, vocab as u32),
            EmbedTable::Positional => (1, 0),
        };
        EmbedParams {
            positions: self.positions as u32,
            width: self.width as u32,
            seq: self.seq as u32,
            vocab,
            table: self.table as u32,
            mode,
            accumulate: u32::from(accumulate),
            _pad: 0,
        }
    }
}

/// Mirrors `Params` of `shaders/embed_forward.wgsl` and `shaders/embed_grad.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    positions: u32,
    width: u32,
    seq: u32,
    vocab: u32,
    table: u32,
    mode: u32,
    accumulate: u32,
    _pad: u32,
}

/// Mirrors `Params` of `shaders/residual_add.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AddParams {
    len: u32,
    _pad: [u32; 3],
}

/// `y = table[ids]` or `y = x + pos[n mod T]`.
#[derive(Debug, Clone)]
pub(crate) struct EmbedKernel(Kernel);

impl EmbedKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "embed_forward",
            include_str!("../../../../shaders/embed_forward.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &EmbedShape,
        x: &wgpu::Buffer,
        params: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let len = (shape.positions * shape.width) as u32;
        let groups = transfer::grid_1d(ctx, len.div_ceil(64));
        self.0
            .dispatch(ctx, what, &shape.params(false), &[x, params, y], groups)
    }
}

/// The table gradient of an embedding, overwritten or (a tied token table) added to.
#[derive(Debug, Clone)]
pub(crate) struct EmbedGradKernel(Kernel);

impl EmbedGradKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "embed_grad",
            include_str!("../../../../shaders/embed_grad.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &EmbedShape,
        accumulate: bool,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        grad: &wgpu::Buffer,
    ) -> Dispatch {
        let len = (shape.rows() * shape.width) as u32;
        let groups = transfer::grid_1d(ctx, len.div_ceil(64));
        self.0
            .dispatch(ctx, what, &shape.params(accumulate), &[x, dy, grad], groups)
    }
}

/// `y = a + b`.
#[derive(Debug, Clone)]
pub(crate) struct ResidualAddKernel(Kernel);

impl ResidualAddKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "residual_add",
            include_str!("../../../../shaders/residual_add.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        len: usize,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let p = AddParams {
            len: len as u32,
            _pad: [0; 3],
        };
        let groups = transfer::grid_1d(ctx, (len as u32).div_ceil(64));
        self.0.dispatch(ctx, what, &p, &[a, b, y], groups)
    }
}
