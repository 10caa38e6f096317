//! The fast CPU backend: the same forward/backward pass as [`crate::reference`], on `matrixmultiply`'s SGEMM
//! (both cores natively through its `threading` feature; SIMD128 single-threaded in wasm). Dense layers are one
//! GEMM each way; conv2d is im2col + GEMM ([`conv`]); pooling, norms and activations run the reference's loops,
//! which are single passes over memory already.
//!
//! Used by workers without a usable GPU (including browsers on a software WebGPU adapter, where it is several
//! times faster) and by the coordinator for evaluation and spot checks, which must never need wgpu.

mod conv; // conv2d as im2col + SGEMM.

use crate::reference::{self, MatmulForm, act_backward, bias_act, softmax_xent};
use crate::spec::{LayerPlan, ModelSpec, Op};
use crate::transformer::{fast::Fast, graph};
use crate::{BatchError, EvalOutput, StepOutput, batch_rows, check_batch};

/// `C[m, n] = op(A)·op(B) + beta·C` on matrixmultiply's SGEMM, with transposes expressed as strides.
///
/// Panics if a slice is too short for its shape: callers size buffers from the spec, so that is a bug, not input.
#[allow(clippy::too_many_arguments)] // BLAS-shaped on purpose: form, three sizes, three operands, beta.
pub fn sgemm(
    form: MatmulForm,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "sgemm operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (a_rs, a_cs, b_rs, b_cs) = form.strides(m, k, n);
    // SAFETY: the asserts above bound every index `i*rs + p*cs` sgemm touches (i < m, p < k, j < n) inside the
    // slices, whose strides come from `form.strides` for exactly these shapes; `c` is borrowed mutably and
    // distinct from `a` and `b`.
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_rs as isize,
            a_cs as isize,
            b.as_ptr(),
            b_rs as isize,
            b_cs as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Rows per chunk in [`CpuEngine::evaluate`], bounding scratch memory for large evaluation sets.
const EVAL_CHUNK: usize = 1024;

/// A model version resident in memory, ready for micro-batches. Scratch buffers are reused between calls.
#[derive(Debug)]
pub struct CpuEngine {
    spec: ModelSpec,
    plans: Vec<LayerPlan>,
    params: Vec<f32>,
    /// Output of every layer for the last batch (the last one is the logits).
    outs: Vec<Vec<f32>>,
    /// Two ping-pong buffers for the backward pass's activation gradients.
    dy: Vec<f32>,
    dx: Vec<f32>,
    /// im2col scratch, reused by every conv layer.
    conv: conv::ConvScratch,
}

impl CpuEngine {
    /// An engine for `spec` with all-zero parameters; call [`CpuEngine::load`] before use.
    pub fn new(spec: ModelSpec) -> Self {
        let plans = spec.plan();
        let params = vec![0.0; spec.param_count()];
        Self {
            spec,
            plans,
            params,
            outs: Vec::new(),
            dy: Vec::new(),
            dx: Vec::new(),
            conv: conv::ConvScratch::default(),
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Replaces the resident parameters (a new model version).
    pub fn load(&mut self, params: &[f32]) -> Result<(), BatchError> {
        if params.len() != self.params.len() {
            return Err(BatchError::ParamCount {
                got: params.len(),
                expected: self.params.len(),
            });
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    fn forward(&mut self, x: &[f32], rows: usize) {
        self.outs.resize_with(self.plans.len(), Vec::new);
        for (li, p) in self.plans.iter().enumerate() {
            let (before, rest) = self.outs.split_at_mut(li);
            let input = before.last().map_or(x, |a| a.as_slice());
            let y = &mut rest[0];
            y.resize(rows * p.output.len(), 0.0);
            match p.op {
                Op::Dense(l) => {
                    sgemm(
                        MatmulForm::AB,
                        rows,
                        l.inputs,
                        l.outputs,
                        input,
                        &self.params[l.weight..l.bias],
                        0.0,
                        y,
                    );
                    bias_act(y, &self.params[l.bias..l.bias + l.outputs], l.activation);
                }
                Op::Conv2d { dims, weight, bias } => conv::forward(
                    &dims,
                    rows,
                    input,
                    &self.params[weight..bias],
                    &self.params[bias..bias + dims.out_c],
                    y,
                    &mut self.conv,
                ),
                // The transformer layers on their SGEMM path (core/src/transformer/fast.rs).
                op if graph::is_transformer(&op) => {
                    graph::layer_forward(&Fast, &op, &self.params, rows, input, y)
                }
                _ => reference::layer_forward(p, &self.params, rows, input, y),
            }
        }
    }

    /// Loss, correct count and the gradient of the mean loss over one micro-batch.
    pub fn step(&mut self, x: &[f32], labels: &[u32]) -> Result<StepOutput, BatchError> {
        check_batch(&self.spec, x, labels)?;
        let rows = batch_rows(&self.spec, labels);
        self.forward(x, rows);
        let classes = self.spec.classes();
        self.dy.resize(labels.len() * classes, 0.0);
        let (loss, correct) = softmax_xent(
            &self.outs[self.plans.len() - 1],
            labels,
            classes,
            Some(&mut self.dy),
        );
        let mut grad = vec![0.0f32; self.params.len()];
        for li in (0..self.plans.len()).rev() {
            let p = self.plans[li];
            let input = if li == 0 {
                x
            } else {
                self.outs[li - 1].as_slice()
            };
            self.dx.resize(rows * p.input.len(), 0.0);
            match p.op {
                Op::Dense(l) => {
                    act_backward(&mut self.dy, &self.outs[li], l.activation);
                    sgemm(
                        MatmulForm::AtB,
                        l.inputs,
                        rows,
                        l.outputs,
                        input,
                        &self.dy,
                        0.0,
                        &mut grad[l.weight..l.bias],
                    );
                    let db = &mut grad[l.bias..l.bias + l.outputs];
                    for row in self.dy.chunks_exact(l.outputs) {
                        for (g, d) in db.iter_mut().zip(row) {
                            *g += *d;
                        }
                    }
                    if li > 0 {
                        sgemm(
                            MatmulForm::ABt,
                            rows,
                            l.outputs,
                            l.inputs,
                            &self.dy,
                            &self.params[l.weight..l.bias],
                            0.0,
                            &mut self.dx,
                        );
                    }
                }
                Op::Conv2d { dims, weight, bias } => {
                    let (dw, db) = grad[weight..bias + dims.out_c].split_at_mut(bias - weight);
                    conv::backward(
                        &dims,
                        rows,
                        input,
                        &self.params[weight..bias],
                        &self.dy,
                        dw,
                        db,
                        (li > 0).then_some(self.dx.as_mut_slice()),
                        &mut self.conv,
                    );
                }
                op if graph::is_transformer(&op) => graph::layer_backward(
                    &Fast,
                    &op,
                    &self.params,
                    rows,
                    input,
                    &self.dy,
                    &mut grad,
                    (li > 0).then_some(self.dx.as_mut_slice()),
                ),
                _ => reference::layer_backward(
                    &p,
                    &self.params,
                    rows,
                    input,
                    &self.outs[li],
                    &self.dy,
                    &mut grad,
                    (li > 0).then_some(self.dx.as_mut_slice()),
                ),
            }
            if li > 0 {
                std::mem::swap(&mut self.dy, &mut self.dx);
            }
        }
        Ok(StepOutput {
            loss: (loss / labels.len() as f64) as f32,
            correct,
            grad,
        })
    }

    /// Forward-only loss and accuracy over any number of rows (processed in chunks).
    pub fn evaluate(&mut self, x: &[f32], labels: &[u32]) -> Result<EvalOutput, BatchError> {
        check_batch(&self.spec, x, labels)?;
        let input = self.spec.input_len();
        let classes = self.spec.classes();
        let (mut loss, mut correct) = (0.0f64, 0u32);
        // A language-model row predicts `per_row` positions: chunk by positions, not rows, to bound memory.
        let per_row = self.spec.labels_per_row();
        let chunk = (EVAL_CHUNK / per_row).max(1);
        for (xs, ls) in x.chunks(chunk * input).zip(labels.chunks(chunk * per_row)) {
            self.forward(xs, ls.len() / per_row);
            let (l, c) = softmax_xent(&self.outs[self.plans.len() - 1], ls, classes, None);
            loss += l;
            correct += c;
        }
        Ok(EvalOutput {
            loss: (loss / labels.len() as f64) as f32,
            correct,
            rows: labels.len() as u32,
        })
    }
}

#[cfg(test)]
mod tests;
