//! The layer kinds of a model spec (v2): a serde-tagged enum, the resolved geometry of each kind, and the
//! compatibility rule that keeps v1 dense layers (`{"units": 128, "activation": "relu"}`) parsing unchanged.

use serde::{Deserialize, Deserializer, Serialize};

/// Activation fused into a dense layer, after its bias (v1 specs name it on every layer; v2 may omit it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    #[default]
    None,
}

/// Default `eps` of `layer_norm` and `group_norm`: PyTorch's.
pub const DEFAULT_NORM_EPS: f32 = 1e-5;

fn default_eps() -> f32 {
    DEFAULT_NORM_EPS
}

fn one() -> u32 {
    1
}

/// One layer as an owner declares it: `{"type": "conv2d", "out_channels": 16, "kernel": 5, "padding": 2}`.
///
/// New kinds (issue 13: embedding, attention, residual blocks) are new variants; a variant may hold nested layers.
/// Every kind's shapes, parameter layout and math are in docs/PROTOCOL.md ("Model spec and parameter layout").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layer {
    /// Fully connected: `y = act(x·W + b)` over a flat `[features]` input; `W` is `[in, units]` row-major.
    Dense {
        units: u32,
        /// Fused activation (v1 compatibility; `{"type": "relu"}` after it is the same model).
        #[serde(default)]
        activation: Activation,
    },
    /// 2-D cross-correlation over `[C, H, W]`, square kernel, zero padding on every side.
    Conv2d {
        out_channels: u32,
        kernel: u32,
        #[serde(default = "one")]
        stride: u32,
        #[serde(default)]
        padding: u32,
    },
    /// Maximum over each `kernel × kernel` window (no padding); `stride` defaults to `kernel`.
    MaxPool2d {
        kernel: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<u32>,
    },
    /// Mean over each `kernel × kernel` window (no padding); `stride` defaults to `kernel`.
    AvgPool2d {
        kernel: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<u32>,
    },
    /// `[C, H, W]` → `[C·H·W]` in NCHW order: a view, no data moves.
    Flatten,
    /// `max(x, 0)`.
    Relu,
    /// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    Gelu,
    /// Normalises each sample's flat feature vector: `γ ⊙ (x − mean) / √(var + eps) + β`, biased variance.
    LayerNorm {
        #[serde(default = "default_eps")]
        eps: f32,
    },
    /// Normalises each of `groups` channel groups of a `[C, H, W]` sample over its `(C/groups)·H·W` values, then
    /// a per-channel `γ`, `β` (PyTorch `GroupNorm`; `groups: 1` is layer norm over the whole image).
    GroupNorm {
        groups: u32,
        #[serde(default = "default_eps")]
        eps: f32,
    },
    /// Token embedding (issue 13): a `[T]` row of token ids (integers stored as f32, each in `0..vocab`) →
    /// the sequence `[T, width]`, `x[t] = table[id_t]`; `table` is `[vocab, width]`.
    Embedding { vocab: u32, width: u32 },
    /// Learned positional embedding: `x[t] += table[t]` over a `[T, C]` sequence; `table` is `[T, C]`.
    PositionalEmbedding,
    /// A pre-norm transformer block over a `[T, C]` sequence, two residual sublayers:
    /// `x = x + attn(layer_norm₁(x))` (causal multi-head self-attention with QKV and output projections), then
    /// `x = x + W₂·gelu(W₁·layer_norm₂(x) + b₁) + b₂` (MLP of width 4·C). Layout in docs/PROTOCOL.md.
    TransformerBlock { heads: u32 },
    /// Next-token logits at every position, `[T, C]` → `[T, vocab]` of the model's embedding: `tied` reuses the
    /// embedding table (`h·tableᵀ`, no bias), else its own `W [C, vocab]`, `b [vocab]`. Trained with softmax
    /// cross-entropy at every position, so each row carries `T` labels (the next tokens).
    LmHead {
        #[serde(default)]
        tied: bool,
    },
}

impl Layer {
    /// A dense layer (the v1 layer).
    pub fn dense(units: u32, activation: Activation) -> Self {
        Self::Dense { units, activation }
    }

    /// The `type` name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dense { .. } => "dense",
            Self::Conv2d { .. } => "conv2d",
            Self::MaxPool2d { .. } => "max_pool2d",
            Self::AvgPool2d { .. } => "avg_pool2d",
            Self::Flatten => "flatten",
            Self::Relu => "relu",
            Self::Gelu => "gelu",
            Self::LayerNorm { .. } => "layer_norm",
            Self::GroupNorm { .. } => "group_norm",
            Self::Embedding { .. } => "embedding",
            Self::PositionalEmbedding => "positional_embedding",
            Self::TransformerBlock { .. } => "transformer_block",
            Self::LmHead { .. } => "lm_head",
        }
    }
}

/// Deserializes the layer list, reading an object without `"type"` as a v1 dense layer (`"type": "dense"`), so
/// `{"units": 128, "activation": "relu"}` keeps meaning what it always meant. Errors name the layer's index.
pub(super) fn layers_compat<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Layer>, D::Error> {
    let raw = Vec::<serde_json::Value>::deserialize(d)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            if let serde_json::Value::Object(map) = &mut v
                && !map.contains_key("type")
            {
                map.insert("type".into(), "dense".into());
            }
            Layer::deserialize(v).map_err(|e| serde::de::Error::custom(format!("layer {i}: {e}")))
        })
        .collect()
}

/// A product of sizes that saturates instead of overflowing (usize is 32 bits on wasm32, and a spec's sizes are
/// checked against their limits only after they are multiplied).
fn mul(dims: &[usize]) -> usize {
    dims.iter().fold(1usize, |acc, d| acc.saturating_mul(*d))
}

/// The shape of one sample's activations between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A feature vector `[features]`.
    Flat(usize),
    /// An image `[channels, height, width]`, stored NCHW (channel-major, then rows, then columns).
    Image { c: usize, h: usize, w: usize },
    /// A sequence `[len, width]` of `width`-wide vectors, position-major (after an embedding).
    Seq { len: usize, width: usize },
}

impl Shape {
    /// Values per sample.
    pub fn len(&self) -> usize {
        match *self {
            Self::Flat(n) => n,
            Self::Image { c, h, w } => c.saturating_mul(h).saturating_mul(w),
            Self::Seq { len, width } => len.saturating_mul(width),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Flat(n) => write!(f, "[{n}]"),
            Self::Image { c, h, w } => write!(f, "[{c}, {h}, {w}]"),
            Self::Seq { len, width } => write!(f, "sequence [{len}, {width}]"),
        }
    }
}

/// Geometry of a conv2d layer for one sample. Input `x[ci, y, x]` (`[in_c, in_h, in_w]`), output
/// `[out_c, out_h, out_w]`, weight `[out_c, in_c, kernel, kernel]` then bias `[out_c]`:
/// `out[co, oy, ox] = b[co] + Σ_{ci, ky, kx} w[co, ci, ky, kx] · x[ci, oy·stride + ky − padding, ox·stride + kx − padding]`,
/// reading zero outside the input; `out_h = (in_h + 2·padding − kernel) / stride + 1` (floor), likewise `out_w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dDims {
    pub in_c: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_c: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl Conv2dDims {
    pub fn in_len(&self) -> usize {
        mul(&[self.in_c, self.in_h, self.in_w])
    }

    pub fn out_len(&self) -> usize {
        mul(&[self.out_c, self.out_h, self.out_w])
    }

    /// Length of the weight tensor `[out_c, in_c, kernel, kernel]`.
    pub fn weight_len(&self) -> usize {
        mul(&[self.out_c, self.in_c, self.kernel, self.kernel])
    }

    /// Rows of the im2col matrix: `in_c · kernel²` (one per weight of an output channel).
    pub fn patch_len(&self) -> usize {
        mul(&[self.in_c, self.kernel, self.kernel])
    }
}

/// Geometry of a pooling layer for one sample: `[channels, in_h, in_w]` → `[channels, out_h, out_w]` with
/// `out = (in − kernel) / stride + 1` (floor, no padding); window `(oy, ox)` covers rows `oy·stride ..+kernel`
/// and columns `ox·stride ..+kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dDims {
    pub channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl Pool2dDims {
    pub fn in_len(&self) -> usize {
        mul(&[self.channels, self.in_h, self.in_w])
    }

    pub fn out_len(&self) -> usize {
        mul(&[self.channels, self.out_h, self.out_w])
    }
}

/// Geometry of a group norm for one sample `[channels, hw]` (`hw = H·W`): group `g` holds channels
/// `g·channels/groups ..` and is normalised over its `(channels/groups)·hw` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupNormDims {
    pub channels: usize,
    pub groups: usize,
    pub hw: usize,
}

impl GroupNormDims {
    pub fn len(&self) -> usize {
        self.channels.saturating_mul(self.hw)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense layer's place in the flat parameter buffer (the v1 layout, unchanged).
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

/// One layer resolved against its input shape: the geometry and parameter offsets every backend runs from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Dense(LayerLayout),
    Conv2d {
        dims: Conv2dDims,
        /// Offset of the weight `[out_c, in_c, k, k]`; the bias `[out_c]` follows at `bias`.
        weight: usize,
        bias: usize,
    },
    MaxPool2d(Pool2dDims),
    AvgPool2d(Pool2dDims),
    Flatten,
    Relu,
    Gelu,
    /// Normalises vectors of `dim` values (the whole sample); `gamma` and `beta` are `[dim]`.
    LayerNorm {
        dim: usize,
        gamma: usize,
        beta: usize,
        eps: f32,
    },
    /// `gamma` and `beta` are `[channels]`.
    GroupNorm {
        dims: GroupNormDims,
        gamma: usize,
        beta: usize,
        eps: f32,
    },
    /// `table` `[vocab, width]` at its offset; the input row is `seq` ids.
    Embedding {
        seq: usize,
        vocab: usize,
        width: usize,
        table: usize,
    },
    /// `table` `[seq, width]`.
    PositionalEmbedding {
        seq: usize,
        width: usize,
        table: usize,
    },
    TransformerBlock {
        seq: usize,
        width: usize,
        heads: usize,
        block: crate::transformer::BlockLayout,
    },
    /// `table` is the embedding's (whose gradient a tied head adds to); `head` is the untied `(W, b)` offsets.
    LmHead {
        seq: usize,
        width: usize,
        vocab: usize,
        table: usize,
        head: Option<(usize, usize)>,
    },
}

/// A layer of a validated spec: what it computes, and the per-sample shapes it reads and writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    pub op: Op,
    pub input: Shape,
    pub output: Shape,
    /// The layer's parameters: `params[offset..offset + len]` (empty for parameter-free layers).
    pub offset: usize,
    pub len: usize,
}

impl LayerPlan {
    /// Multiply-adds of one sample's forward pass (the matmul-shaped work; elementwise layers count 0).
    pub fn forward_macs(&self) -> u64 {
        match self.op {
            Op::Dense(l) => l.inputs as u64 * l.outputs as u64,
            Op::Conv2d { dims, .. } => dims.out_len() as u64 * dims.patch_len() as u64,
            Op::TransformerBlock { seq, width, .. } => {
                let c = width as u64;
                let tri = (seq * (seq + 1) / 2) as u64;
                seq as u64 * 12 * c * c + 2 * tri * c
            }
            Op::LmHead {
                seq, width, vocab, ..
            } => (seq * width * vocab) as u64,
            _ => 0,
        }
    }
}
