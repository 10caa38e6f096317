//! The resident-model engine: one model version's parameters live on the GPU, and each batch size gets a dispatch
//! plan (buffers, uniform buffers, bind groups) built once and reused for every later batch of that size.
//!
//! The spec's layer graph is resolved once into `nodes::Node`s: a ReLU right after a dense or conv2d layer is fused
//! into that layer's bias kernel (so a v1 dense model records exactly the dispatches it always did), `flatten` is a
//! view of the buffer before it, and every other layer is one node with its own output buffer. Backward runs the
//! nodes in reverse through a ping-pong pair of gradient buffers.
//!
//! A language model (issue 13) runs on the same plan: its rows are sequences of `T` token ids, its labels the next
//! token at every position (`T` per row), and the loss the mean over all `B·T` positions, as on the CPU engine.

use std::collections::HashMap;

use starling_core::{BatchError, EvalOutput, ModelSpec, StepOutput, check_batch};

use super::kernels::{PoolKind, STATS_BYTES, decode_stats, stats_bytes};
use super::layers::{self, ConvLayer, Kernels};
use super::nodes::{Node, conv_layer, dense, nodes, norm_shape, pool_shape};
use super::transfer::{self, Dispatch};
use super::transformer::{self, BlockActs, BlockLayer, BlockScratch};
use super::{GpuContext, GpuError};

/// Most rows per evaluation chunk, bounding activation memory for large evaluation sets.
const EVAL_CHUNK: usize = 1024;
/// Bytes of scratch an evaluation chunk may use: a CNN's unfolded convolution inputs are ~100 KiB per row.
const EVAL_BUDGET: usize = 128 << 20;
/// Plans kept before the cache is cleared (each holds activation buffers for its batch size).
const MAX_PLANS: usize = 8;

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
