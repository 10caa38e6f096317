//! The resident-model engine: one model version's parameters live on the GPU, and each batch size gets a dispatch
//! plan (buffers, uniform buffers, bind groups) built once and reused for every later batch of that size.
//!
//! The spec's layer graph is resolved once into [`Node`]s: a ReLU right after a dense or conv2d layer is fused
//! into that layer's bias kernel (so a v1 dense model records exactly the dispatches it always did), `flatten` is a
//! view of the buffer before it, and every other layer is one node with its own output buffer. Backward runs the
//! nodes in reverse through a ping-pong pair of gradient buffers.
//!
//! A language model (issue 13) runs on the same plan: its rows are sequences of `T` token ids, its labels the next
//! token at every position (`T` per row), and the loss the mean over all `B·T` positions, as on the CPU engine.

use std::collections::HashMap;

use starling_core::spec::{Activation, Conv2dDims, LayerLayout, Op, Pool2dDims};
use starling_core::transformer::{AttnDims, BlockLayout};
use starling_core::{BatchError, EvalOutput, ModelSpec, StepOutput, check_batch};

use super::kernels::{
    ConvShape, ElementwiseAct, EmbedShape, EmbedTable, NormShape, PoolKind, PoolShape, STATS_BYTES,
    decode_stats, stats_bytes,
};
use super::layers::{self, ConvLayer, DenseLayer, Kernels};
use super::transfer::{self, Dispatch};
use super::transformer::{self, BlockActs, BlockLayer, BlockScratch, HeadLayer};
use super::{GpuContext, GpuError};

/// Most rows per evaluation chunk, bounding activation memory for large evaluation sets.
const EVAL_CHUNK: usize = 1024;
/// Bytes of scratch an evaluation chunk may use: a CNN's unfolded convolution inputs are ~100 KiB per row.
const EVAL_BUDGET: usize = 128 << 20;
/// Plans kept before the cache is cleared (each holds activation buffers for its batch size).
const MAX_PLANS: usize = 8;

/// One layer as the GPU runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    /// `relu`: the layer's own activation or a ReLU layer right after it, fused into the bias kernel.
    Dense {
        layout: LayerLayout,
        relu: bool,
    },
    Conv {
        dims: Conv2dDims,
        weight: usize,
        bias: usize,
        relu: bool,
    },
    Pool {
        dims: Pool2dDims,
        kind: PoolKind,
    },
    /// `groups`, `plane` as in [`NormShape`] (layer norm: 1, 1; group norm: groups, H·W); `sample_rows` rows of
    /// `len` per sample (layer norm of a flat vector: 1; of a sequence: T, one per position; group norm: groups).
    Norm {
        len: usize,
        sample_rows: usize,
        groups: usize,
        plane: usize,
        eps: f32,
        gamma: usize,
        beta: usize,
    },
    Act(ElementwiseAct),
    /// Token ids → `[T, C]`; `tied`: a tied head writes this table's gradient first, so this layer's adds to it.
    Embed {
        seq: usize,
        vocab: usize,
        width: usize,
        table: usize,
        tied: bool,
    },
    Pos {
        seq: usize,
        width: usize,
        table: usize,
    },
    Block {
        seq: usize,
        width: usize,
        heads: usize,
        block: BlockLayout,
    },
    Head {
        seq: usize,
        width: usize,
        vocab: usize,
        table: usize,
        head: Option<(usize, usize)>,
    },
}

impl Node {
    fn has_params(&self) -> bool {
        !matches!(self, Self::Pool { .. } | Self::Act(_))
    }

    /// Per-sample values of the output.
    fn out_len(&self, input: usize) -> usize {
        match *self {
            Self::Dense { layout, .. } => layout.outputs,
            Self::Conv { dims, .. } => dims.out_len(),
            Self::Pool { dims, .. } => dims.out_len(),
            Self::Norm { .. } | Self::Act(_) | Self::Pos { .. } | Self::Block { .. } => input,
            Self::Embed { seq, width, .. } => seq * width,
            Self::Head { seq, vocab, .. } => seq * vocab,
        }
    }

    /// Floats per sample a node keeps besides its output (a conv layer's unfolded input and product, a block's
    /// intermediates and sublayer scratch).
    fn extra_len(&self) -> usize {
        match *self {
            Self::Conv { .. } => self.conv(1).map_or(0, |c| c.col_len() + c.out_len()),
            Self::Block {
                seq, width, heads, ..
            } => BlockLayer::kept_per_sequence(seq, width, heads) + seq * width,
            _ => 0,
        }
    }

    fn block(&self, rows: usize) -> Option<BlockLayer> {
        match *self {
            Self::Block {
                seq,
                width,
                heads,
                block,
            } => Some(BlockLayer {
                dims: AttnDims {
                    batch: rows,
                    seq,
                    width,
                    heads,
                },
                block,
            }),
            _ => None,
        }
    }

    fn embed(&self, rows: usize) -> Option<EmbedShape> {
        let (seq, width, kind, table) = match *self {
            Self::Embed {
                seq,
                vocab,
                width,
                table,
                ..
            } => (seq, width, EmbedTable::Token { vocab }, table),
            Self::Pos { seq, width, table } => (seq, width, EmbedTable::Positional, table),
            _ => return None,
        };
        Some(EmbedShape {
            positions: rows * seq,
            width,
            seq,
            kind,
            table,
        })
    }

    fn head(&self, rows: usize) -> Option<HeadLayer> {
        match *self {
            Self::Head {
                seq,
                width,
                vocab,
                table,
                head,
            } => Some(HeadLayer {
                rows: rows * seq,
                width,
                vocab,
                table,
                head,
            }),
            _ => None,
        }
    }

    fn conv(&self, rows: usize) -> Option<ConvLayer> {
        match *self {
            Self::Conv {
                dims, weight, bias, ..
            } => Some(conv_layer(&dims, weight, bias, rows)),
            _ => None,
        }
    }
}

fn conv_layer(dims: &Conv2dDims, weight: usize, bias: usize, rows: usize) -> ConvLayer {
    ConvLayer {
        shape: ConvShape {
            n: rows,
            c: dims.in_c,
            h: dims.in_h,
            w: dims.in_w,
            kh: dims.kernel,
            kw: dims.kernel,
            stride: dims.stride,
            pad: dims.padding,
        },
        out_channels: dims.out_c,
        weight,
        bias,
    }
}

fn pool_shape(dims: &Pool2dDims, rows: usize) -> PoolShape {
    PoolShape {
        n: rows,
        c: dims.channels,
        h: dims.in_h,
        w: dims.in_w,
        kh: dims.kernel,
        kw: dims.kernel,
        stride: dims.stride,
        pad: 0,
    }
}

/// Resolves the spec's layers into nodes with their per-sample input and output lengths; fails for layer graphs the
/// WGSL engine has no kernels for (an embedding that is not the first layer), so the caller can run that model on
/// the CPU backend.
fn nodes(spec: &ModelSpec) -> Result<Vec<(Node, usize, usize)>, GpuError> {
    let mut out: Vec<(Node, usize, usize)> = Vec::new();
    for plan in spec.plan() {
        let input = plan.input.len();
        let node = match plan.op {
            Op::Dense(layout) => Node::Dense {
                layout,
                relu: layout.activation == Activation::Relu,
            },
            Op::Conv2d { dims, weight, bias } => Node::Conv {
                dims,
                weight,
                bias,
                relu: false,
            },
            Op::MaxPool2d(dims) => Node::Pool {
                dims,
                kind: PoolKind::Max,
            },
            Op::AvgPool2d(dims) => Node::Pool {
                dims,
                kind: PoolKind::Avg { count_pad: true },
            },
            Op::Flatten => continue,
            Op::Relu => {
                if let Some((Node::Dense { relu, .. } | Node::Conv { relu, .. }, _, _)) =
                    out.last_mut()
                {
                    *relu = true;
                    continue;
                }
                Node::Act(ElementwiseAct::Relu)
            }
            Op::Gelu => Node::Act(ElementwiseAct::Gelu),
            Op::LayerNorm {
                dim,
                gamma,
                beta,
                eps,
            } => Node::Norm {
                len: dim,
                sample_rows: input / dim.max(1),
                groups: 1,
                plane: 1,
                eps,
                gamma,
                beta,
            },
            Op::GroupNorm {
                dims,
                gamma,
                beta,
                eps,
            } => Node::Norm {
                len: dims.channels / dims.groups * dims.hw,
                sample_rows: dims.groups,
                groups: dims.groups,
                plane: dims.hw,
                eps,
                gamma,
                beta,
            },
            // Token ids are not differentiable: an embedding after another layer would need a zero input gradient
            // and ids computed on the GPU; no model does that.
            Op::Embedding { .. } if !out.is_empty() => {
                return Err(GpuError::Unsupported {
                    layer: "embedding after another layer",
                });
            }
            Op::Embedding {
                seq,
                vocab,
                width,
                table,
            } => Node::Embed {
                seq,
                vocab,
                width,
                table,
                tied: false,
            },
            Op::PositionalEmbedding { seq, width, table } => Node::Pos { seq, width, table },
            Op::TransformerBlock {
                seq,
                width,
                heads,
                block,
            } => Node::Block {
                seq,
                width,
                heads,
                block,
            },
            Op::LmHead {
                seq,
                width,
                vocab,
                table,
                head,
            } => Node::Head {
                seq,
                width,
                vocab,
                table,
                head,
            },
        };
        let out_len = node.out_len(input);
        out.push((node, input, out_len));
    }
    let tied: Vec<usize> = out
        .iter()
        .filter_map(|(n, ..)| match *n {
            Node::Head {
                table, head: None, ..
            } => Some(table),
            _ => None,
        })
        .collect();
    for (node, ..) in &mut out {
        if let Node::Embed { table, tied: t, .. } = node {
            *t = tied.contains(table);
        }
    }
    Ok(out)
}

/// Buffers and recorded dispatches for one batch size (and mode: training or forward-only).
#[derive(Debug)]
struct Plan {
    /// Input features `[rows, input]`, rewritten per batch.
    x: wgpu::Buffer,
    /// Labels `[rows]` (u32), rewritten per batch.
    labels: wgpu::Buffer,
    /// `{loss_sum, correct}` written by the softmax kernel.
    stats: wgpu::Buffer,
    /// Everything the pass runs, in order; kept alive here along with their buffers.
    dispatches: Vec<Dispatch>,
    /// Per-node outputs and side buffers (arg-max, norm statistics, conv scratch, the gradient ping-pong pair),
    /// referenced by the bind groups above.
    _scratch: Vec<wgpu::Buffer>,
    /// Each transformer block's intermediates and their shared scratch.
    _blocks: (Vec<BlockActs>, BlockScratch),
}

/// A model version resident on the GPU, ready for micro-batches.
#[derive(Debug)]
pub struct GpuEngine {
    ctx: GpuContext,
    spec: ModelSpec,
    /// The layers as the GPU runs them, with per-sample input and output lengths.
    nodes: Vec<(Node, usize, usize)>,
    kernels: Kernels,
    /// The flat parameter vector, uploaded by [`GpuEngine::load`] only.
    params: wgpu::Buffer,
    /// The flat gradient vector, fully overwritten by every step.
    grad: wgpu::Buffer,
    /// Cached plans by (rows, training).
    plans: HashMap<(usize, bool), Plan>,
}

impl GpuEngine {
    /// Builds the parameter and gradient buffers (zero parameters until [`Self::load`]); pipelines are built by the
    /// first plan that needs them.
    pub fn new(ctx: &GpuContext, spec: ModelSpec) -> Result<Self, GpuError> {
        let nodes = nodes(&spec)?;
        let bytes = (spec.param_count() * 4) as u64;
        let params = transfer::storage(ctx, "params", bytes)?;
        let grad = transfer::storage(ctx, "grad", bytes)?;
        Ok(Self {
            ctx: ctx.clone(),
            nodes,
            spec,
            kernels: Kernels::new(ctx),
            params,
            grad,
            plans: HashMap::new(),
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Uploads a new parameter vector (a new model version); batches in between reuse it without re-uploading.
    pub async fn load(&mut self, params: &[f32]) -> Result<(), GpuError> {
        if params.len() != self.spec.param_count() {
            return Err(BatchError::ParamCount {
                got: params.len(),
                expected: self.spec.param_count(),
            }
            .into());
        }
        transfer::upload(&self.ctx, &self.params, bytemuck::cast_slice(params));
        Ok(())
    }

    /// Loss, correct count and full gradient of the mean loss over one micro-batch.
    pub async fn step(&mut self, x: &[f32], labels: &[u32]) -> Result<StepOutput, GpuError> {
        check_batch(&self.spec, x, labels)?;
        let rows = labels.len() / self.spec.labels_per_row();
        self.ensure_plan(rows, true)?;
        let plan = &self.plans[&(rows, true)];
        transfer::upload(&self.ctx, &plan.x, bytemuck::cast_slice(x));
        transfer::upload(&self.ctx, &plan.labels, bytemuck::cast_slice(labels));
        let grad_bytes = (self.spec.param_count() * 4) as u64;
        let out = transfer::run(
            &self.ctx,
            "step",
            &plan.dispatches,
            &[(&self.grad, grad_bytes), (&plan.stats, STATS_BYTES)],
        )
        .await?;
        let (loss_sum, correct) = decode_stats(&out[1]);
        Ok(StepOutput {
            loss: loss_sum / labels.len() as f32,
            correct,
            grad: bytemuck::pod_collect_to_vec(&out[0]),
        })
    }

    /// Forward-only loss and accuracy over any number of rows (run in chunks).
    pub async fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<EvalOutput, GpuError> {
        check_batch(&self.spec, x, labels)?;
        let input = self.spec.input_len();
        let per_row = self.spec.labels_per_row();
        let (mut loss, mut correct) = (0.0f64, 0u32);
        for (xs, ls) in x
            .chunks(self.eval_chunk() * input)
            .zip(labels.chunks(self.eval_chunk() * per_row))
        {
            let rows = ls.len() / per_row;
            self.ensure_plan(rows, false)?;
            let plan = &self.plans[&(rows, false)];
            transfer::upload(&self.ctx, &plan.x, bytemuck::cast_slice(xs));
            transfer::upload(&self.ctx, &plan.labels, bytemuck::cast_slice(ls));
            let out = transfer::run(
                &self.ctx,
                "evaluate",
                &plan.dispatches,
                &[(&plan.stats, STATS_BYTES)],
            )
            .await?;
            let (loss_sum, c) = decode_stats(&out[0]);
            loss += loss_sum as f64;
            correct += c;
        }
        let rows = labels.len();
        Ok(EvalOutput {
            loss: (loss / rows as f64) as f32,
            correct,
            rows: rows as u32,
        })
    }

    /// Rows per evaluation chunk: within [`EVAL_CHUNK`], the scratch budget and the largest single binding.
    fn eval_chunk(&self) -> usize {
        let (total, largest) = self.row_floats();
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        EVAL_CHUNK
            .min(EVAL_BUDGET / (4 * total).max(1))
            .min(limit / (4 * largest).max(1))
            .max(1)
    }

    /// Floats per row of a forward plan: (all buffers together, the largest one).
    fn row_floats(&self) -> (usize, usize) {
        let (mut total, mut largest) = (self.spec.input_len(), self.spec.input_len());
        for (node, _, out) in &self.nodes {
            let extra = node.extra_len();
            total += out + extra;
            largest = largest.max(*out).max(extra);
        }
        (total, largest)
    }

    fn ensure_plan(&mut self, rows: usize, train: bool) -> Result<(), GpuError> {
        if self.plans.contains_key(&(rows, train)) {
            return Ok(());
        }
        if self.plans.len() >= MAX_PLANS {
            self.plans.clear();
        }
        let plan = self.build_plan(rows, train)?;
        self.plans.insert((rows, train), plan);
        Ok(())
    }

    /// Records the whole pass for `rows` rows: every node forward, softmax-xent, and when training the backward
    /// pass into the gradient buffer.
    fn build_plan(&self, rows: usize, train: bool) -> Result<Plan, GpuError> {
        let ctx = &self.ctx;
        let k = &self.kernels;
        let f32s = |n: usize| (rows * n * 4) as u64;
        let input = self.spec.input_len();
        let classes = self.spec.classes();
        // Predicted positions: one per row for a classifier, T per row for a language model.
        let positions = rows * self.spec.labels_per_row();
        let x = transfer::storage(ctx, "x", f32s(input))?;
        let labels = transfer::storage(ctx, "labels", (positions * 4) as u64)?;
        let stats = transfer::storage(ctx, "stats", STATS_BYTES)?;
        let mut scratch = Vec::new();

        // Forward buffers: each node's output, and its side buffer (arg-max or norm statistics) where it has one.
        let mut acts = Vec::with_capacity(self.nodes.len());
        let mut side = Vec::with_capacity(self.nodes.len());
        for (node, _, out) in &self.nodes {
            acts.push(transfer::storage(ctx, "activation", f32s(*out))?);
            side.push(match node {
                Node::Pool {
                    kind: PoolKind::Max,
                    ..
                } => Some(transfer::storage(ctx, "pool arg-max", f32s(*out))?),
                Node::Norm { sample_rows, .. } => Some(transfer::storage(
                    ctx,
                    "norm stats",
                    stats_bytes(rows * sample_rows),
                )?),
                _ => None,
            });
        }
        // Shared by every conv layer: the unfolded input, the [OC, N·P] product (and, backward, dY and dcol).
        let convs: Vec<ConvLayer> = self
            .nodes
            .iter()
            .filter_map(|(n, ..)| n.conv(rows))
            .collect();
        let col_len = convs.iter().map(ConvLayer::col_len).max().unwrap_or(0);
        let mat_len = convs.iter().map(ConvLayer::out_len).max().unwrap_or(0);
        let col = transfer::storage(ctx, "conv col", (col_len * 4) as u64)?;
        let ymat = transfer::storage(ctx, "conv ymat", (mat_len * 4) as u64)?;
        // Every transformer block's kept intermediates, and the scratch they share.
        let blocks: Vec<Option<(BlockLayer, BlockActs)>> = self
            .nodes
            .iter()
            .map(|(n, ..)| {
                n.block(rows)
                    .map(|l| BlockActs::new(ctx, &l).map(|a| (l, a)))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let block_layers: Vec<BlockLayer> = blocks.iter().flatten().map(|(l, _)| *l).collect();
        let block_scratch = BlockScratch::new(ctx, &block_layers, train)?;
        // Average pooling binds an arg-max it never touches.
        let unused = transfer::storage(ctx, "unused", 16)?;
        let input_of = |i: usize| if i == 0 { &x } else { &acts[i - 1] };

        let mut d = Vec::new();
        for (i, (node, _, out)) in self.nodes.iter().enumerate() {
            let (src, dst) = (input_of(i), &acts[i]);
            match *node {
                Node::Dense { layout, relu } => d.extend(layers::dense_forward(
                    k,
                    &dense(rows, &layout),
                    relu,
                    src,
                    &self.params,
                    dst,
                )),
                Node::Conv {
                    dims,
                    weight,
                    bias,
                    relu,
                } => {
                    let l = conv_layer(&dims, weight, bias, rows);
                    d.extend(layers::conv_forward(
                        k,
                        &l,
                        relu,
                        src,
                        &self.params,
                        &col,
                        &ymat,
                        dst,
                    ));
                }
                Node::Pool { dims, kind } => d.push(layers::pool_forward(
                    k,
                    &pool_shape(&dims, rows),
                    kind,
                    src,
                    dst,
                    side[i].as_ref().unwrap_or(&unused),
                )),
                Node::Norm { .. } => d.push(layers::norm_forward(
                    k,
                    &norm_shape(node, rows),
                    src,
                    &self.params,
                    dst,
                    side[i].as_ref().unwrap_or(&unused),
                )),
                Node::Act(act) => d.push(layers::act_forward(k, act, rows * out, src, dst)),
                Node::Embed { .. } | Node::Pos { .. } => {
                    let shape = node
                        .embed(rows)
                        .ok_or(GpuError::Unsupported { layer: "embedding" })?;
                    d.push(transformer::embed_forward(
                        k,
                        &shape,
                        src,
                        &self.params,
                        dst,
                    ));
                }
                Node::Block { .. } => {
                    let Some((l, a)) = &blocks[i] else {
                        return Err(GpuError::Unsupported {
                            layer: "transformer_block",
                        });
                    };
                    d.extend(transformer::block_forward(
                        k,
                        l,
                        src,
                        &self.params,
                        (a, &block_scratch),
                        dst,
                    ));
                }
                Node::Head { .. } => {
                    let l = node
                        .head(rows)
                        .ok_or(GpuError::Unsupported { layer: "lm_head" })?;
                    d.extend(transformer::head_forward(k, &l, src, &self.params, dst));
                }
            }
        }

        // Backward: gradients ping-pong between two buffers as wide as the widest activation.
        let widest = self
            .nodes
            .iter()
            .map(|(_, i, o)| (*i).max(*o))
            .max()
            .unwrap_or(classes);
        let g_len = if train { widest } else { classes };
        let g = [
            transfer::storage(ctx, "grad ping", f32s(g_len))?,
            transfer::storage(ctx, "grad pong", f32s(g_len))?,
        ];
        let logits = acts.last().unwrap_or(&x);
        d.push(k.softmax().dispatch(
            ctx, "loss", positions, classes, train, logits, &labels, &g[0], &stats,
        ));
        let dcol = if train && !convs.is_empty() {
            Some(transfer::storage(ctx, "conv dcol", (col_len * 4) as u64)?)
        } else {
            None
        };
        if train {
            // The first node with parameters needs no input gradient, and nothing before it needs a backward pass.
            let first = self.nodes.iter().position(|(n, ..)| n.has_params());
            let mut cur = 0;
            for (i, (node, _, out)) in self.nodes.iter().enumerate().rev() {
                let Some(first) = first.filter(|f| i >= *f) else {
                    break;
                };
                let needs_dx = i > first;
                let (src, dy, dx) = (input_of(i), &g[cur], &g[1 - cur]);
                match *node {
                    Node::Dense { layout, relu } => {
                        if relu {
                            d.push(layers::relu_backward_in_place(k, rows * out, dy, &acts[i]));
                        }
                        d.extend(layers::dense_backward(
                            k,
                            &dense(rows, &layout),
                            src,
                            dy,
                            &self.params,
                            &self.grad,
                            needs_dx.then_some(dx),
                        ));
                    }
                    Node::Conv {
                        dims,
                        weight,
                        bias,
                        relu,
                    } => {
                        let l = conv_layer(&dims, weight, bias, rows);
                        if relu {
                            d.push(layers::relu_backward_in_place(k, rows * out, dy, &acts[i]));
                        }
                        let dcol = dcol.as_ref().unwrap_or(&unused);
                        d.extend(layers::conv_backward(
                            k,
                            &l,
                            src,
                            dy,
                            &self.params,
                            &self.grad,
                            &col,
                            &ymat,
                            needs_dx.then_some((dcol, dx)),
                        )?);
                    }
                    Node::Pool { dims, kind } => d.push(layers::pool_backward(
                        k,
                        &pool_shape(&dims, rows),
                        kind,
                        dy,
                        side[i].as_ref().unwrap_or(&unused),
                        dx,
                    )),
                    Node::Norm { .. } => d.extend(layers::norm_backward(
                        k,
                        &norm_shape(node, rows),
                        src,
                        dy,
                        &self.params,
                        side[i].as_ref().unwrap_or(&unused),
                        &self.grad,
                        needs_dx.then_some(dx),
                    )),
                    Node::Act(act) => d.push(layers::act_backward(k, act, rows * out, src, dy, dx)),
                    Node::Embed { tied, .. } => {
                        let shape = node
                            .embed(rows)
                            .ok_or(GpuError::Unsupported { layer: "embedding" })?;
                        d.push(transformer::embed_backward(
                            k, &shape, tied, src, dy, &self.grad,
                        ));
                    }
                    // The input gradient is dy itself: it stays where it is (no flip below).
                    Node::Pos { .. } => {
                        let shape = node.embed(rows).ok_or(GpuError::Unsupported {
                            layer: "positional_embedding",
                        })?;
                        d.push(transformer::embed_backward(
                            k, &shape, false, src, dy, &self.grad,
                        ));
                    }
                    Node::Block { .. } => {
                        let Some((l, a)) = &blocks[i] else {
                            return Err(GpuError::Unsupported {
                                layer: "transformer_block",
                            });
                        };
                        d.extend(transformer::block_backward(
                            k,
                            l,
                            src,
                            dy,
                            &self.params,
                            &self.grad,
                            (a, &block_scratch),
                            needs_dx.then_some(dx),
                        ));
                    }
                    Node::Head { .. } => {
                        let l = node
                            .head(rows)
                            .ok_or(GpuError::Unsupported { layer: "lm_head" })?;
                        d.extend(transformer::head_backward(
                            k,
                            &l,
                            src,
                            dy,
                            &self.params,
                            &self.grad,
                            needs_dx.then_some(dx),
                        ));
                    }
                }
                if needs_dx && !matches!(node, Node::Pos { .. }) {
                    cur = 1 - cur;
                }
            }
        }
        scratch.extend(acts);
        scratch.extend(side.into_iter().flatten());
        scratch.extend([col, ymat, unused]);
        scratch.extend(g);
        scratch.extend(dcol);
        let kept = blocks.into_iter().flatten().map(|(_, a)| a).collect();
        Ok(Plan {
            x,
            labels,
            stats,
            dispatches: d,
            _scratch: scratch,
            _blocks: (kept, block_scratch),
        })
    }
}

fn dense(rows: usize, l: &LayerLayout) -> DenseLayer {
    DenseLayer {
        rows,
        inputs: l.inputs,
        outputs: l.outputs,
        weight: l.weight,
        bias: l.bias,
    }
}

fn norm_shape(node: &Node, rows: usize) -> NormShape {
    match *node {
        Node::Norm {
            len,
            sample_rows,
            groups,
            plane,
            eps,
            gamma,
            beta,
        } => NormShape {
            rows: rows * sample_rows,
            len,
            groups,
            plane,
            eps,
            gamma,
            beta,
        },
        _ => NormShape::layer(rows, 1, 0.0, 0, 0),
    }
}
