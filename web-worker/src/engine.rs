//! Backend choice and the one engine interface the session drives: the WGSL engine or the CPU backend.

use starling_core::cpu::CpuEngine;
use starling_core::protocol::Backend;
use starling_core::{BatchError, EvalOutput, ModelSpec, StepOutput};

use crate::gpu::{GpuContext, GpuEngine, GpuError};

/// Which backend a worker should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// A hardware GPU adapter if there is one, otherwise the CPU backend: a software adapter (lavapipe,
    /// SwiftShader) is several times slower than the CPU backend on the same cores.
    #[default]
    Auto,
    /// The WGSL engine on whatever adapter is found, software included (tests, benchmarks, volunteers who insist).
    Gpu,
    /// The CPU backend.
    Cpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" | "webgpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!(
                "unknown backend `{other}` (expected auto, gpu or cpu)"
            )),
        }
    }
}

/// Why the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Where a worker computes: resolved once per worker from a [`BackendChoice`].
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // One per worker, never stored in bulk; boxing would only add indirection.
pub enum Device {
    Gpu(GpuContext),
    Cpu,
}

impl Device {
    /// Resolves a choice: `Gpu` fails if no adapter can be had; `Auto` falls back to the CPU quietly.
    pub async fn open(choice: BackendChoice) -> Result<Self, GpuError> {
        match choice {
            BackendChoice::Cpu => Ok(Self::Cpu),
            BackendChoice::Gpu => Ok(Self::Gpu(GpuContext::new().await?)),
            BackendChoice::Auto => match GpuContext::new().await {
                Ok(ctx) if !ctx.summary().is_software => Ok(Self::Gpu(ctx)),
                Ok(ctx) => {
                    tracing::info!(adapter = %ctx.summary().label(), "software GPU adapter: the CPU backend is faster, using it");
                    Ok(Self::Cpu)
                }
                Err(e) => {
                    tracing::info!(error = %e, "no GPU adapter, using the CPU backend");
                    Ok(Self::Cpu)
                }
            },
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Gpu(_) => Backend::Gpu,
            Self::Cpu => Backend::Cpu,
        }
    }

    /// Human-readable description for the coordinator and the volunteer.
    pub fn label(&self) -> String {
        match self {
            Self::Gpu(ctx) => ctx.summary().label(),
            Self::Cpu => cpu_label(),
        }
    }

    /// An engine for `spec` on this device.
    pub fn engine(&self, spec: ModelSpec) -> Result<Engine, EngineError> {
        Ok(match self {
            Self::Gpu(ctx) => match GpuEngine::new(ctx, spec.clone()) {
                Ok(engine) => Engine::Gpu(engine),
                // A layer graph the WGSL engine cannot run (an embedding after another layer) still trains, on the CPU
                // backend: the volunteer is told, and the result is as valid (verification compares against the CPU).
                Err(GpuError::Unsupported { layer }) => {
                    tracing::warn!(
                        layer,
                        "no WGSL kernels for this layer kind yet: this model runs on the CPU backend"
                    );
                    Engine::Cpu(CpuEngine::new(spec))
                }
                Err(e) => return Err(e.into()),
            },
            Self::Cpu => Engine::Cpu(CpuEngine::new(spec)),
        })
    }
}

fn cpu_label() -> String {
    #[cfg(target_arch = "wasm32")]
    {
        "cpu: wasm simd128, 1 thread".to_string()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!("cpu: matrixmultiply, {threads} threads")
    }
}

/// A model resident on one backend.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One per worker session.
pub enum Engine {
    Gpu(GpuEngine),
    Cpu(CpuEngine),
}

impl Engine {
    pub fn spec(&self) -> &ModelSpec {
        match self {
            Self::Gpu(e) => e.spec(),
            Self::Cpu(e) => e.spec(),
        }
    }

    pub async fn load(&mut self, params: &[f32]) -> Result<(), EngineError> {
        match self {
            Self::Gpu(e) => Ok(e.load(params).await?),
            Self::Cpu(e) => Ok(e.load(params)?),
        }
    }

    pub async fn step(&mut self, x: &[f32], labels: &[u32]) -> Result<StepOutput, EngineError> {
        match self {
            Self::Gpu(e) => Ok(e.step(x, labels).await?),
            Self::Cpu(e) => Ok(e.step(x, labels)?),
        }
    }

    pub async fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<EvalOutput, EngineError> {
        match self {
            Self::Gpu(e) => Ok(e.evaluate(x, labels).await?),
            Self::Cpu(e) => Ok(e.evaluate(x, labels)?),
        }
    }
}
