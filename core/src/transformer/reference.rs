//! Plain-loop transformer kernels: the oracle. Every sum runs in f64 over the obvious index ranges; the causal
//! mask is the loop bound `j ≤ i`. Deliberately slow; never on a hot path.

use super::{AttnDims, Kernels};
use crate::reference::{MatmulForm, matmul};

/// The reference kernels (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

/// Index of `q` (`part = 0`), `k` (1) or `v` (2) of head `h`, element `d`, at row `n` of `qkv [N, 3C]`.
fn qkv_at(dims: AttnDims, n: usize, part: usize, h: usize, d: usize) -> usize {
    n * 3 * dims.width + part * dims.width + h * dims.head_width() + d
}

impl Kernels for Reference {
    fn matmul(
        &self,
        form: MatmulForm,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        accumulate: bool,
        c: &mut [f32],
    ) {
        if accumulate {
            let mut t = vec![0.0f32; m * n];
            matmul(form, m, k, n, a, b, &mut t);
            for (ci, ti) in c.iter_mut().zip(t) {
                *ci += ti;
            }
        } else {
            matmul(form, m, k, n, a, b, c);
        }
    }

    fn attention_forward(&self, dims: AttnDims, qkv: &[f32], probs: &mut [f32], y: &mut [f32]) {
        let (t, hd) = (dims.seq, dims.head_width());
        let scale = 1.0 / (hd as f64).sqrt();
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                for i in 0..t {
                    let qi = b * t + i;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = b * t + j;
                            (0..hd)
                                .map(|d| {
                                    qkv[qkv_at(dims, qi, 0, h, d)] as f64
                                        * qkv[qkv_at(dims, kj, 1, h, d)] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    let row = ((b * dims.heads + h) * t + i) * t;
                    for j in 0..t {
                        probs[row + j] = if j <= i { (exps[j] / sum) as f32 } else { 0.0 };
                    }
                    for d in 0..hd {
                        let acc: f64 = (0..=i)
                            .map(|j| exps[j] / sum * qkv[qkv_at(dims, b * t + j, 2, h, d)] as f64)
                            .sum();
                        y[qi * dims.width + h * hd + d] = acc as f32;
                    }
                }
            }
        }
    }

    fn attention_backward(
        &self,
        dims: AttnDims,
        qkv: &[f32],
        probs: &[f32],
        dy: &[f32],
        dqkv: &mut [f32],
    ) {
        let (t, hd, c) = (dims.seq, dims.head_width(), dims.width);
        let scale = 1.0 / (hd as f64).sqrt();
        dqkv.fill(0.0);
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                let p = |i: usize, j: usize| probs[((b * dims.heads + h) * t + i) * t + j] as f64;
                let dyv = |i: usize, d: usize| dy[(b * t + i) * c + h * hd + d] as f64;
                // ds_ij = p_ij·(dp_ij − Σ_k p_ik·dp_ik) with dp_ij = dy_i·v_j, for j ≤ i.
                let mut ds = vec![0.0f64; t * t];
                for i in 0..t {
                    let dp: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| dyv(i, d) * qkv[qkv_at(dims, b * t + j, 2, h, d)] as f64)
                                .sum()
                        })
                        .collect();
                    let dot: f64 = (0..=i).map(|j| p(i, j) * dp[j]).sum();
                    for j in 0..=i {
                        ds[i * t + j] = p(i, j) * (dp[j] - dot);
                    }
                }
                for i in 0..t {
                    for d in 0..hd {
                        let dq: f64 = (0..=i)
                            .map(|j| ds[i * t + j] * qkv[qkv_at(dims, b * t + j, 1, h, d)] as f64)
                            .sum();
                        dqkv[qkv_at(dims, b * t + i, 0, h, d)] = (dq * scale) as f32;
                    }
                }
                for j in 0..t {
                    for d in 0..hd {
                        let dk: f64 = (j..t)
                            .map(|i| ds[i * t + j] * qkv[qkv_at(dims, b * t + i, 0, h, d)] as f64)
                            .sum();
                        let dv: f64 = (j..t).map(|i| p(i, j) * dyv(i, d)).sum();
                        dqkv[qkv_at(dims, b * t + j, 1, h, d)] = (dk * scale) as f32;
                        dqkv[qkv_at(dims, b * t + j, 2, h, d)] = dv as f32;
                    }
                }
            }
        }
    }
}
