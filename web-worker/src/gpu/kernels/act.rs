//! Elementwise activations out of place: forward `y = f(x)` (`shaders/act_forward.wgsl`) and gradient
//! `dx = dy·f'(x)` (`shaders/act_grad.wgsl`).

use super::Kernel;
use crate::gpu::GpuContext;
use crate::gpu::transfer::{self, Dispatch};

/// The activations these kernels compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementwiseAct {
    Relu,
    /// The tanh form, `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`.
    Gelu,
}

impl ElementwiseAct {
    fn code(self) -> u32 {
        match self {
            Self::Relu => 0,
            Self::Gelu => 1,
        }
    }
}

/// Mirrors `Params` of `shaders/act_forward.wgsl` and `shaders/act_grad.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ActParams {
    len: u32,
    kind: u32,
    _pad: [u32; 2],
}

/// `y = f(x)`.
#[derive(Debug, Clone)]
pub(crate) struct ActKernel(Kernel);

impl ActKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "act_forward",
            include_str!("../../../../shaders/act_forward.wgsl"),
            &[],
        ))
    }

    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        act: ElementwiseAct,
        len: usize,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let p = ActParams {
            len: len as u32,
            kind: act.code(),
            _pad: [0; 2],
        };
        let groups = transfer::grid_1d(ctx, (len as u32).div_ceil(64));
        self.0.dispatch(ctx, what, &p, &[x, y], groups)
    }
}

/// `dx = dy·f'(x)`, `x` the activation's input.
#[derive(Debug, Clone)]
pub(crate) struct ActGradKernel(Kernel);

impl ActGradKernel {
    pub fn new(ctx: &GpuContext) -> Self {
        Self(Kernel::new(
            ctx,
            "act_grad",
            include_str!("../../../../shaders/act_grad.wgsl"),
            &[],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        act: ElementwiseAct,
        len: usize,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let p = ActParams {
            len: len as u32,
            kind: act.code(),
            _pad: [0; 2],
        };
        let groups = transfer::grid_1d(ctx, (len as u32).div_ceil(64));
        self.0.dispatch(ctx, what, &p, &[x, dy, dx], groups)
    }
}
