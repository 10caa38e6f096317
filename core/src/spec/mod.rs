//! The declarative model spec (v2): an input shape and an ordered list of typed layers ending in class logits,
//! trained with softmax-cross-entropy; its validation, shape inference, flat parameter layout and deterministic
//! initialisation. v1 specs (dense layers only, `{"units": .., "activation": ..}`) parse to the same model.
//!
//! Parameter layout (one flat f32 buffer, documented per layer kind in docs/PROTOCOL.md): each layer's tensors in
//! layer order, parameter-free layers taking none. Dense: `W` `[in, out]` row-major then `b` `[out]` (the v1
//! layout); conv2d: `W` `[out_c, in_c, k, k]` then `b` `[out_c]`; layer_norm and group_norm: `γ` then `β`.
//! Activations are NCHW per sample and batch-major across rows, so a dataset row is still `C·H·W` f32.

mod layer;

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

pub use layer::{
    Activation, Conv2dDims, DEFAULT_NORM_EPS, GroupNormDims, Layer, LayerLayout, LayerPlan, Op,
    Pool2dDims, Shape,
};

/// Largest parameter count a job may have: 16 M floats (64 MiB), well inside a 128 MiB storage binding and a
/// browser tab's memory, and small enough to broadcast to volunteers.
pub const MAX_PARAMS: usize = 16 * 1024 * 1024;
/// Widest dense layer (and largest flat input, as in v1).
pub const MAX_WIDTH: u32 = 65_536;
/// Most values one sample's activations may hold at any layer (4 M floats, 16 MiB): a micro-batch of 8 rows
/// stays inside a 128 MiB storage binding.
pub const MAX_ACTIVATION: usize = 1 << 22;
/// Largest image side, channel count, kernel, stride or padding.
pub const MAX_DIM: u32 = 4096;
/// Deepest network (activations and pooling count as layers).
pub const MAX_LAYERS: usize = 64;

/// The shape of one input row: `784` or `[784]` (features), or `[channels, height, width]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// `"input": 784` (v1).
    Features(u32),
    /// `"input": [784]` or `"input": [1, 28, 28]`.
    Shape(Vec<u32>),
}

/// A classifier as an owner declares it, e.g.
/// `{"input": [1, 28, 28], "layers": [{"type": "conv2d", "out_channels": 16, "kernel": 5, "padding": 2},
/// {"type": "relu"}, {"type": "max_pool2d", "kernel": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]}`
/// or the v1 form `{"input": 784, "layers": [{"units": 128, "activation": "relu"}, {"units": 10, "activation": "none"}]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Shape of one input row.
    pub input: Input,
    /// Layers in order; the last one must be a dense layer without activation (it yields the class logits).
    #[serde(deserialize_with = "layer::layers_compat")]
    pub layers: Vec<Layer>,
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error(
        "input must be a width between 1 and {MAX_WIDTH}, or [channels, height, width] with sides between 1 and {MAX_DIM}; got {0}"
    )]
    Input(String),
    #[error("a model needs between 1 and {MAX_LAYERS} layers, got {0}")]
    LayerCount(usize),
    #[error("layer {layer} must have between 1 and {MAX_WIDTH} units, got {units}")]
    Units { layer: usize, units: u32 },
    #[error("layer {layer} ({kind}): {reason}")]
    Layer {
        layer: usize,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "the last layer gives the logits, so it must be a dense layer with activation \"none\""
    )]
    LastActivation,
    #[error("a classifier needs at least 2 classes (last layer units), got {0}")]
    Classes(u32),
    #[error("the model has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooManyParams(usize),
    #[error("invalid model spec JSON: {0}")]
    Json(String),
}

impl ModelSpec {
    /// The classic MNIST multilayer perceptron, 784-128-10 (v1 form).
    pub fn mnist_mlp() -> Self {
        Self::dense(784, &[(128, Activation::Relu), (10, Activation::None)])
    }

    /// A dense stack over a flat input (the v1 model), e.g. `dense(784, &[(128, Relu), (10, None)])`.
    pub fn dense(input: u32, layers: &[(u32, Activation)]) -> Self {
        Self {
            input: Input::Features(input),
            layers: layers
                .iter()
                .map(|&(units, activation)| Layer::dense(units, activation))
                .collect(),
        }
    }

    /// Parses and validates the owner-facing JSON form.
    pub fn from_json(json: &str) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_str(json).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.check().map(|_| ())
    }

    /// The input shape of one row.
    pub fn input_shape(&self) -> Result<Shape, SpecError> {
        let bad = || SpecError::Input(serde_json::to_string(&self.input).unwrap_or_default());
        match &self.input {
            Input::Features(n) => {
                if *n == 0 || *n > MAX_WIDTH {
                    return Err(bad());
                }
                Ok(Shape::Flat(*n as usize))
            }
            Input::Shape(dims) => match dims.as_slice() {
                [n] if (1..=MAX_WIDTH).contains(n) => Ok(Shape::Flat(*n as usize)),
                [c, h, w] if [c, h, w].iter().all(|d| (1..=MAX_DIM).contains(*d)) => {
                    let shape = Shape::Image {
                        c: *c as usize,
                        h: *h as usize,
                        w: *w as usize,
                    };
                    if shape.len() > MAX_ACTIVATION {
                        return Err(bad());
                    }
                    Ok(shape)
                }
                _ => Err(bad()),
            },
        }
    }

    /// Values in one input row (`C·H·W` for an image): a dataset's row width.
    pub fn input_len(&self) -> usize {
        self.input_shape().map_or(0, |s| s.len())
    }

    /// Validates the whole spec and resolves every layer: shapes, geometry and parameter offsets.
    pub fn check(&self) -> Result<Vec<LayerPlan>, SpecError> {
        let mut shape = self.input_shape()?;
        if self.layers.is_empty() || self.layers.len() > MAX_LAYERS {
            return Err(SpecError::LayerCount(self.layers.len()));
        }
        let mut offset = 0usize;
        let mut plans = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let plan = resolve(i, layer, shape, offset, &plans)?;
            offset = offset.saturating_add(plan.len);
            shape = plan.output;
            plans.push(plan);
        }
        match self.layers.last() {
            Some(Layer::Dense {
                units,
                activation: Activation::None,
            }) => {
                if *units < 2 {
                    return Err(SpecError::Classes(*units));
                }
            }
            // A language model's logits: one softmax per position (issue 13).
            Some(Layer::LmHead { .. }) => {}
            _ => return Err(SpecError::LastActivation),
        }
        if offset > MAX_PARAMS {
            return Err(SpecError::TooManyParams(offset));
        }
        Ok(plans)
    }

    /// Every layer resolved (see [`ModelSpec::check`]); empty for an invalid spec.
    pub fn plan(&self) -> Vec<LayerPlan> {
        self.check().unwrap_or_default()
    }

    /// Number of classes C (the last layer's width; an `lm_head`'s vocabulary).
    pub fn classes(&self) -> usize {
        match self.layers.last() {
            Some(Layer::Dense { units, .. }) => *units as usize,
            Some(Layer::LmHead { .. }) => match self.plan().last().map(|p| p.op) {
                Some(Op::LmHead { vocab, .. }) => vocab,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Labels each row carries: 1 for a classifier, the context length `T` for a language model (the next token
    /// at every position), its labels `[rows, T]` row-major.
    pub fn labels_per_row(&self) -> usize {
        match self.plan().last().map(|p| p.op) {
            Some(Op::LmHead { seq, .. }) => seq,
            _ => 1,
        }
    }

    /// The vocabulary of a model whose first layer is an `embedding` (its inputs are token ids), else `None`.
    pub fn token_vocab(&self) -> Option<usize> {
        match self.plan().first().map(|p| p.op) {
            Some(Op::Embedding { vocab, .. }) => Some(vocab),
            _ => None,
        }
    }

    /// Length of the flat parameter (and gradient) buffer.
    pub fn param_count(&self) -> usize {
        self.plan().iter().map(|p| p.len).sum()
    }

    /// Most values one sample's activations hold at any layer boundary, which sizes a backend's scratch buffers.
    pub fn max_width(&self) -> usize {
        self.plan()
            .iter()
            .map(|p| p.output.len())
            .chain([self.input_len()])
            .max()
            .unwrap_or(0)
    }

    /// The dense layers' layouts when the model is a v1-shaped dense stack (flat input; dense layers, each
    /// optionally followed by one `relu`, which is folded into its activation), else `None`. Such a model has
    /// exactly the v1 parameter layout; backends with only a dense path use this.
    pub fn dense_layout(&self) -> Option<Vec<LayerLayout>> {
        let mut out: Vec<LayerLayout> = Vec::new();
        let mut folded = false;
        for p in self.check().ok()? {
            match p.op {
                Op::Dense(l) => {
                    out.push(l);
                    folded = false;
                }
                Op::Relu if !folded => {
                    let last = out.last_mut()?;
                    if last.activation != Activation::None {
                        return None;
                    }
                    last.activation = Activation::Relu;
                    folded = true;
                }
                _ => return None,
            }
        }
        Some(out)
    }

    /// Multiply-adds of one row's forward pass; a forward + backward pass costs about three times this.
    pub fn forward_macs_per_row(&self) -> u64 {
        self.plan().iter().map(LayerPlan::forward_macs).sum()
    }

    /// FLOPs of a training pass (forward + backward) over `rows` rows: 2 FLOPs per multiply-add, 3 matmuls per layer.
    pub fn train_flops(&self, rows: u64) -> u64 {
        6 * self.forward_macs_per_row() * rows
    }

    /// Deterministic initialisation from `seed`, identical on every platform: He (Kaiming) normal weights for dense
    /// (`N(0, 2 / in)`) and conv2d (`N(0, 2 / (in_c·k²))`), drawn in layout order from one SplitMix64 stream;
    /// biases and `β` 0, `γ` 1. A v1 model gets exactly the v1 values.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0.0f32; self.param_count()];
        let mut rng = SplitMix64::new(seed);
        let plans = self.plan();
        let blocks = plans
            .iter()
            .filter(|p| matches!(p.op, Op::TransformerBlock { .. }))
            .count();
        for p in plans {
            if crate::transformer::graph::init(&p.op, blocks, &mut params, &mut rng) {
                continue;
            }
            let (weights, fan_in) = match p.op {
                Op::Dense(l) => (l.weight..l.bias, l.inputs),
                Op::Conv2d { dims, weight, bias } => (weight..bias, dims.patch_len()),
                Op::LayerNorm { gamma, beta, .. } | Op::GroupNorm { gamma, beta, .. } => {
                    params[gamma..beta].fill(1.0);
                    continue;
                }
                _ => continue,
            };
            let std = (2.0 / fan_in as f64).sqrt();
            for w in &mut params[weights] {
                *w = (rng.normal() * std) as f32;
            }
        }
        params
    }
}

/// Resolves layer `i` against its input `shape`, its parameters starting at `offset`.
fn resolve(
    i: usize,
    layer: &Layer,
    shape: Shape,
    offset: usize,
    before: &[LayerPlan],
) -> Result<LayerPlan, SpecError> {
    let kind = layer.kind();
    let err = |reason: String| SpecError::Layer {
        layer: i,
        kind,
        reason,
    };
    let image = |what: &str| match shape {
        Shape::Image { c, h, w } => Ok((c, h, w)),
        Shape::Flat(_) | Shape::Seq { .. } => Err(err(format!(
            "{what} needs a [channels, height, width] input, got {shape}"
        ))),
    };
    let dim = |name: &str, v: u32, min: u32| {
        if (min..=MAX_DIM).contains(&v) {
            Ok(v as usize)
        } else {
            Err(err(format!(
                "{name} must be between {min} and {MAX_DIM}, got {v}"
            )))
        }
    };
    let (op, output, len) = match *layer {
        Layer::Dense { units, activation } => {
            let Shape::Flat(inputs) = shape else {
                return Err(err(format!(
                    "dense needs a flat input, got the image {shape}: add {{\"type\": \"flatten\"}} before it"
                )));
            };
            if units == 0 || units > MAX_WIDTH {
                return Err(SpecError::Units { layer: i, units });
            }
            let outputs = units as usize;
            let weight = offset;
            let bias = weight.saturating_add(inputs.saturating_mul(outputs));
            let l = LayerLayout {
                inputs,
                outputs,
                weight,
                bias,
                activation,
            };
            (
                Op::Dense(l),
                Shape::Flat(outputs),
                bias.saturating_add(outputs) - offset,
            )
        }
        Layer::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
        } => {
            let (c, h, w) = image("conv2d")?;
            let out_c = dim("out_channels", out_channels, 1)?;
            let k = dim("kernel", kernel, 1)?;
            let s = dim("stride", stride, 1)?;
            let p = dim("padding", padding, 0)?;
            if p >= k {
                return Err(err(format!(
                    "padding {p} must be smaller than the kernel {k}"
                )));
            }
            if h + 2 * p < k || w + 2 * p < k {
                return Err(err(format!(
                    "the input {shape} padded by {p} is smaller than the {k}×{k} kernel"
                )));
            }
            let dims = Conv2dDims {
                in_c: c,
                in_h: h,
                in_w: w,
                out_c,
                kernel: k,
                stride: s,
                padding: p,
                out_h: (h + 2 * p - k) / s + 1,
                out_w: (w + 2 * p - k) / s + 1,
            };
            let weight = offset;
            let bias = weight.saturating_add(dims.weight_len());
            let output = Shape::Image {
                c: out_c,
                h: dims.out_h,
                w: dims.out_w,
            };
            let len = dims.weight_len().saturating_add(out_c);
            (Op::Conv2d { dims, weight, bias }, output, len)
        }
        Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
            let (c, h, w) = image(kind)?;
            let k = dim("kernel", kernel, 1)?;
            let s = dim("stride", stride.unwrap_or(kernel), 1)?;
            if h < k || w < k {
                return Err(err(format!(
                    "the input {shape} is smaller than the {k}×{k} window"
                )));
            }
            let dims = Pool2dDims {
                channels: c,
                in_h: h,
                in_w: w,
                kernel: k,
                stride: s,
                out_h: (h - k) / s + 1,
                out_w: (w - k) / s + 1,
            };
            let output = Shape::Image {
                c,
                h: dims.out_h,
                w: dims.out_w,
            };
            let op = if matches!(layer, Layer::MaxPool2d { .. }) {
                Op::MaxPool2d(dims)
            } else {
                Op::AvgPool2d(dims)
            };
            (op, output, 0)
        }
        Layer::Flatten => (Op::Flatten, Shape::Flat(shape.len()), 0),
        Layer::Relu => (Op::Relu, shape, 0),
        Layer::Gelu => (Op::Gelu, shape, 0),
        Layer::LayerNorm { eps } => {
            // A sequence is normalised per position, over its width (issue 13).
            let n = match shape {
                Shape::Flat(n) | Shape::Seq { width: n, .. } => Some(n),
                Shape::Image { .. } => None,
            };
            let Some(n) = n else {
                return Err(err(format!(
                    "layer_norm normalises a flat feature vector, got the image {shape}: use group_norm with \"groups\": 1 to normalise a whole image"
                )));
            };
            check_eps(eps).map_err(err)?;
            let op = Op::LayerNorm {
                dim: n,
                gamma: offset,
                beta: offset.saturating_add(n),
                eps,
            };
            (op, shape, 2 * n)
        }
        Layer::GroupNorm { groups, eps } => {
            let (c, h, w) = image("group_norm")?;
            check_eps(eps).map_err(err)?;
            let g = groups as usize;
            if g == 0 || !c.is_multiple_of(g) {
                return Err(err(format!(
                    "groups must divide the {c} channels, got {groups}"
                )));
            }
            let op = Op::GroupNorm {
                dims: GroupNormDims {
                    channels: c,
                    groups: g,
                    hw: h * w,
                },
                gamma: offset,
                beta: offset.saturating_add(c),
                eps,
            };
            (op, shape, 2 * c)
        }
        Layer::Embedding { .. }
        | Layer::PositionalEmbedding
        | Layer::TransformerBlock { .. }
        | Layer::LmHead { .. } => {
            crate::transformer::graph::resolve(layer, shape, offset, before).map_err(err)?
        }
    };
    if output.len() > MAX_ACTIVATION {
        return Err(err(format!(
            "its output {output} holds more than {MAX_ACTIVATION} values per row"
        )));
    }
    Ok(LayerPlan {
        op,
        input: shape,
        output,
        offset,
        len,
    })
}

fn check_eps(eps: f32) -> Result<(), String> {
    if eps.is_finite() && eps > 0.0 && eps <= 1.0 {
        Ok(())
    } else {
        Err(format!("eps must be in (0, 1], got {eps}"))
    }
}

#[cfg(test)]
mod tests;
