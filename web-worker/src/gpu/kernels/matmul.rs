//! The matmul kernels: the variant choice per adapter, the blocked kernel's tiles, and one struct that builds the
//! chosen variant's pipelines once and records `C = op(A)·op(B)` dispatches.

use starling_core::reference::MatmulForm;

use super::Kernel;
use crate::gpu::transfer::Dispatch;
use crate::gpu::{GpuContext, codegen};

/// Which matmul kernel an adapter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulVariant {
    /// `shaders/matmul_tiled.wgsl`: the first workgroup-memory kernel; faster than the blocked one on SwiftShader,
    /// and the fallback for adapters whose limits are below the smallest [`BlockTile`].
    Tiled,
    /// The generated, fully unrolled subgroup kernel for subgroups of exactly this many lanes (CPU-emulated adapters).
    Subgroup(u32),
    /// `shaders/matmul_blocked.wgsl` with the tile picked per shape ([`BlockTile::for_shape`]) among
    /// [`BlockTile::ALL`] up to and including `largest`.
    Blocked { largest: BlockTile },
    /// `shaders/matmul_blocked.wgsl` with one tile for every shape (tests and the benchmark).
    BlockedFixed(BlockTile),
}

/// What the variant choice looks at: the adapter's own report, nothing measured.
#[derive(Debug, Clone)]
pub struct AdapterTraits {
    /// PCI vendor id (0 where the platform hides it, as browsers do).
    pub vendor: u32,
    pub device_type: wgpu::DeviceType,
    /// A CPU-emulated adapter (see `AdapterSummary::is_software`).
    pub software: bool,
    /// Subgroup size range, (0, 0) without `SUBGROUP`.
    pub subgroup_min: u32,
    pub subgroup_max: u32,
    pub limits: wgpu::Limits,
}

/// PCI vendor ids of mobile GPUs (Arm Mali, Qualcomm Adreno, Imagination PowerVR), whose small register files
/// spill the 64 accumulators of the 8 × 8 block.
const MOBILE_VENDORS: [u32; 3] = [0x13B5, 0x5143, 0x1010];

impl MatmulVariant {
    /// The adapter's matmul kernel and the reason, in this order:
    /// 1. subgroups fixed at ≤ 8 lanes (`SUBGROUP` enabled and min == max, so a workgroup of that many lanes is
    ///    exactly one subgroup) mean a CPU SIMD emulation (lavapipe 8, SwiftShader and WARP 4), where loads
    ///    dominate and 256 accumulators per lane are cheap: the generated subgroup kernel (measured fastest on
    ///    lavapipe at every benchmarked shape, see `examples/matmul_bench.rs`);
    /// 2. other software adapters (SwiftShader in Chromium, which exposes no subgroups): the tiled kernel, measured
    ///    1.3–1.7× faster than the blocked one there for the 784-128-10 step at batch 64 (`kernels.test.mjs` logs
    ///    both: 413 vs 636, 246 vs 419 and 433 vs 553 ms in three runs on a loaded 2-core machine);
    /// 3. hardware GPUs: the register-blocked kernel, per shape up to the largest tile the adapter's limits allow:
    ///    128 × 128 (8 × 8 per invocation), or 64 × 64 (4 × 4) on mobile vendors; the tiled kernel only where not
    ///    even the smallest tile fits the limits.
    pub fn choose(t: &AdapterTraits) -> (Self, String) {
        let (min, max) = (t.subgroup_min, t.subgroup_max);
        if min > 0 && min == max && min <= 8 && codegen::SUPPORTED_SUBGROUP_SIZES.contains(&min) {
            return (
                Self::Subgroup(min),
                format!("fixed {min}-lane subgroups: CPU SIMD emulation"),
            );
        }
        if t.software {
            return (
                Self::Tiled,
                "software adapter, no fixed subgroups: tiled".to_string(),
            );
        }
        let mobile = MOBILE_VENDORS.contains(&t.vendor);
        let cap = if mobile {
            BlockTile::MEDIUM
        } else {
            BlockTile::LARGE
        };
        let largest = BlockTile::ALL
            .iter()
            .copied()
            .take_while(|tile| *tile != cap)
            .chain([cap])
            .filter(|tile| tile.fits(&t.limits))
            .last();
        let Some(largest) = largest else {
            return (
                Self::Tiled,
                "limits below the smallest register tile: the tiled kernel".to_string(),
            );
        };
        let kind = if mobile {
            format!("mobile GPU vendor {:#06x}: 4x4 blocks", t.vendor)
        } else {
            "hardware GPU".to_string()
        };
        (Self::Blocked { largest }, format!("{kind}: tile per shape"))
    }
}

impl std::fmt::Display for MatmulVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tiled => f.write_str("tiled"),
            Self::Subgroup(lanes) => write!(f, "subgroup{lanes}"),
            Self::Blocked { largest } => write!(f, "blocked(<={largest})"),
            Self::BlockedFixed(tile) => write!(f, "blocked{tile}"),
        }
    }
}

/// One tile configuration of `shaders/matmul_blocked.wgsl`: its five pipeline overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockTile {
    /// Invocations along n and along m.
    pub wg_x: u32,
    pub wg_y: u32,
    /// Rows × columns of C per invocation (4 or 8 each).
    pub rm: u32,
    pub rn: u32,
    /// k-depth of one workgroup tile (a multiple of 4).
    pub bk: u32,
}

/// Fewest workgroups a tile should give before a larger tile is preferred: below this a real GPU's compute units
/// sit idle (tens of them on a discrete GPU), which costs more than the larger tile's better load/fma ratio gains.
const MIN_GROUPS: u32 = 32;

impl BlockTile {
    /// 32 × 32 tile, 64 invocations, 4 × 4 per invocation, 4 KiB of workgroup memory: skinny MLP shapes.
    pub const SMALL: Self = Self {
        wg_x: 8,
        wg_y: 8,
        rm: 4,
        rn: 4,
        bk: 16,
    };
    /// 64 × 64 tile, 256 invocations, 4 × 4 per invocation, 8 KiB.
    pub const MEDIUM: Self = Self {
        wg_x: 16,
        wg_y: 16,
        rm: 4,
        rn: 4,
        bk: 16,
    };
    /// 128 × 128 tile, 256 invocations, 8 × 8 per invocation, 16 KiB: large square products.
    pub const LARGE: Self = Self {
        wg_x: 16,
        wg_y: 16,
        rm: 8,
        rn: 8,
        bk: 16,
    };
    /// Every shipped tile, smallest first.
    pub const ALL: [Self; 3] = [Self::SMALL, Self::MEDIUM, Self::LARGE];

    pub fn rows(self) -> u32 {
        self.wg_y * self.rm
    }

    pub fn cols(self) -> u32 {
        self.wg_x * self.rn
    }

    /// Workgroup memory of the two operand tiles.
    pub fn workgroup_bytes(self) -> u32 {
        (self.rows() + self.cols()) * self.bk * 4
    }

    /// Whether an adapter with these limits can run the tile.
    pub fn fits(self, limits: &wgpu::Limits) -> bool {
        self.wg_x * self.wg_y <= limits.max_compute_invocations_per_workgroup
            && self.wg_x <= limits.max_compute_workgroup_size_x
            && self.wg_y <= limits.max_compute_workgroup_size_y
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
    }

    /// The shape table: the largest of `tiles` (smallest first) that still gives at least [`MIN_GROUPS`]
    /// workgroups for an m × n result, else the smallest. 1024² gets 128 × 128, 512² gets 64 × 64, and 256² and
    /// the MLP's batch × 128 products get 32 × 32.
    pub fn for_shape(tiles: &[BlockTile], m: usize, n: usize) -> BlockTile {
        let groups = |t: &BlockTile| {
            (m as u32).div_ceil(t.rows()).max(1) * (n as u32).div_ceil(t.cols()).max(1)
        };
        tiles
            .iter()
            .rev()
            .find(|t| groups(t) >= MIN_GROUPS)
            .or(tiles.first())
            .copied()
            .unwrap_or(Self::SMALL)
    }

    fn constants(self) -> [(&'static str, f64); 5] {
        [
            ("WG_X", self.wg_x as f64),
            ("WG_Y", self.wg_y as f64),
            ("RM", self.rm as f64),
            ("RN", self.rn as f64),
            ("BK", self.bk as f64),
        ]
    }
}

impl std::fmt::Display for BlockTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}k{}r{}x{}",
            self.rows(),
            self.cols(),
            self.bk,
            self.rm,
            self.rn
        )
    }
}

/// Mirrors `Params` of `shaders/matmul_tiled.wgsl`, `shaders/matmul_blocked.wgsl` and the generated subgroup kernel.
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

/// One matmul pipeline and the C tile each of its workgroups covers.
#[derive(Debug, Clone)]
struct MatmulPipeline {
    kernel: Kernel,
    tile_m: u32,
    tile_n: u32,
    /// The blocked kernel's tile, `None` for the tiled and subgroup kernels.
    block: Option<BlockTile>,
}

/// The matmul of one variant; every variant shares `MatmulParams` and the binding slots. The blocked variant holds
/// one pipeline per tile of its shape table, all built here, and picks one per dispatch.
#[derive(Debug, Clone)]
pub struct MatmulKernel {
    pipelines: Vec<MatmulPipeline>,
    variant: MatmulVariant,
}

impl MatmulKernel {
    pub fn new(ctx: &GpuContext, variant: MatmulVariant) -> Self {
        let blocked = |tile: BlockTile| MatmulPipeline {
            kernel: Kernel::new(
                ctx,
                "matmul_blocked",
                include_str!("../../../../shaders/matmul_blocked.wgsl"),
                &tile.constants(),
            ),
            tile_m: tile.rows(),
            tile_n: tile.cols(),
            block: Some(tile),
        };
        let pipelines = match variant {
            MatmulVariant::Tiled => vec![MatmulPipeline {
                kernel: Kernel::new(
                    ctx,
                    "matmul_tiled",
                    include_str!("../../../../shaders/matmul_tiled.wgsl"),
                    &[
                        ("WG_X", TILED_WG.0 as f64),
                        ("WG_Y", TILED_WG.1 as f64),
                        ("TK", TILED_WG.2 as f64),
                    ],
                ),
                tile_m: TILED_WG.1 * TILED_BLOCK,
                tile_n: TILED_WG.0 * TILED_BLOCK,
                block: None,
            }],
            // The checked-in file is exactly `generate(8)` (a test keeps them equal); other sizes are generated.
            MatmulVariant::Subgroup(lanes) => {
                let generated;
                let source = if lanes == 8 {
                    include_str!("../../../../shaders/matmul_subgroup.wgsl")
                } else {
                    generated = codegen::generate(lanes);
                    &generated
                };
                vec![MatmulPipeline {
                    kernel: Kernel::new(ctx, "matmul_subgroup", source, &[]),
                    tile_m: codegen::ROWS,
                    tile_n: codegen::tile_cols(lanes),
                    block: None,
                }]
            }
            MatmulVariant::Blocked { largest } => BlockTile::ALL
                .iter()
                .copied()
                .take_while(|t| *t != largest)
                .chain([largest])
                .map(blocked)
                .collect(),
            MatmulVariant::BlockedFixed(tile) => vec![blocked(tile)],
        };
        Self { pipelines, variant }
    }

    pub fn variant(&self) -> MatmulVariant {
        self.variant
    }

    /// The pipeline for an m × n result: the shape table for the blocked variant, the only one otherwise.
    fn pick(&self, m: usize, n: usize) -> &MatmulPipeline {
        if self.pipelines.len() > 1 {
            let tiles: Vec<BlockTile> = self.pipelines.iter().filter_map(|p| p.block).collect();
            let tile = BlockTile::for_shape(&tiles, m, n);
            if let Some(p) = self.pipelines.iter().find(|p| p.block == Some(tile)) {
                return p;
            }
        }
        &self.pipelines[0]
    }

    /// The blocked tile an m × n result runs with (`None` for the tiled and subgroup kernels).
    pub fn tile_for(&self, m: usize, n: usize) -> Option<BlockTile> {
        self.pick(m, n).block
    }

    /// Workgroups covering an m × n result.
    pub fn groups(&self, m: usize, n: usize) -> [u32; 3] {
        let p = self.pick(m, n);
        [
            (n as u32).div_ceil(p.tile_n),
            (m as u32).div_ceil(p.tile_m),
            1,
        ]
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
        self.pick(params.m as usize, params.n as usize)
            .kernel
            .dispatch(ctx, what, &params, &[a, b, c], groups)
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
    ) -> Result<f64, crate::gpu::GpuError> {
        self.time_gflops_form(ctx, MatmulForm::AB, m, k, n, reps)
    }

    /// [`Self::time_gflops`] for any of the three forms.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn time_gflops_form(
        &self,
        ctx: &GpuContext,
        form: MatmulForm,
        m: usize,
        k: usize,
        n: usize,
        reps: usize,
    ) -> Result<f64, crate::gpu::GpuError> {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
        let a_buf = crate::gpu::transfer::storage_init(ctx, "bench A", bytemuck::cast_slice(&a))?;
        let b_buf = crate::gpu::transfer::storage_init(ctx, "bench B", bytemuck::cast_slice(&b))?;
        let c_buf = crate::gpu::transfer::storage(ctx, "bench C", (m * n * 4) as u64)?;
        let d = self.dispatch(
            ctx,
            "bench",
            MatmulParams::new(form, m, k, n, 0, 0, 0),
            &a_buf,
            &b_buf,
            &c_buf,
        );
        crate::gpu::transfer::submit_and_wait(ctx, std::slice::from_ref(&d), 1)?;
        let start = std::time::Instant::now();
        crate::gpu::transfer::submit_and_wait(ctx, std::slice::from_ref(&d), reps)?;
        let secs = start.elapsed().as_secs_f64();
        Ok(2.0 * (m * k * n * reps) as f64 / secs / 1e9)
    }
}
