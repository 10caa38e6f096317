//! The declarative model spec: a feed-forward classifier with dense layers and softmax-cross-entropy.
//!
//! Parameter layout (one flat f32 buffer, documented in docs/PROTOCOL.md): for each layer `l` in order, its weight
//! matrix `W_l` of shape `[in_l, out_l]` in row-major order (element `(i, j)` at `i * out_l + j`), then its bias
//! `b_l` of length `out_l`. `in_0` is the spec's input width and `in_l = out_{l-1}`. The last layer's width is the
//! number of classes C and its activation must be `none` (its outputs are the logits).

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// Largest parameter count a job may have: 16 M floats (64 MiB), well inside a 128 MiB storage binding and a
/// browser tab's memory, and small enough to broadcast to volunteers.
pub const MAX_PARAMS: usize = 16 * 1024 * 1024;
/// Widest input or layer.
pub const MAX_WIDTH: u32 = 65_536;
/// Deepest network.
pub const MAX_LAYERS: usize = 32;

/// Activation applied after a dense layer's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    None,
}

/// One dense layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Output width of the layer.
    pub units: u32,
    pub activation: Activation,
}

/// A feed-forward classifier as an owner declares it, e.g.
/// `{"input": 784, "layers": [{"units": 128, "activation": "relu"}, {"units": 10, "activation": "none"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Width of one input row.
    pub input: u32,
    /// Dense layers in order; the last one yields the class logits.
    pub layers: Vec<LayerSpec>,
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("input width must be between 1 and {MAX_WIDTH}, got {0}")]
    Input(u32),
    #[error("a model needs between 1 and {MAX_LAYERS} layers, got {0}")]
    LayerCount(usize),
    #[error("layer {layer} must have between 1 and {MAX_WIDTH} units, got {units}")]
    Units { layer: usize, units: u32 },
    #[error("the last layer gives the logits, so its activation must be \"none\"")]
    LastActivation,
    #[error("a classifier needs at least 2 classes (last layer units), got {0}")]
    Classes(u32),
    #[error("the model has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooManyParams(usize),
    #[error("invalid model spec JSON: {0}")]
    Json(String),
}

/// Where one layer's tensors sit in the flat parameter buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLayout {
    pub inputs: usize,
    pub outputs: usize,
    /// Offset of `W` (`[inputs, outputs]`, row-major).
    pub weight: usize,
    /// Offset of `b` (`[outputs]`).
    pub bias: usize,
    pub activation: Activation,
}

impl ModelSpec {
    /// The classic MNIST multilayer perceptron, 784-128-10.
    pub fn mnist_mlp() -> Self {
        Self {
            input: 784,
            layers: vec![
                LayerSpec {
                    units: 128,
                    activation: Activation::Relu,
                },
                LayerSpec {
                    units: 10,
                    activation: Activation::None,
                },
            ],
        }
    }

    /// Parses and validates the owner-facing JSON form.
    pub fn from_json(json: &str) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.input == 0 || self.input > MAX_WIDTH {
            return Err(SpecError::Input(self.input));
        }
        if self.layers.is_empty() || self.layers.len() > MAX_LAYERS {
            return Err(SpecError::LayerCount(self.layers.len()));
        }
        for (layer, l) in self.layers.iter().enumerate() {
            if l.units == 0 || l.units > MAX_WIDTH {
                return Err(SpecError::Units {
                    layer,
                    units: l.units,
                });
            }
        }
        let last = &self.layers[self.layers.len() - 1];
        if last.activation != Activation::None {
            return Err(SpecError::LastActivation);
        }
        if last.units < 2 {
            return Err(SpecError::Classes(last.units));
        }
        let params = self.param_count_unchecked();
        if params > MAX_PARAMS {
            return Err(SpecError::TooManyParams(params));
        }
        Ok(())
    }

    fn param_count_unchecked(&self) -> usize {
        let mut inputs = self.input as usize;
        let mut total = 0usize;
        for l in &self.layers {
            let out = l.units as usize;
            total = total
                .saturating_add(inputs.saturating_mul(out))
                .saturating_add(out);
            inputs = out;
        }
        total
    }

    /// Number of classes C (the last layer's width).
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.units as usize)
    }

    /// Length of the flat parameter (and gradient) buffer.
    pub fn param_count(&self) -> usize {
        self.param_count_unchecked()
    }

    /// Widest activation, which sizes a backend's scratch buffers.
    pub fn max_width(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.units as usize)
            .chain([self.input as usize])
            .max()
            .unwrap_or(0)
    }

    /// Offsets of every layer's weight and bias in the flat buffer.
    pub fn layout(&self) -> Vec<LayerLayout> {
        let mut inputs = self.input as usize;
        let mut offset = 0;
        self.layers
            .iter()
            .map(|l| {
                let outputs = l.units as usize;
                let weight = offset;
                let bias = weight + inputs * outputs;
                offset = bias + outputs;
                let layout = LayerLayout {
                    inputs,
                    outputs,
                    weight,
                    bias,
                    activation: l.activation,
                };
                inputs = outputs;
                layout
            })
            .collect()
    }

    /// Multiply-adds of one row's forward pass; a forward + backward pass costs about three times this.
    pub fn forward_macs_per_row(&self) -> u64 {
        self.layout()
            .iter()
            .map(|l| (l.inputs * l.outputs) as u64)
            .sum()
    }

    /// FLOPs of a training pass (forward + backward) over `rows` rows: 2 FLOPs per multiply-add, 3 matmuls per layer.
    pub fn train_flops(&self, rows: u64) -> u64 {
        6 * self.forward_macs_per_row() * rows
    }

    /// He (Kaiming) normal initialisation from `seed`: `W ~ N(0, 2 / in)`, `b = 0`; identical on every platform.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0.0f32; self.param_count()];
        let mut rng = SplitMix64::new(seed);
        for l in self.layout() {
            let std = (2.0 / l.inputs as f64).sqrt();
            for w in &mut params[l.weight..l.bias] {
                *w = (rng.normal() * std) as f32;
            }
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_layout_is_documented_one() {
        let spec = ModelSpec::mnist_mlp();
        spec.validate().unwrap();
        assert_eq!(spec.param_count(), 784 * 128 + 128 + 128 * 10 + 10);
        let layout = spec.layout();
        assert_eq!(layout[0].weight, 0);
        assert_eq!(layout[0].bias, 784 * 128);
        assert_eq!(layout[1].weight, 784 * 128 + 128);
        assert_eq!(layout[1].bias, 784 * 128 + 128 + 1280);
    }

    #[test]
    fn invalid_specs_are_rejected_with_reasons() {
        let bad = |json: &str| ModelSpec::from_json(json).unwrap_err();
        assert_eq!(
            bad(r#"{"input":0,"layers":[{"units":2,"activation":"none"}]}"#),
            SpecError::Input(0)
        );
        assert_eq!(bad(r#"{"input":4,"layers":[]}"#), SpecError::LayerCount(0));
        assert_eq!(
            bad(
                r#"{"input":4,"layers":[{"units":0,"activation":"relu"},{"units":2,"activation":"none"}]}"#
            ),
            SpecError::Units { layer: 0, units: 0 }
        );
        assert_eq!(
            bad(r#"{"input":4,"layers":[{"units":3,"activation":"relu"}]}"#),
            SpecError::LastActivation
        );
        assert!(
            matches!(bad(r#"{"input":4,"layers":[{"units":3,"activation":"tanh"}]}"#), SpecError::Json(m) if m.contains("tanh"))
        );
        assert_eq!(
            bad(
                r#"{"input":65536,"layers":[{"units":65536,"activation":"relu"},{"units":2,"activation":"none"}]}"#
            ),
            SpecError::TooManyParams(65536 * 65536 + 65536 + 65536 * 2 + 2)
        );
    }

    #[test]
    fn init_is_deterministic_he_normal() {
        let spec = ModelSpec::mnist_mlp();
        let a = spec.init_params(7);
        assert_eq!(a, spec.init_params(7));
        assert_ne!(a, spec.init_params(8));
        let l0 = spec.layout()[0];
        let w = &a[l0.weight..l0.bias];
        let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(
            (var - 2.0 / 784.0).abs() < 0.1 * 2.0 / 784.0,
            "variance {var}"
        );
        assert!(a[l0.bias..l0.bias + 128].iter().all(|b| *b == 0.0));
    }
}
