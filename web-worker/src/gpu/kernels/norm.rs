//! Layer and group normalisation: forward with per-row statistics (`shaders/norm_forward.wgsl`), the input
//! gradient (`shaders/norm_backward.wgsl`) and the gamma / beta gradient (`shaders/norm_param_grad.wgsl`).

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// What one normalisation normalises: `rows` rows of `len` values, with the affine index of element `e` of row
/// `r` being `((r mod groups)·len + e) / plane` (see `shaders/norm_forward.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormShape {
    pub rows: usize,
    pub len: usize,
    pub groups: usize,
    pub plane: usize,
    pub eps: f32,
    /// Element offsets of gamma and beta in the parameter (and gradient) buffer.
    pub gamma: usize,
    pub beta: usize,
}

impl NormShape {
    /// layer_norm over each of `rows` samples' `len` features, one gamma / beta per feature.
    pub fn layer(rows: usize, len: usize, eps: f32, gamma: usize, beta: usize) -> Self {
        Self {
            rows,
            len,
            groups: 1,
            plane: 1,
            eps,
            gamma,
            beta,
        }
    }

    /// group_norm over NCHW `[n, c, plane]` in `groups` groups of `c / groups` channels, one gamma / beta per
    /// channel.
    #[allow(clippy::too_many_arguments)]
    pub fn group(
        n: usize,
        c: usize,
        plane: usize,
        groups: usize,
        eps: f32,
        gamma: usize,
        beta: usize,
    ) -> Self {
        Self {
            rows: n * groups,
            len: c / groups * plane,
            groups,
            plane,
            eps,
            gamma,
            beta,
        }
    }

    /// Number of gamma (and beta) values.
    pub fn affine(&self) -> usize {
        self.groups * self.len / self.plane
    }

    fn params(&self) -> NormParams {
        NormParams {
            rows: self.rows as u32,
            len: self.len as u32,
            groups: self.groups as u32,
            plane: self.plane as u32,
            gamma_off: self.gamma as u32,
            beta_off: self.beta as u32,
            eps: self.eps,
            _pad: 0,
        }
    }
}

/// Mirrors `Params` of the three norm kernels.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    len: u32,
    groups: u32,
    plane: u32,
    gamma_off: u32,
    beta_off: u32,
    eps: f32,
    _pad: u32,
}

/// Bytes of the per-row statistics `(μ, ρ)` for `rows` rows.
pub fn stats_bytes(rows: usize) -> u64 {
    (rows * 8) as u64
}

/// `y = (x − μ)·ρ·gamma + beta` per row, keeping `(μ, ρ)` in `stats`.
#[derive(Debug, Clone)]
pub(crate) struct NormKernel(Kernel);

impl NormKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "norm_forward",
            include_str!("../../../../shaders/norm_forward.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &NormShape,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        params: &wgpu::Buffer,
        stats: &wgpu::Buffer,
    ) -> Dispatch {
        let groups = transfer::grid_1d(ctx, shape.rows as u32);
        self.0
            .dispatch(ctx, what, &shape.params(), &[x, y, params, stats], groups)
    }
}

/// The input gradient `dx` from `x`, `dy`, gamma and the forward statistics.
#[derive(Debug, Clone)]
pub(crate) struct NormGradKernel(Kernel);

impl NormGradKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "norm_backward",
            include_str!("../../../../shaders/norm_backward.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &NormShape,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        params: &wgpu::Buffer,
        stats: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let groups = transfer::grid_1d(ctx, shape.rows as u32);
        self.0.dispatch(
            ctx,
            what,
            &shape.params(),
            &[x, dy, params, stats, dx],
            groups,
        )
    }
}

/// dgamma and dbeta into their slots of the gradient buffer.
#[derive(Debug, Clone)]
pub(crate) struct NormParamGradKernel(Kernel);

impl NormParamGradKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "norm_param_grad",
            include_str!("../../../../shaders/norm_param_grad.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        shape: &NormShape,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        stats: &wgpu::Buffer,
        grad: &wgpu::Buffer,
    ) -> Dispatch {
        let groups = transfer::grid_1d(ctx, shape.affine() as u32);
        self.0
            .dispatch(ctx, what, &shape.params(), &[x, dy, stats, grad], groups)
    }
}
