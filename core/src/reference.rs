//! Plain-loop reference of every kernel and of the whole forward/backward pass.
//!
//! This is the oracle the GPU kernels and the fast CPU backend are tested against: obvious loops, f64 accumulation
//! where it matters, no cleverness. It is deliberately slow; never use it on a hot path.

use crate::spec::{Activation, ModelSpec};
use crate::{BatchError, EvalOutput, StepOutput, check_batch};

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

/// Forward pass, keeping every layer's post-activation output (the last is the logits).
fn forward(spec: &ModelSpec, params: &[f32], x: &[f32], rows: usize) -> Vec<Vec<f32>> {
    let mut acts: Vec<Vec<f32>> = Vec::with_capacity(spec.layers.len());
    for l in spec.layout() {
        let input = acts.last().map_or(x, |a| a.as_slice());
        let mut z = vec![0.0f32; rows * l.outputs];
        matmul(
            MatmulForm::AB,
            rows,
            l.inputs,
            l.outputs,
            input,
            &params[l.weight..l.bias],
            &mut z,
        );
        bias_act(&mut z, &params[l.bias..l.bias + l.outputs], l.activation);
        acts.push(z);
    }
    acts
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
    let rows = labels.len();
    let layout = spec.layout();
    let acts = forward(spec, params, x, rows);
    let classes = spec.classes();
    let mut dz = vec![0.0f32; rows * classes];
    let (loss, correct) = softmax_xent(&acts[acts.len() - 1], labels, classes, Some(&mut dz));
    let mut grad = vec![0.0f32; params.len()];
    for (li, l) in layout.iter().enumerate().rev() {
        if li + 1 < layout.len() {
            act_backward(&mut dz, &acts[li], l.activation);
        }
        let input = if li == 0 { x } else { acts[li - 1].as_slice() };
        matmul(
            MatmulForm::AtB,
            l.inputs,
            rows,
            l.outputs,
            input,
            &dz,
            &mut grad[l.weight..l.bias],
        );
        col_sum(&dz, l.outputs, &mut grad[l.bias..l.bias + l.outputs]);
        if li > 0 {
            let mut dx = vec![0.0f32; rows * l.inputs];
            matmul(
                MatmulForm::ABt,
                rows,
                l.outputs,
                l.inputs,
                &dz,
                &params[l.weight..l.bias],
                &mut dx,
            );
            dz = dx;
        }
    }
    Ok(StepOutput {
        loss: (loss / rows as f64) as f32,
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
    let rows = labels.len();
    let acts = forward(spec, params, x, rows);
    let (loss, correct) = softmax_xent(&acts[acts.len() - 1], labels, spec.classes(), None);
    Ok(EvalOutput {
        loss: (loss / rows as f64) as f32,
        correct,
        rows: rows as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::spec::LayerSpec;

    /// Central finite differences in f64-ish precision on a tiny net: the analytic backward pass must match.
    #[test]
    fn backward_matches_finite_differences() {
        let spec = ModelSpec {
            input: 5,
            layers: vec![
                LayerSpec {
                    units: 7,
                    activation: Activation::Relu,
                },
                LayerSpec {
                    units: 4,
                    activation: Activation::Relu,
                },
                LayerSpec {
                    units: 3,
                    activation: Activation::None,
                },
            ],
        };
        let mut rng = SplitMix64::new(3);
        let mut params = spec.init_params(11);
        for p in params.iter_mut() {
            *p += 0.05 * rng.normal() as f32; // non-zero biases too
        }
        let rows = 6;
        let x: Vec<f32> = (0..rows * 5).map(|_| rng.normal() as f32).collect();
        let labels: Vec<u32> = (0..rows).map(|r| (r % 3) as u32).collect();
        let out = forward_backward(&spec, &params, &x, &labels).unwrap();
        let loss_at = |p: &[f32]| {
            let acts = forward(&spec, p, &x, rows);
            softmax_xent(&acts[2], &labels, 3, None).0 / rows as f64
        };
        let h = 1e-3f32;
        let mut worst = 0.0f64;
        for i in 0..params.len() {
            let mut plus = params.clone();
            plus[i] += h;
            let mut minus = params.clone();
            minus[i] -= h;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64);
            worst = worst.max((numeric - out.grad[i] as f64).abs());
        }
        assert!(worst < 2e-3, "max |numeric - analytic| = {worst}");
    }

    #[test]
    fn softmax_is_stable_for_huge_logits() {
        let logits = [1000.0f32, 0.0, -1000.0, 1e30, 1e30, 0.0];
        let mut d = [0.0f32; 6];
        let (loss, correct) = softmax_xent(&logits, &[0, 1], 3, Some(&mut d));
        assert!(loss.is_finite() && d.iter().all(|v| v.is_finite()));
        assert_eq!(
            correct, 1,
            "ties take the first arg-max, so row 1 predicts class 0"
        );
    }
}
