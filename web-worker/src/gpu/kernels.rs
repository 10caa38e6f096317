//! One struct per WGSL kernel: each builds its pipeline once and records dispatches against caller-owned
//! buffers; each `Params` mirrors the WGSL uniform struct field for field, padded to 16 bytes.

use starling_core::Activation;
use starling_core::reference::MatmulForm;

use super::transfer::{self, Dispatch};
use super::{GpuContext, codegen};

/// Which matmul kernel an adapter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// `shaders/matmul_tiled.wgsl`: workgroup-memory tiles, for real GPUs (and any adapter without fixed small subgroups).
    Tiled,
    /// The generated, fully unrolled subgroup kernel for subgroups of exactly this many lanes (CPU-emulated adapters).
    Subgroup(u32),
}

impl MatmulVariant {
    /// The subgroup kernel only where it is both valid and fast: `SUBGROUP` is enabled, the subgroup size is fixed
    /// (min == max, so a workgroup of that many lanes is exactly one subgroup), and small (≤ 8 lanes). Small fixed
    /// subgroups mean a CPU SIMD emulation (lavapipe 8, SwiftShader and WARP 4), where loads dominate and 256
    /// accumulators per lane are cheap; on real GPUs that many registers per thread would cripple occupancy.
    pub fn choose(subgroups: bool, min: u32, max: u32) -> Self {
        if subgroups && min == max && min <= 8 && codegen::SUPPORTED_SUBGROUP_SIZES.contains(&min) {
            Self::Subgroup(min)
        } else {
            Self::Tiled
        }
    }
}

impl std::fmt::Display for MatmulVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tiled => f.write_str("tiled"),
            Self::Subgroup(lanes) => write!(f, "subgroup{lanes}"),
        }
    }
}

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

/// Mirrors `Params` of `shaders/matmul_tiled.wgsl` and the generated subgroup kernel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub k: u32,
    pub n: u32,
    pub a_off: u32,
    pub a_rs: u32,
    pub a_cs: u32,
    pub b_off: u32,
    pub b_rs: u32,
    pub b_cs: u32,
    pub c_off: u32,
    pub _pad: [u32; 2],
}

impl MatmulParams {
    /// Shape, form and element offsets of the three operands.
    pub fn new(
        form: MatmulForm,
        m: usize,
        k: usize,
        n: usize,
        a_off: usize,
        b_off: usize,
        c_off: usize,
    ) -> Self {
        let (a_rs, a_cs, b_rs, b_cs) = form.strides(m, k, n);
        Self {
            m: m as u32,
            k: k as u32,
            n: n as u32,
            a_off: a_off as u32,
            a_rs: a_rs as u32,
            a_cs: a_cs as u32,
            b_off: b_off as u32,
            b_rs: b_rs as u32,
            b_cs: b_cs as u32,
            c_off: c_off as u32,
            _pad: [0; 2],
        }
    }
}

/// Invocations of the tiled kernel along n and m, its k-depth, and its per-invocation register block.
const TILED_WG: (u32, u32, u32) = (16, 16, 16);
const TILED_BLOCK: u32 = 4;

/// The matmul of the adapter's variant (tiled or generated subgroup kernel); both share `MatmulParams`.
#[derive(Debug, Clone)]
pub struct MatmulKernel {
    kernel: Kernel,
    variant: MatmulVariant,
}

impl MatmulKernel {
    pub fn new(ctx: &GpuContext, variant: MatmulVariant) -> Self {
        let kernel = match variant {
            MatmulVariant::Tiled => Kernel::new(
                ctx,
                "matmul_tiled",
                include_str!("../../../shaders/matmul_tiled.wgsl"),
                &[
                    ("WG_X", TILED_WG.0 as f64),
                    ("WG_Y", TILED_WG.1 as f64),
                    ("TK", TILED_WG.2 as f64),
                ],
            ),
            // The checked-in file is exactly `generate(8)` (a test keeps them equal); other sizes are generated.
            MatmulVariant::Subgroup(8) => Kernel::new(
                ctx,
                "matmul_subgroup",
                include_str!("../../../shaders/matmul_subgroup.wgsl"),
                &[],
            ),
            MatmulVariant::Subgroup(lanes) => {
                Kernel::new(ctx, "matmul_subgroup", &codegen::generate(lanes), &[])
            }
        };
        Self { kernel, variant }
    }

    pub fn variant(&self) -> MatmulVariant {
        self.variant
    }

    /// Workgroups covering an m × n result.
    pub fn groups(&self, m: usize, n: usize) -> [u32; 3] {
        let (tile_m, tile_n) = match self.variant {
            MatmulVariant::Tiled => (TILED_WG.1 * TILED_BLOCK, TILED_WG.0 * TILED_BLOCK),
            MatmulVariant::Subgroup(lanes) => (codegen::ROWS, codegen::tile_cols(lanes)),
        };
        [(n as u32).div_ceil(tile_n), (m as u32).div_ceil(tile_m), 1]
    }

    /// Records `c = op(a)·op(b)` with `params`; `c` must not alias `a` or `b`, and m, n must be ≥ 1.
    pub(crate) fn dispatch(
        &self,
        ctx: &GpuContext,
        what: &str,
        params: MatmulParams,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        c: &wgpu::Buffer,
    ) -> Dispatch {
        let groups = self.groups(params.m as usize, params.n as usize);
        self.kernel.dispatch(ctx, what, &params, &[a, b, c], groups)
    }

    /// Benchmark helper: GFLOP/s of `reps` back-to-back m × k × n products (form A·B) on resident buffers,
    /// after one untimed warm-up run.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time_gflops(
        &self,
        ctx: &GpuContext,
        m: usize,
        k: usize,
        n: usize,
        reps: usize,
    ) -> Result<f64, super::GpuError> {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
        let a_buf = transfer::storage_init(ctx, "bench A", bytemuck::cast_slice(&a))?;
        let b_buf = transfer::storage_init(ctx, "bench B", bytemuck::cast_slice(&b))?;
        let c_buf = transfer::storage(ctx, "bench C", (m * n * 4) as u64)?;
        let d = self.dispatch(
            ctx,
            "bench",
            MatmulParams::new(MatmulForm::AB, m, k, n, 0, 0, 0),
            &a_buf,
            &b_buf,
            &c_buf,
        );
        transfer::submit_and_wait(ctx, std::slice::from_ref(&d), 1)?;
        let start = std::time::Instant::now();
        transfer::submit_and_wait(ctx, std::slice::from_ref(&d), reps)?;
        let secs = start.elapsed().as_secs_f64();
        Ok(2.0 * (m * k * n * reps) as f64 / secs / 1e9)
    }
}

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
            include_str!("../../../shaders/bias_act.wgsl"),
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
            include_str!("../../../shaders/act_backward.wgsl"),
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
            include_str!("../../../shaders/softmax_xent.wgsl"),
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
            include_str!("../../../shaders/col_sum.wgsl"),
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
