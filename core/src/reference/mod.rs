//! Plain-loop reference of every kernel and of the whole forward/backward pass over the layer graph.
//!
//! This is the oracle the GPU kernels and the fast CPU backend are tested against: obvious loops, f64 accumulation
//! where it matters, no cleverness. It is deliberately slow; never use it on a hot path. Per layer kind, the
//! public forward and backward functions (with their layouts) are in [`conv`], [`pool`], [`norm`] and [`act`];
//! dense is [`matmul`] + [`bias_act`] here. Every function overwrites its outputs.

pub mod act; // relu and gelu (tanh form).
pub mod conv; // conv2d forward, input gradient, weight + bias gradient.
pub mod norm; // layer_norm and group_norm.
pub mod pool; // max_pool2d (first max wins) and avg_pool2d.

pub use act::{gelu_backward, gelu_forward, relu_backward, relu_forward};
pub use conv::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward};
pub use norm::{group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward};
pub use pool::{avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward};

use crate::spec::{Activation, LayerPlan, ModelSpec, Op};
use crate::transformer::graph;
use crate::transformer::reference::Reference as TransformerReference;
use crate::{BatchError, EvalOutput, StepOutput, batch_rows, check_batch};

/// Which operand of a matmul is read transposed: the three forms backprop needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulForm {
    /// `C = A·B`, A `[m, k]`, B `[k, n]` (forward).
    AB,
    /// `C = Aᵀ·B`, A stored `[k, m]`, B `[k, n]` (weight gradient `xᵀ·dz`).
    AtB,
    /// `C = A·Bᵀ`, A `[m, k]`, B stored `[n, k]` (input gradient `dz·Wᵀ`).
    ABt,
}

impl MatmulForm {
    /// Row and column strides of A and B for this form, in elements: `(a_rs, a_cs, b_rs, b_cs)` such that
    /// `op(A)[i, p] = a[i * a_rs + p * a_cs]` and `op(B)[p, j] = b[p * b_rs + j * b_cs]`.
    pub fn strides(self, m: usize, k: usize, n: usize) -> (usize, usize, usize, usize) {
        match self {
            Self::AB => (k, 1, n, 1),
            Self::AtB => (1, m, n, 1),
            Self::ABt => (k, 1, 1, k),
        }
    }
}

/// `C[m, n] = op(A)·op(B)` (overwrites C), accumulating in f64.
pub fn matmul(form: MatmulForm, m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    let (a_rs, a_cs, b_rs, b_cs) = form.strides(m, k, n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64;
            }
            c[i * n + j] = acc as f32;
        }
    }
}

/// `Z[r, j] = act(Z[r, j] + bias[j])` in place.
pub fn bias_act(z: &mut [f32], bias: &[f32], act: Activation) {
    let cols = bias.len();
    for row in z.chunks_exact_mut(cols) {
        for (v, b) in row.iter_mut().zip(bias) {
            let s = *v + *b;
            *v = match act {
                Activation::Relu => s.max(0.0),
                Activation::None => s,
            };
        }
    }
}

/// `dZ = dA ⊙ act'(·)`, in place, given the layer's post-activation output `a` (for ReLU, `a > 0 ⇔ z > 0`).
pub fn act_backward(dz: &mut [f32], a: &[f32], act: Activation) {
    if act == Activation::Relu {
        for (d, v) in dz.iter_mut().zip(a) {
            if *v <= 0.0 {
                *d = 0.0;
            }
        }
    }
}

/// Numerically stable softmax-cross-entropy over `logits [rows, classes]`.
/// Returns the summed loss, the number of rows whose first arg-max equals the label, and (when `dlogits` is
/// given) `dlogits = (softmax - onehot) / rows`, the gradient of the *mean* loss.
pub fn softmax_xent(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    mut dlogits: Option<&mut [f32]>,
) -> (f64, u32) {
    let rows = labels.len();
    let mut loss = 0.0f64;
    let mut correct = 0u32;
    for (r, &label) in labels.iter().enumerate() {
        let row = &logits[r * classes..(r + 1) * classes];
        let (mut best, mut max) = (0usize, row[0]);
        for (j, &v) in row.iter().enumerate().skip(1) {
            if v > max {
                max = v;
                best = j;
            }
        }
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let z_y = row[label as usize];
        // Σ_{j≠y} e^(z_j − max): when the label holds the max, loss = ln(1 + others) exactly, without the cancellation
        // of lse − z_y (which, for logits of 1e30, would lose the whole answer).
        let others: f64 = row
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != label as usize)
            .map(|(_, &v)| ((v - max) as f64).exp())
            .sum();
        loss += if z_y >= max {
            others.ln_1p()
        } else {
            (max - z_y) as f64 + sum.ln()
        };
        correct += u32::from(best == label as usize);
        if let Some(d) = dlogits.as_deref_mut() {
            for j in 0..classes {
                // p_j − [j = y], with p_y − 1 written as −others / sum (no cancellation, as for the loss).
                let g = if j == label as usize {
                    -others / sum
                } else {
                    ((row[j] - max) as f64).exp() / sum
                };
                d[r * classes + j] = (g / rows as f64) as f32;
            }
        }
    }
    (loss, correct)
}

/// `out[j] = Σ_r dz[r, j]` (bias gradient).
pub fn col_sum(dz: &[f32], cols: usize, out: &mut [f32]) {
    for j in 0..cols {
        out[j] = dz.chunks_exact(cols).map(|row| row[j] as f64).sum::<f64>() as f32;
    }
}

/// One layer's forward pass over `rows` samples: `y = layer(x)`, `x` `[rows, plan.input]`, `y`
/// `[rows, plan.output]`.
pub fn layer_forward(plan: &LayerPlan, params: &[f32], rows: usize, x: &[f32], y: &mut [f32]) {
    match plan.op {
        Op::Dense(l) => {
            matmul(
                MatmulForm::AB,
                rows,
                l.inputs,
                l.outputs,
                x,
                &params[l.weight..l.bias],
                y,
            );
            bias_act(y, &params[l.bias..l.bias + l.outputs], l.activation);
        }
        Op::Conv2d { dims, weight, bias } => conv2d_forward(
            &dims,
            rows,
            x,
            &params[weight..bias],
            &params[bias..bias + dims.out_c],
            y,
        ),
        Op::MaxPool2d(d) => max_pool2d_forward(&d, rows, x, y),
        Op::AvgPool2d(d) => avg_pool2d_forward(&d, rows, x, y),
        Op::Flatten => y.copy_from_slice(x),
        Op::Relu => relu_forward(x, y),
        Op::Gelu => gelu_forward(x, y),
        Op::LayerNorm {
            dim,
            gamma,
            beta,
            eps,
        } => layer_norm_forward(
            x,
            &params[gamma..beta],
            &params[beta..beta + dim],
            dim,
            eps,
            y,
        ),
        Op::GroupNorm {
            dims,
            gamma,
            beta,
            eps,
        } => group_norm_forward(
            &dims,
            rows,
            x,
            &params[gamma..beta],
            &params[beta..beta + dims.channels],
            eps,
            y,
        ),
        Op::Embedding { .. }
        | Op::PositionalEmbedding { .. }
        | Op::TransformerBlock { .. }
        | Op::LmHead { .. } => {
            graph::layer_forward(&TransformerReference, &plan.op, params, rows, x, y)
        }
    }
}

/// One layer's backward pass: given its input `x`, its output `y` and `dy = ∂loss/∂y`, writes the layer's
/// parameter gradients into `grad[plan.offset..plan.offset + plan.len]` (overwriting) and, when `dx` is given,
/// `dx = ∂loss/∂x`.
#[allow(clippy::too_many_arguments)] // the forward operands, the incoming gradient and the two outputs
pub fn layer_backward(
    plan: &LayerPlan,
    params: &[f32],
    rows: usize,
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    grad: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    match plan.op {
        Op::Dense(l) => {
            let mut dz = dy.to_vec();
            act_backward(&mut dz, y, l.activation);
            matmul(
                MatmulForm::AtB,
                l.inputs,
                rows,
                l.outputs,
                x,
                &dz,
                &mut grad[l.weight..l.bias],
            );
            col_sum(&dz, l.outputs, &mut grad[l.bias..l.bias + l.outputs]);
            if let Some(dx) = dx {
                matmul(
                    MatmulForm::ABt,
                    rows,
                    l.outputs,
                    l.inputs,
                    &dz,
                    &params[l.weight..l.bias],
                    dx,
                );
            }
        }
        Op::Conv2d { dims, weight, bias } => {
            let (dw, db) = grad[weight..bias + dims.out_c].split_at_mut(bias - weight);
            conv2d_backward_weight(&dims, rows, x, dy, dw, db);
            if let Some(dx) = dx {
                conv2d_backward_input(&dims, rows, dy, &params[weight..bias], dx);
            }
        }
        Op::MaxPool2d(d) => {
            if let Some(dx) = dx {
                max_pool2d_backward(&d, rows, x, dy, dx);
            }
        }
        Op::AvgPool2d(d) => {
            if let Some(dx) = dx {
                avg_pool2d_backward(&d, rows, dy, dx);
            }
        }
        Op::Flatten => {
            if let Some(dx) = dx {
                dx.copy_from_slice(dy);
            }
        }
        Op::Relu => {
            if let Some(dx) = dx {
                relu_backward(x, dy, dx);
            }
        }
        Op::Gelu => {
            if let Some(dx) = dx {
                gelu_backward(x, dy, dx);
            }
        }
        Op::LayerNorm {
            dim,
            gamma,
            beta,
            eps,
        } => {
            let mut scratch = vec![0.0f32; x.len()];
            let (dg, db) = grad[gamma..beta + dim].split_at_mut(dim);
            let dx = dx.unwrap_or(&mut scratch);
            layer_norm_backward(x, &params[gamma..beta], dy, dim, eps, dx, dg, db);
        }
        Op::GroupNorm {
            dims,
            gamma,
            beta,
            eps,
        } => {
            let mut scratch = vec![0.0f32; x.len()];
            let (dg, db) = grad[gamma..beta + dims.channels].split_at_mut(dims.channels);
            let dx = dx.unwrap_or(&mut scratch);
            group_norm_backward(&dims, rows, x, &params[gamma..beta], dy, eps, dx, dg, db);
        }
        Op::Embedding { .. }
        | Op::PositionalEmbedding { .. }
        | Op::TransformerBlock { .. }
        | Op::LmHead { .. } => graph::layer_backward(
            &TransformerReference,
            &plan.op,
            params,
            rows,
            x,
            dy,
            grad,
            dx,
        ),
    }
}

/// Forward pass, keeping every layer's output (the last is the logits).
pub fn forward(plans: &[LayerPlan], params: &[f32], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(plans.len());
    for p in plans {
        let input = outs.last().map_or(x, |a| a.as_slice());
        let mut y = vec![0.0f32; rows * p.output.len()];
        layer_forward(p, params, rows, input, &mut y);
        outs.push(y);
    }
    outs
}

fn check_params(spec: &ModelSpec, params: &[f32]) -> Result<(), BatchError> {
    if params.len() != spec.param_count() {
        return Err(BatchError::ParamCount {
            got: params.len(),
            expected: spec.param_count(),
        });
    }
    Ok(())
}

/// Loss, correct count and full gradient of the mean loss over one micro-batch.
pub fn forward_backward(
    spec: &ModelSpec,
    params: &[f32],
    x: &[f32],
    labels: &[u32],
) -> Result<StepOutput, BatchError> {
    check_params(spec, params)?;
    check_batch(spec, x, labels)?;
    let rows = batch_rows(spec, labels);
    let plans = spec.plan();
    let outs = forward(&plans, params, x, rows);
    let classes = spec.classes();
    let mut dy = vec![0.0f32; labels.len() * classes];
    let (loss, correct) = softmax_xent(&outs[outs.len() - 1], labels, classes, Some(&mut dy));
    let mut grad = vec![0.0f32; params.len()];
    for (li, p) in plans.iter().enumerate().rev() {
        let input = if li == 0 { x } else { outs[li - 1].as_slice() };
        let mut dx = (li > 0).then(|| vec![0.0f32; rows * p.input.len()]);
        layer_backward(
            p,
            params,
            rows,
            input,
            &outs[li],
            &dy,
            &mut grad,
            dx.as_deref_mut(),
        );
        if let Some(dx) = dx {
            dy = dx;
        }
    }
    Ok(StepOutput {
        loss: (loss / labels.len() as f64) as f32,
        correct,
        grad,
    })
}

/// Forward-only loss and accuracy.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    x: &[f32],
    labels: &[u32],
) -> Result<EvalOutput, BatchError> {
    check_params(spec, params)?;
    check_batch(spec, x, labels)?;
    let outs = forward(&spec.plan(), params, x, batch_rows(spec, labels));
    let (loss, correct) = softmax_xent(&outs[outs.len() - 1], labels, spec.classes(), None);
    // `rows` counts labels: predicted positions for a language model.
    Ok(EvalOutput {
        loss: (loss / labels.len() as f64) as f32,
        correct,
        rows: labels.len() as u32,
    })
}

#[cfg(test)]
mod tests;
