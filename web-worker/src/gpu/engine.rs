//! The resident-model engine: one model version's parameters live on the GPU, and each batch size gets a dispatch
//! plan (buffers, uniform buffers, bind groups) built once and reused for every later batch of that size.

use std::collections::HashMap;

use starling_core::spec::LayerLayout;
use starling_core::{Activation, BatchError, EvalOutput, ModelSpec, StepOutput, check_batch};

use super::kernels::{STATS_BYTES, decode_stats};
use super::layers::{self, DenseLayer, Kernels};
use super::transfer::{self, Dispatch};
use super::{GpuContext, GpuError};

/// Most rows per evaluation chunk, bounding activation memory for large evaluation sets.
const EVAL_CHUNK: usize = 1024;
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
    /// Per-layer activations and the gradient ping-pong pair, referenced by the bind groups above.
    _scratch: Vec<wgpu::Buffer>,
}

/// A model version resident on the GPU, ready for micro-batches.
#[derive(Debug)]
pub struct GpuEngine {
    ctx: GpuContext,
    spec: ModelSpec,
    layout: Vec<LayerLayout>,
    kernels: Kernels,
    /// The flat parameter vector, uploaded by [`GpuEngine::load`] only.
    params: wgpu::Buffer,
    /// The flat gradient vector, fully overwritten by every step.
    grad: wgpu::Buffer,
    /// Cached plans by (rows, training).
    plans: HashMap<(usize, bool), Plan>,
}

impl GpuEngine {
    /// Builds every pipeline and the parameter and gradient buffers (zero parameters until [`Self::load`]).
    pub fn new(ctx: &GpuContext, spec: ModelSpec) -> Result<Self, GpuError> {
        let kernels = Kernels::new(ctx);
        let bytes = (spec.param_count() * 4) as u64;
        let params = transfer::storage(ctx, "params", bytes)?;
        let grad = transfer::storage(ctx, "grad", bytes)?;
        Ok(Self {
            ctx: ctx.clone(),
            layout: spec.layout(),
            spec,
            kernels,
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
        let rows = labels.len();
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
            loss: loss_sum / rows as f32,
            correct,
            grad: bytemuck::pod_collect_to_vec(&out[0]),
        })
    }

    /// Forward-only loss and accuracy over any number of rows (run in chunks).
    pub async fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<EvalOutput, GpuError> {
        check_batch(&self.spec, x, labels)?;
        let input = self.spec.input as usize;
        let limit = self.ctx.limits.max_storage_buffer_binding_size as usize;
        let chunk = EVAL_CHUNK.min(limit / (4 * self.spec.max_width())).max(1);
        let (mut loss, mut correct) = (0.0f64, 0u32);
        for (xs, ls) in x.chunks(chunk * input).zip(labels.chunks(chunk)) {
            let rows = ls.len();
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

    /// Records the whole pass for `rows` rows: forward (matmul + bias/activation per layer), softmax-xent, and
    /// when training the backward pass into the gradient buffer.
    fn build_plan(&self, rows: usize, train: bool) -> Result<Plan, GpuError> {
        let ctx = &self.ctx;
        let k = &self.kernels;
        let input = self.spec.input as usize;
        let classes = self.spec.classes();
        let widest_out = self
            .layout
            .iter()
            .map(|l| l.outputs)
            .max()
            .unwrap_or(classes);
        let x = transfer::storage(ctx, "x", (rows * input * 4) as u64)?;
        let labels = transfer::storage(ctx, "labels", (rows * 4) as u64)?;
        let stats = transfer::storage(ctx, "stats", STATS_BYTES)?;
        let acts = self
            .layout
            .iter()
            .map(|l| transfer::storage(ctx, "activation", (rows * l.outputs * 4) as u64))
            .collect::<Result<Vec<_>, _>>()?;
        let dz_bytes = (rows * if train { widest_out } else { classes } * 4) as u64;
        let dz = [
            transfer::storage(ctx, "dz ping", dz_bytes)?,
            transfer::storage(ctx, "dz pong", dz_bytes)?,
        ];

        let dense = |l: &LayerLayout| DenseLayer {
            rows,
            inputs: l.inputs,
            outputs: l.outputs,
            weight: l.weight,
            bias: l.bias,
        };
        let mut d = Vec::new();
        for (li, l) in self.layout.iter().enumerate() {
            let a = if li == 0 { &x } else { &acts[li - 1] };
            let relu = l.activation == Activation::Relu;
            d.extend(layers::dense_forward(
                k,
                &dense(l),
                relu,
                a,
                &self.params,
                &acts[li],
            ));
        }
        let logits = &acts[acts.len() - 1];
        d.push(k.softmax().dispatch(
            ctx, "loss", rows, classes, train, logits, &labels, &dz[0], &stats,
        ));
        if train {
            let mut cur = 0;
            for (li, l) in self.layout.iter().enumerate().rev() {
                if li + 1 < self.layout.len() && l.activation == Activation::Relu {
                    d.push(layers::relu_backward_in_place(
                        k,
                        rows * l.outputs,
                        &dz[cur],
                        &acts[li],
                    ));
                }
                let a = if li == 0 { &x } else { &acts[li - 1] };
                let dx = (li > 0).then_some(&dz[1 - cur]);
                d.extend(layers::dense_backward(
                    k,
                    &dense(l),
                    a,
                    &dz[cur],
                    &self.params,
                    &self.grad,
                    dx,
                ));
                if li > 0 {
                    cur = 1 - cur;
                }
            }
        }
        let mut scratch = acts;
        scratch.extend(dz);
        Ok(Plan {
            x,
            labels,
            stats,
            dispatches: d,
            _scratch: scratch,
        })
    }
}
