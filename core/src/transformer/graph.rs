//! The transformer layers as kinds of the model spec's layer graph (`embedding`, `positional_embedding`,
//! `transformer_block`, `lm_head`): resolution against the incoming shape, initialisation, and the per-layer
//! forward and backward passes the reference and the CPU engine dispatch to (with [`Reference`] and [`Fast`]
//! kernels respectively). The math is the composition's in [`super`]; a spec built by [`LmSpec::model_spec`]
//! has exactly [`LmSpec::layout`]'s parameter layout.
//!
//! [`Reference`]: super::reference::Reference
//! [`Fast`]: super::fast::Fast

use super::{
    AttnDims, BlockLayout, INIT_STD, Kernels, LmSpec, MAX_CONTEXT, MAX_MODEL_WIDTH, MAX_VOCAB,
    block_backward, block_forward, head_backward, head_forward, ops,
};
use crate::rng::SplitMix64;
use crate::spec::{Input, Layer, LayerPlan, ModelSpec, Op, Shape};

impl LmSpec {
    /// The same model as a layer-graph spec: input `[context]` token ids, then `embedding`,
    /// `positional_embedding`, `layers` × `transformer_block`, `layer_norm`, `lm_head`.
    pub fn model_spec(&self) -> ModelSpec {
        let mut layers = vec![
            Layer::Embedding {
                vocab: self.vocab,
                width: self.width,
            },
            Layer::PositionalEmbedding,
        ];
        layers.extend((0..self.layers).map(|_| Layer::TransformerBlock { heads: self.heads }));
        layers.push(Layer::LayerNorm { eps: super::LN_EPS });
        layers.push(Layer::LmHead { tied: self.tied });
        ModelSpec {
            input: Input::Shape(vec![self.context]),
            layers,
        }
    }
}

impl LmSpec {
    /// The shorthand of a layer-graph spec that has exactly [`LmSpec::model_spec`]'s shape (a job's LM), if any.
    pub fn from_model_spec(graph: &ModelSpec) -> Option<Self> {
        let context = match &graph.input {
            Input::Shape(d) if d.len() == 1 => d[0],
            Input::Features(n) => *n,
            _ => return None,
        };
        let (vocab, width) = match graph.layers.first()? {
            Layer::Embedding { vocab, width } => (*vocab, *width),
            _ => return None,
        };
        let heads = match graph.layers.get(2)? {
            Layer::TransformerBlock { heads } => *heads,
            _ => return None,
        };
        let tied = match graph.layers.last()? {
            Layer::LmHead { tied } => *tied,
            _ => return None,
        };
        let spec = Self {
            vocab,
            context,
            width,
            heads,
            layers: graph.layers.len().checked_sub(4)? as u32,
            tied,
        };
        (spec.validate().is_ok() && spec.model_spec() == *graph).then_some(spec)
    }
}

/// Resolves one transformer layer kind against its input `shape` with its parameters from `offset`; `before` are
/// the layers already resolved (an `lm_head` predicts its model's embedding vocabulary). Returns the op, the
/// output shape and the parameter count, or the reason the layer does not fit.
pub fn resolve(
    layer: &Layer,
    shape: Shape,
    offset: usize,
    before: &[LayerPlan],
) -> Result<(Op, Shape, usize), String> {
    let seq = |what: &str| match shape {
        Shape::Seq { len, width } => Ok((len, width)),
        _ => Err(format!(
            "{what} needs a sequence [T, C] (after an embedding), got {shape}"
        )),
    };
    Ok(match *layer {
        Layer::Embedding { vocab, width } => {
            let Shape::Flat(t) = shape else {
                return Err(format!(
                    "embedding reads a row of token ids, so its input must be [T], got {shape}"
                ));
            };
            if t > MAX_CONTEXT as usize {
                return Err(format!(
                    "the context {t} is over the limit of {MAX_CONTEXT}"
                ));
            }
            if !(2..=MAX_VOCAB).contains(&vocab) {
                return Err(format!(
                    "vocab must be between 2 and {MAX_VOCAB}, got {vocab}"
                ));
            }
            if !(1..=MAX_MODEL_WIDTH).contains(&width) {
                return Err(format!(
                    "width must be between 1 and {MAX_MODEL_WIDTH}, got {width}"
                ));
            }
            let (v, c) = (vocab as usize, width as usize);
            let op = Op::Embedding {
                seq: t,
                vocab: v,
                width: c,
                table: offset,
            };
            (op, Shape::Seq { len: t, width: c }, v * c)
        }
        Layer::PositionalEmbedding => {
            let (t, c) = seq("positional_embedding")?;
            let op = Op::PositionalEmbedding {
                seq: t,
                width: c,
                table: offset,
            };
            (op, shape, t * c)
        }
        Layer::TransformerBlock { heads } => {
            let (t, c) = seq("transformer_block")?;
            if heads == 0 || !c.is_multiple_of(heads as usize) {
                return Err(format!("heads must divide the width {c}, got {heads}"));
            }
            let op = Op::TransformerBlock {
                seq: t,
                width: c,
                heads: heads as usize,
                block: BlockLayout::at(offset, c),
            };
            (op, shape, BlockLayout::len(c))
        }
        Layer::LmHead { tied } => {
            let (t, c) = seq("lm_head")?;
            let Some((vocab, emb_width, table)) = before.iter().rev().find_map(|p| match p.op {
                Op::Embedding {
                    vocab,
                    width,
                    table,
                    ..
                } => Some((vocab, width, table)),
                _ => None,
            }) else {
                return Err(
                    "lm_head predicts an embedding's vocabulary: put an embedding layer first"
                        .into(),
                );
            };
            if tied && emb_width != c {
                return Err(format!(
                    "a tied head needs the sequence width {c} to equal the embedding width {emb_width}"
                ));
            }
            let head = (!tied).then_some((offset, offset + c * vocab));
            let len = if tied { 0 } else { c * vocab + vocab };
            let op = Op::LmHead {
                seq: t,
                width: c,
                vocab,
                table,
                head,
            };
            (
                op,
                Shape::Seq {
                    len: t,
                    width: vocab,
                },
                len,
            )
        }
        _ => return Err(format!("{} is not a transformer layer", layer.kind())),
    })
}

/// GPT-2 initialisation of one transformer layer, drawing from the spec's one SplitMix64 stream in layout order:
/// embeddings and weights `N(0, 0.02²)`, the residual projections `N(0, (0.02/√(2·blocks))²)`, biases and `β` 0,
/// `γ` 1. Returns false for other ops.
pub fn init(op: &Op, blocks: usize, params: &mut [f32], rng: &mut SplitMix64) -> bool {
    let mut normal = |dst: &mut [f32], std: f64| {
        for w in dst {
            *w = (rng.normal() * std) as f32;
        }
    };
    let resid = INIT_STD / (2.0 * blocks.max(1) as f64).sqrt();
    match *op {
        Op::Embedding {
            vocab,
            width,
            table,
            ..
        } => normal(&mut params[table..table + vocab * width], INIT_STD),
        Op::PositionalEmbedding { seq, width, table } => {
            normal(&mut params[table..table + seq * width], INIT_STD)
        }
        Op::TransformerBlock {
            width: c, block: b, ..
        } => {
            let h = super::MLP_RATIO * c;
            normal(
                &mut params[b.qkv_weight..b.qkv_weight + 3 * c * c],
                INIT_STD,
            );
            normal(&mut params[b.out_weight..b.out_weight + c * c], resid);
            normal(&mut params[b.fc_weight..b.fc_weight + c * h], INIT_STD);
            normal(&mut params[b.proj_weight..b.proj_weight + h * c], resid);
            params[b.ln1_gamma..b.ln1_gamma + c].fill(1.0);
            params[b.ln2_gamma..b.ln2_gamma + c].fill(1.0);
        }
        Op::LmHead {
            width, vocab, head, ..
        } => {
            if let Some((w, _)) = head {
                normal(&mut params[w..w + width * vocab], INIT_STD);
            }
        }
        _ => return false,
    }
    true
}

fn attn_dims(rows: usize, seq: usize, width: usize, heads: usize) -> AttnDims {
    AttnDims {
        batch: rows,
        seq,
        width,
        heads,
    }
}

/// Whether `op` is one of this module's layers.
pub fn is_transformer(op: &Op) -> bool {
    matches!(
        op,
        Op::Embedding { .. }
            | Op::PositionalEmbedding { .. }
            | Op::TransformerBlock { .. }
            | Op::LmHead { .. }
    )
}

/// `y = layer(x)` over `rows` samples for a transformer op (overwrites `y`). Embedding ids are the f32 values of
/// `x`, already checked to be integers in `0..vocab` by [`crate::check_batch`].
pub fn layer_forward<K: Kernels>(
    k: &K,
    op: &Op,
    params: &[f32],
    rows: usize,
    x: &[f32],
    y: &mut [f32],
) {
    match *op {
        Op::Embedding { width, table, .. } => {
            for (id, out) in x.iter().zip(y.chunks_exact_mut(width)) {
                let r = table + *id as usize * width;
                out.copy_from_slice(&params[r..r + width]);
            }
        }
        Op::PositionalEmbedding { seq, width, table } => {
            y.copy_from_slice(x);
            ops::add_positional(y, &params[table..table + seq * width], seq);
        }
        Op::TransformerBlock {
            seq,
            width,
            heads,
            block,
        } => {
            let (out, _) = block_forward(k, &block, attn_dims(rows, seq, width, heads), params, x);
            y.copy_from_slice(&out);
        }
        Op::LmHead {
            seq,
            width,
            vocab,
            table,
            head,
        } => {
            let z = head_forward(k, x, rows * seq, (width, vocab), params, table, head);
            y.copy_from_slice(&z);
        }
        _ => {}
    }
}

/// Backward of [`layer_forward`]: the op's parameter gradients go into `grad` and, when `dx` is given,
/// `dx = ∂loss/∂x` is overwritten. The block recomputes its forward pass from `x` (the graph keeps only layer
/// outputs). Parameter gradients are **added**, not overwritten, for `embedding` and a tied `lm_head` (which share
/// the table), and overwritten for the others; every backend starts the pass from a zeroed gradient.
#[allow(clippy::too_many_arguments)] // the layer-graph backward signature, plus the kernels.
pub fn layer_backward<K: Kernels>(
    k: &K,
    op: &Op,
    params: &[f32],
    rows: usize,
    x: &[f32],
    dy: &[f32],
    grad: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    match *op {
        Op::Embedding {
            width,
            table,
            vocab,
            ..
        } => {
            let ids: Vec<u32> = x.iter().map(|v| *v as u32).collect();
            ops::embed_backward(&ids, dy, &mut grad[table..table + vocab * width]);
            // Token ids are not differentiable: the input gradient is zero.
            if let Some(dx) = dx {
                dx.fill(0.0);
            }
        }
        Op::PositionalEmbedding { seq, width, table } => {
            let g = &mut grad[table..table + seq * width];
            g.fill(0.0);
            ops::positional_backward(dy, seq, g);
            if let Some(dx) = dx {
                dx.copy_from_slice(dy);
            }
        }
        Op::TransformerBlock {
            seq,
            width,
            heads,
            block,
        } => {
            let dims = attn_dims(rows, seq, width, heads);
            let (_, cache) = block_forward(k, &block, dims, params, x);
            grad[block.ln1_gamma..block.proj_bias + width].fill(0.0);
            let d = block_backward(k, &block, dims, params, &cache, dy, grad);
            if let Some(dx) = dx {
                dx.copy_from_slice(&d);
            }
        }
        Op::LmHead {
            seq,
            width,
            vocab,
            table,
            head,
        } => {
            if let Some((w, b)) = head {
                grad[w..b + vocab].fill(0.0);
            }
            let d = head_backward(
                k,
                x,
                dy,
                rows * seq,
                (width, vocab),
                params,
                table,
                head,
                grad,
            );
            if let Some(dx) = dx {
                dx.copy_from_slice(&d);
            }
        }
        _ => {}
    }
}

/// The named tensors of a transformer op for checkpoint export, as `(suffix, shape, offset)`: `embedding` →
/// `weight [vocab, C]`; `positional_embedding` → `weight [T, C]`; `transformer_block` → the block tensors of
/// [`super::export`] (`ln1.gamma`, `attn.qkv.weight`, …); an untied `lm_head` → `weight [C, vocab]`, `bias
/// [vocab]` (a tied one has none: it is the embedding's `weight`). `None` for other ops.
pub fn op_tensors(op: &Op) -> Option<Vec<(String, Vec<usize>, usize)>> {
    Some(match *op {
        Op::Embedding {
            vocab,
            width,
            table,
            ..
        } => vec![("weight".into(), vec![vocab, width], table)],
        Op::PositionalEmbedding { seq, width, table } => {
            vec![("weight".into(), vec![seq, width], table)]
        }
        Op::TransformerBlock { width, block, .. } => super::export::block_tensors(&block, width)
            .into_iter()
            .map(|(n, s, o)| (n.to_string(), s, o))
            .collect(),
        Op::LmHead {
            width, vocab, head, ..
        } => match head {
            Some((w, b)) => vec![
                ("weight".into(), vec![width, vocab], w),
                ("bias".into(), vec![vocab], b),
            ],
            None => Vec::new(),
        },
        _ => return None,
    })
}
