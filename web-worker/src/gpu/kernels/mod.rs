//! One struct per WGSL kernel: each builds its pipeline once and records dispatches against caller-owned
//! buffers; each `Params` mirrors the WGSL uniform struct field for field, padded to 16 bytes.

mod act; // Elementwise ReLU / GELU forward and gradient, out of place.
mod attention; // Causal multi-head attention core, forward and backward (issue 13).
mod conv; // im2col, col2im, the axis swap with bias, per-channel sums.
mod dense; // Bias + activation, ReLU backward, softmax-cross-entropy, column sums.
mod embed; // Token / positional embeddings and their table gradients, the residual add.
mod matmul; // The matmul variants and their choice per adapter.
mod norm; // Layer / group norm forward, input gradient, gamma / beta gradient.
mod pool; // Max and average pooling, forward and backward.

pub use act::ElementwiseAct;
pub(crate) use act::{ActGradKernel, ActKernel};
pub(crate) use attention::{AttentionGradColsKernel, AttentionGradRowsKernel, AttentionKernel};
pub use attention::{AttnVariant, TILED_MAX_HEAD};
pub use conv::ConvShape;
pub(crate) use conv::{ChannelSumKernel, Col2ImKernel, Im2ColKernel, SwapBiasKernel};
pub(crate) use dense::{
    ActBackwardKernel, BiasActKernel, ColSumKernel, STATS_BYTES, SoftmaxXentKernel, decode_stats,
};
pub(crate) use embed::{EmbedGradKernel, EmbedKernel, ResidualAddKernel};
pub use embed::{EmbedShape, EmbedTable};
pub use matmul::{AdapterTraits, BlockTile, MatmulKernel, MatmulParams, MatmulVariant};
pub use norm::NormShape;
pub(crate) use norm::{NormGradKernel, NormKernel, NormParamGradKernel, stats_bytes};
pub(crate) use pool::{PoolBackwardKernel, PoolKernel};
pub use pool::{PoolKind, PoolShape};

use super::GpuContext;
use super::transfer::{self, Dispatch};

/// A compute pipeline with an auto-derived bind-group layout: binding 0 is the uniform `Params`, then the
/// storage buffers in binding order.
#[derive(Debug, Clone)]
struct Kernel {
    label: &'static str,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    fn new(ctx: &GpuContext, label: &'static str, source: &str, constants: &[(&str, f64)]) -> Self {
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let pipeline = ctx
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        let layout = pipeline.get_bind_group_layout(0);
        Self {
            label,
            pipeline,
            layout,
        }
    }

    /// Records one dispatch of this kernel with its own uniform buffer.
    fn dispatch<T: bytemuck::Pod>(
        &self,
        ctx: &GpuContext,
        what: &str,
        params: &T,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Dispatch {
        let label = format!("{} {what}", self.label);
        let uniform = transfer::uniform(ctx, &label, params);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(
            buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: b.as_entire_binding(),
                }),
        );
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &self.layout,
            entries: &entries,
        });
        Dispatch {
            pipeline: self.pipeline.clone(),
            bind_group,
            groups,
        }
    }
}
