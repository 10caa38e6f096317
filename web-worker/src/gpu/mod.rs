//! WGSL kernels on wgpu: device setup, one struct per kernel, the resident-model engine.
//!
//! Layers: [`GpuContext`] (adapter + device, chosen once) → `transfer` (the one helper that uploads, dispatches
//! and reads back) → `kernels` (one struct per WGSL kernel, each building its pipeline once) → [`GpuEngine`]
//! (a model version resident on the GPU, with cached per-batch-size dispatch plans). Native and wasm32 differ only
//! in how a read-back is driven (see `transfer`).
//!
//! Invariant: results match `starling_core::reference` within the tolerances stated in `tests/kernels.rs`.

pub mod codegen; // Generator of the unrolled subgroup matmul for CPU-emulated adapters.
mod engine; // The resident-model engine: buffers, cached dispatch plans, step and evaluate.
mod kernels; // One struct per WGSL kernel with its mirrored `Params`.
pub mod layers; // What each layer kind records, forward and backward; the lazily built pipelines.
mod nodes; // The layer graph resolved into the nodes the engine records.
pub mod ops; // One layer at a time on the GPU (kernel tests, benchmark).
pub mod selftest; // Every matmul variant and one full step against the CPU backend, natively and in the browser.
mod transfer; // The shared upload / dispatch / read-back helper.
pub mod transformer; // What the transformer layers record: embeddings, the block, the LM head (issue 13).

use std::sync::Arc;

pub use engine::GpuEngine;
pub use kernels::{
    AdapterTraits, AttnVariant, BlockTile, ConvShape, ElementwiseAct, EmbedShape, EmbedTable,
    MatmulKernel, MatmulParams, MatmulVariant, NormShape, PoolKind, PoolShape, TILED_MAX_HEAD,
};
pub use layers::{ConvLayer, DenseLayer, Kernels};
use starling_core::Activation;
use starling_core::reference::MatmulForm;

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no WebGPU adapter is available: {0}")]
    NoAdapter(String),
    #[error("the adapter refused a device: {0}")]
    RequestDevice(String),
    #[error(transparent)]
    Batch(#[from] starling_core::BatchError),
    #[error("reading results back from the GPU failed: {0}")]
    Map(String),
    #[error("waiting for the GPU failed: {0}")]
    Poll(String),
    #[error(
        "a {what} of {bytes} bytes exceeds the adapter's storage-binding limit of {limit} bytes"
    )]
    TooLarge {
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "a dispatch needs {groups} workgroups along one axis, over the adapter's limit of {limit}; use smaller batches"
    )]
    Grid { groups: u32, limit: u32 },
    #[error("the WGSL engine has no kernels for `{layer}` layers yet")]
    Unsupported { layer: &'static str },
    #[error("operand {name} holds {got} values, expected {expected}")]
    Operand {
        name: &'static str,
        got: usize,
        expected: usize,
    },
}

/// What the worker reports about its adapter, and which matmul variant it runs there.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// A CPU-emulated adapter (`DeviceType::Cpu`, or a known software rasteriser's name).
    pub is_software: bool,
    /// Subgroup size range the adapter reports (0 when it does not support subgroups).
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    /// `"tiled"`, `"subgroup<N>"`, `"blocked(<=<tile>)"` or `"blocked<tile>"`, see [`MatmulVariant::choose`].
    pub matmul_variant: String,
    /// Why this adapter runs that variant, in words.
    pub matmul_reason: String,
}

impl AdapterSummary {
    /// One line for logs, test output and the coordinator (which keeps 200 characters), e.g. `llvmpipe (LLVM
    /// 19.1.7, 256 bits) (Vulkan, Cpu, matmul=subgroup8: fixed 8-lane subgroups: CPU SIMD emulation)`.
    pub fn label(&self) -> String {
        format!(
            "{} ({}, {}, matmul={}: {})",
            self.name, self.backend, self.device_type, self.matmul_variant, self.matmul_reason
        )
    }
}

/// An adapter's device and queue plus what was learnt about it; cheap to clone (wgpu handles are shared).
#[derive(Clone)]
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    /// Limits the device was created with (the adapter's own, not the WebGPU defaults).
    pub(crate) limits: wgpu::Limits,
    /// Which matmul kernel this adapter runs.
    pub(crate) variant: MatmulVariant,
    summary: Arc<AdapterSummary>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.summary.label())
            .finish()
    }
}

impl GpuContext {
    /// Requests a HighPerformance adapter, then a device with the adapter's own limits (software adapters have
    /// far more workgroup storage and binding space than the WebGPU defaults) and `SUBGROUP` when supported.
    pub async fn new() -> Result<Self, GpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let features = adapter.features() & wgpu::Features::SUBGROUP;
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("starling device"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::RequestDevice(e.to_string()))?;
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        let (subgroup_min, subgroup_max) = if subgroups {
            (info.subgroup_min_size, info.subgroup_max_size)
        } else {
            (0, 0)
        };
        let lower = info.name.to_lowercase();
        let is_software = info.device_type == wgpu::DeviceType::Cpu
            || [
                "llvmpipe",
                "lavapipe",
                "swiftshader",
                "warp",
                "basic render",
            ]
            .iter()
            .any(|s| lower.contains(s));
        let (variant, reason) = MatmulVariant::choose(&AdapterTraits {
            vendor: info.vendor,
            device_type: info.device_type,
            software: is_software,
            subgroup_min,
            subgroup_max,
            limits: limits.clone(),
        });
        let summary = AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            is_software,
            subgroup_min,
            subgroup_max,
            matmul_variant: variant.to_string(),
            matmul_reason: reason,
        };
        tracing::info!(adapter = %summary.label(), "GPU context ready");
        Ok(Self {
            device,
            queue,
            limits,
            variant,
            summary: Arc::new(summary),
        })
    }

    pub fn summary(&self) -> &AdapterSummary {
        &self.summary
    }

    /// Names the adapter where the platform reports no name (browsers hide `GPUAdapterInfo.description`, so the
    /// browser worker passes `vendor architecture` instead).
    pub fn set_name(&mut self, name: String) {
        Arc::make_mut(&mut self.summary).name = name;
    }

    /// The matmul variant this adapter runs.
    pub fn matmul_variant(&self) -> MatmulVariant {
        self.variant
    }

    /// This context with another matmul variant (tests, benchmarks, the browser self-test); the label says so.
    /// The variant must be one the adapter can run: `Subgroup` only where subgroups are fixed at that size.
    pub fn with_matmul_variant(&self, variant: MatmulVariant) -> Self {
        let mut ctx = self.clone();
        ctx.variant = variant;
        let summary = Arc::make_mut(&mut ctx.summary);
        summary.matmul_variant = variant.to_string();
        summary.matmul_reason = "forced".to_string();
        ctx
    }

    /// The limits the device was created with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
}

/// For tests and the benchmark: `C = op(A)·op(B)` on the GPU with the adapter's chosen variant.
pub async fn matmul(
    ctx: &GpuContext,
    form: MatmulForm,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
) -> Result<Vec<f32>, GpuError> {
    matmul_with(ctx, ctx.variant, form, m, k, n, a, b).await
}

/// [`matmul`] with an explicit variant, so tests can check every variant the adapter can run.
#[allow(clippy::too_many_arguments)]
pub async fn matmul_with(
    ctx: &GpuContext,
    variant: MatmulVariant,
    form: MatmulForm,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
) -> Result<Vec<f32>, GpuError> {
    matmul_on(ctx, &MatmulKernel::new(ctx, variant), form, m, k, n, a, b).await
}

/// [`matmul`] on an already built kernel: many products without rebuilding pipelines (the self-test; building a
/// pipeline costs seconds on SwiftShader).
#[allow(clippy::too_many_arguments)]
pub async fn matmul_on(
    ctx: &GpuContext,
    kernel: &MatmulKernel,
    form: MatmulForm,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
) -> Result<Vec<f32>, GpuError> {
    if a.len() != m * k {
        return Err(GpuError::Operand {
            name: "A",
            got: a.len(),
            expected: m * k,
        });
    }
    if b.len() != k * n {
        return Err(GpuError::Operand {
            name: "B",
            got: b.len(),
            expected: k * n,
        });
    }
    if m == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let a_buf = transfer::storage_init(ctx, "matmul A", bytemuck::cast_slice(a))?;
    let b_buf = transfer::storage_init(ctx, "matmul B", bytemuck::cast_slice(b))?;
    let c_buf = transfer::storage(ctx, "matmul C", (m * n * 4) as u64)?;
    let dispatch = kernel.dispatch(
        ctx,
        "matmul",
        MatmulParams::new(form, m, k, n, 0, 0, 0),
        &a_buf,
        &b_buf,
        &c_buf,
    );
    let bytes = transfer::run(ctx, "matmul", &[dispatch], &[(&c_buf, (m * n * 4) as u64)]).await?;
    Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
}

/// For tests: `z = act(z + bias)` over `z [rows, cols]` on the GPU (the bias at element `bias_off` of `params`).
pub async fn bias_act(
    ctx: &GpuContext,
    z: &[f32],
    params: &[f32],
    bias_off: usize,
    cols: usize,
    act: Activation,
) -> Result<Vec<f32>, GpuError> {
    let rows = z.len() / cols.max(1);
    let z_buf = transfer::storage_init(ctx, "bias_act z", bytemuck::cast_slice(z))?;
    let p_buf = transfer::storage_init(ctx, "bias_act params", bytemuck::cast_slice(params))?;
    let d = kernels::BiasActKernel::new(ctx)
        .dispatch(ctx, "test", rows, cols, bias_off, act, &z_buf, &p_buf);
    let out = transfer::run(ctx, "bias_act", &[d], &[(&z_buf, (z.len() * 4) as u64)]).await?;
    Ok(bytemuck::pod_collect_to_vec(&out[0]))
}

/// For tests: `dz *= (a > 0)` (ReLU backward) on the GPU.
pub async fn relu_backward(ctx: &GpuContext, dz: &[f32], a: &[f32]) -> Result<Vec<f32>, GpuError> {
    let dz_buf = transfer::storage_init(ctx, "act_backward dz", bytemuck::cast_slice(dz))?;
    let a_buf = transfer::storage_init(ctx, "act_backward a", bytemuck::cast_slice(a))?;
    let d = kernels::ActBackwardKernel::new(ctx).dispatch(ctx, "test", dz.len(), &dz_buf, &a_buf);
    let out = transfer::run(
        ctx,
        "act_backward",
        &[d],
        &[(&dz_buf, (dz.len() * 4) as u64)],
    )
    .await?;
    Ok(bytemuck::pod_collect_to_vec(&out[0]))
}

/// For tests: fused softmax-cross-entropy on the GPU; returns (loss sum, correct rows, dlogits of the mean loss).
pub async fn softmax_xent(
    ctx: &GpuContext,
    logits: &[f32],
    labels: &[u32],
    classes: usize,
) -> Result<(f32, u32, Vec<f32>), GpuError> {
    let rows = labels.len();
    let l_buf = transfer::storage_init(ctx, "softmax logits", bytemuck::cast_slice(logits))?;
    let y_buf = transfer::storage_init(ctx, "softmax labels", bytemuck::cast_slice(labels))?;
    let d_buf = transfer::storage(ctx, "softmax dlogits", (logits.len() * 4) as u64)?;
    let s_buf = transfer::storage(ctx, "softmax stats", kernels::STATS_BYTES)?;
    let d = kernels::SoftmaxXentKernel::new(ctx).dispatch(
        ctx, "test", rows, classes, true, &l_buf, &y_buf, &d_buf, &s_buf,
    );
    let out = transfer::run(
        ctx,
        "softmax_xent",
        &[d],
        &[
            (&d_buf, (logits.len() * 4) as u64),
            (&s_buf, kernels::STATS_BYTES),
        ],
    )
    .await?;
    let (loss, correct) = kernels::decode_stats(&out[1]);
    Ok((loss, correct, bytemuck::pod_collect_to_vec(&out[0])))
}

/// For tests: column sums of `dz [rows, cols]` on the GPU.
pub async fn col_sum(ctx: &GpuContext, dz: &[f32], cols: usize) -> Result<Vec<f32>, GpuError> {
    let rows = dz.len() / cols.max(1);
    let dz_buf = transfer::storage_init(ctx, "col_sum dz", bytemuck::cast_slice(dz))?;
    let o_buf = transfer::storage(ctx, "col_sum out", (cols * 4) as u64)?;
    let d = kernels::ColSumKernel::new(ctx).dispatch(ctx, "test", rows, cols, 0, &dz_buf, &o_buf);
    let out = transfer::run(ctx, "col_sum", &[d], &[(&o_buf, (cols * 4) as u64)]).await?;
    Ok(bytemuck::pod_collect_to_vec(&out[0]))
}
