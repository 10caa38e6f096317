//! The LM spec an owner declares (`LmSpec`), its validation, and where every tensor sits in the flat parameter
//! buffer (`LmLayout`, `BlockLayout`): the layout docs/PROTOCOL.md fixes for every backend; and the check of a
//! batch against a spec.

use serde::{Deserialize, Serialize};

use crate::spec::{MAX_LAYERS, MAX_PARAMS};

/// Largest vocabulary: ids must fit the u32 token format and the head's logits stay a sane size.
pub const MAX_VOCAB: u32 = 1 << 20;
/// Longest context (attention memory grows with its square).
pub const MAX_CONTEXT: u32 = 4096;
/// Widest residual stream.
pub const MAX_MODEL_WIDTH: u32 = 8192;
/// Hidden width of each MLP, as a multiple of the model width (GPT-2's).
pub const MLP_RATIO: usize = 4;
/// `eps` of every layer norm (PyTorch's default).
pub const LN_EPS: f32 = 1e-5;
/// Standard deviation of every initial weight and embedding (GPT-2's).
pub const INIT_STD: f64 = 0.02;

/// A GPT-style language model as an owner declares it, e.g.
/// `{"vocab": 83, "context": 64, "width": 128, "heads": 4, "layers": 4, "tied": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmSpec {
    /// Token ids are `0..vocab`.
    pub vocab: u32,
    /// Longest sequence (the positional table has this many rows).
    pub context: u32,
    /// Residual-stream width C; a multiple of `heads`.
    pub width: u32,
    /// Attention heads per block, each of width `C / heads`.
    pub heads: u32,
    /// Transformer blocks.
    pub layers: u32,
    /// Whether the head reuses the token embedding (`logits = h·tokᵀ`, no bias) instead of its own `W`, `b`.
    #[serde(default)]
    pub tied: bool,
}

/// Why an LM spec was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LmSpecError {
    #[error("vocab must be between 2 and {MAX_VOCAB}, got {0}")]
    Vocab(u32),
    #[error("context must be between 1 and {MAX_CONTEXT}, got {0}")]
    Context(u32),
    #[error("width must be between 1 and {MAX_MODEL_WIDTH}, got {0}")]
    Width(u32),
    #[error("width {width} must be a positive multiple of heads ({heads})")]
    Heads { width: u32, heads: u32 },
    #[error("a model needs between 1 and {MAX_LAYERS} blocks, got {0}")]
    Layers(u32),
    #[error("the model has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooManyParams(usize),
    #[error("invalid LM spec JSON: {0}")]
    Json(String),
}

/// Why a batch cannot be run against an LM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LmBatchError {
    #[error("a batch needs at least one sequence of at least one token")]
    Empty,
    #[error("{got} token ids do not fill {batch} sequences of {seq}")]
    Shape {
        got: usize,
        batch: usize,
        seq: usize,
    },
    #[error("sequences of {seq} tokens are longer than the model's context of {context}")]
    TooLong { seq: usize, context: usize },
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenRange {
        position: usize,
        id: u32,
        vocab: u32,
    },
    #[error("parameter buffer holds {got} values, the spec needs {expected}")]
    ParamCount { got: usize, expected: usize },
}

/// Offsets of one block's tensors in the flat parameter buffer (see [`LmSpec::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub ln1_gamma: usize,
    pub ln1_beta: usize,
    /// `[C, 3C]`: columns `0..C` give q, `C..2C` k, `2C..3C` v; head `h` owns columns `h·D..(h+1)·D` of each.
    pub qkv_weight: usize,
    pub qkv_bias: usize,
    /// `[C, C]`, applied to the heads' outputs concatenated in head order.
    pub out_weight: usize,
    pub out_bias: usize,
    pub ln2_gamma: usize,
    pub ln2_beta: usize,
    /// `[C, 4C]`.
    pub fc_weight: usize,
    pub fc_bias: usize,
    /// `[4C, C]`.
    pub proj_weight: usize,
    pub proj_bias: usize,
}

/// Where every tensor sits in the flat parameter buffer, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmLayout {
    /// Token embedding `[vocab, C]`.
    pub tok: usize,
    /// Positional embedding `[context, C]`.
    pub pos: usize,
    pub blocks: Vec<BlockLayout>,
    pub lnf_gamma: usize,
    pub lnf_beta: usize,
    /// Untied head: `W [C, vocab]` then `b [vocab]`; `None` when tied.
    pub head: Option<(usize, usize)>,
    /// Total parameter count.
    pub total: usize,
}

impl BlockLayout {
    /// Parameters of one block of width `c`: `12c² + 13c`.
    pub fn len(c: usize) -> usize {
        12 * c * c + 13 * c
    }

    /// The block's tensors laid out from `offset`, in the documented order.
    pub fn at(offset: usize, c: usize) -> Self {
        let h = MLP_RATIO * c;
        let mut off = offset;
        let mut take = |n: usize| {
            let at = off;
            off += n;
            at
        };
        Self {
            ln1_gamma: take(c),
            ln1_beta: take(c),
            qkv_weight: take(c * 3 * c),
            qkv_bias: take(3 * c),
            out_weight: take(c * c),
            out_bias: take(c),
            ln2_gamma: take(c),
            ln2_beta: take(c),
            fc_weight: take(c * h),
            fc_bias: take(h),
            proj_weight: take(h * c),
            proj_bias: take(c),
        }
    }
}

impl LmSpec {
    /// The char-level Moby-Dick model of issue 13: 4 blocks, 4 heads, width 128, context 64, tied head (~0.8 M).
    pub fn char_lm(vocab: u32) -> Self {
        Self {
            vocab,
            context: 64,
            width: 128,
            heads: 4,
            layers: 4,
            tied: true,
        }
    }

    /// Parses and validates the JSON form.
    pub fn from_json(json: &str) -> Result<Self, LmSpecError> {
        let spec: Self =
            serde_json::from_str(json).map_err(|e| LmSpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), LmSpecError> {
        if !(2..=MAX_VOCAB).contains(&self.vocab) {
            return Err(LmSpecError::Vocab(self.vocab));
        }
        if !(1..=MAX_CONTEXT).contains(&self.context) {
            return Err(LmSpecError::Context(self.context));
        }
        if !(1..=MAX_MODEL_WIDTH).contains(&self.width) {
            return Err(LmSpecError::Width(self.width));
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(LmSpecError::Heads {
                width: self.width,
                heads: self.heads,
            });
        }
        if self.layers == 0 || self.layers as usize > MAX_LAYERS {
            return Err(LmSpecError::Layers(self.layers));
        }
        let total = self.layout().total;
        if total > MAX_PARAMS {
            return Err(LmSpecError::TooManyParams(total));
        }
        Ok(())
    }

    pub fn width(&self) -> usize {
        self.width as usize
    }

    /// Width of one attention head, `D = C / heads`.
    pub fn head_width(&self) -> usize {
        (self.width / self.heads.max(1)) as usize
    }

    /// Offsets of every tensor. Sizes are computed in `usize` with the spec's bounds (checked by
    /// [`LmSpec::validate`]) keeping them far from overflow.
    pub fn layout(&self) -> LmLayout {
        let (v, t, c) = (self.vocab as usize, self.context as usize, self.width());
        let (tok, pos) = (0, v * c);
        let first_block = pos + t * c;
        let blocks: Vec<BlockLayout> = (0..self.layers as usize)
            .map(|i| BlockLayout::at(first_block + i * BlockLayout::len(c), c))
            .collect();
        let lnf_gamma = first_block + blocks.len() * BlockLayout::len(c);
        let lnf_beta = lnf_gamma + c;
        let head = (!self.tied).then_some((lnf_beta + c, lnf_beta + c + c * v));
        let total = lnf_beta + c + if self.tied { 0 } else { c * v + v };
        LmLayout {
            tok,
            pos,
            blocks,
            lnf_gamma,
            lnf_beta,
            head,
            total,
        }
    }

    pub fn param_count(&self) -> usize {
        self.layout().total
    }

    /// Multiply-adds of one sequence of `seq` tokens' forward pass: the dense matmuls per position, plus
    /// `q·kᵀ` and `p·v` over the causal triangle.
    pub fn forward_macs(&self, seq: usize) -> u64 {
        let (c, v) = (self.width() as u64, self.vocab as u64);
        let per_pos =
            self.layers as u64 * (3 * c * c + c * c + 2 * MLP_RATIO as u64 * c * c) + c * v;
        let tri = (seq * (seq + 1) / 2) as u64;
        seq as u64 * per_pos + self.layers as u64 * 2 * tri * c
    }

    /// GPT-2 initialisation from `seed`: every weight and embedding `N(0, 0.02²)`, the residual projections
    /// (`out_weight`, `proj_weight`) `N(0, (0.02 / √(2·layers))²)`, biases 0, layer-norm `γ = 1`, `β = 0`, drawn
    /// in layout order from one SplitMix64 stream — exactly what [`LmSpec::model_spec`]'s graph initialises.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        self.model_spec().init_params(seed)
    }
}

/// Checks ids (and targets, when given) against a spec once, so the composition can trust them.
pub fn check_lm_batch(
    spec: &LmSpec,
    params: usize,
    ids: &[u32],
    targets: Option<&[u32]>,
    batch: usize,
    seq: usize,
) -> Result<(), LmBatchError> {
    if batch == 0 || seq == 0 {
        return Err(LmBatchError::Empty);
    }
    if params != spec.param_count() {
        return Err(LmBatchError::ParamCount {
            got: params,
            expected: spec.param_count(),
        });
    }
    if seq > spec.context as usize {
        return Err(LmBatchError::TooLong {
            seq,
            context: spec.context as usize,
        });
    }
    for t in std::iter::once(ids).chain(targets) {
        if t.len() != batch * seq {
            return Err(LmBatchError::Shape {
                got: t.len(),
                batch,
                seq,
            });
        }
        if let Some((position, &id)) = t.iter().enumerate().find(|(_, id)| **id >= spec.vocab) {
            return Err(LmBatchError::TokenRange {
                position,
                id,
                vocab: spec.vocab,
            });
        }
    }
    Ok(())
}
