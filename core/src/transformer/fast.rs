//! The fast CPU transformer kernels: every matmul on matrixmultiply's SGEMM ([`crate::cpu::sgemm`]; both cores
//! natively, SIMD128 in wasm32), and the attention core head by head: gather `Q`, `K`, `V` `[T, D]`, then
//! `S = Q·Kᵀ`, a masked softmax, `Y = P·V` (and the four matmuls of its backward pass) as small SGEMMs.
//!
//! Masked entries of `P` are exact zeros, so the full `T × T` products give the causal result; the wasted upper
//! triangle costs less than the strided loops it replaces at the contexts we train (64–128).

use super::{AttnDims, Kernels};
use crate::cpu::sgemm;
use crate::reference::MatmulForm;

/// The fast kernels (stateless; scratch is allocated per call, small next to the activations).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fast;

/// Copies head `h`'s `part` (0 = q, 1 = k, 2 = v) of sequence `b` out of `qkv [B·T, 3C]` into `out [T, D]`.
fn gather(dims: AttnDims, qkv: &[f32], b: usize, part: usize, h: usize, out: &mut [f32]) {
    let (t, hd, c) = (dims.seq, dims.head_width(), dims.width);
    for i in 0..t {
        let src = (b * t + i) * 3 * c + part * c + h * hd;
        out[i * hd..(i + 1) * hd].copy_from_slice(&qkv[src..src + hd]);
    }
}

/// Writes `src [T, D]` into columns `col..col + D` of rows `b·T..` of `dst`, whose rows are `stride` wide.
fn scatter(dims: AttnDims, src: &[f32], b: usize, col: usize, stride: usize, dst: &mut [f32]) {
    let (t, hd) = (dims.seq, dims.head_width());
    for i in 0..t {
        let at = (b * t + i) * stride + col;
        dst[at..at + hd].copy_from_slice(&src[i * hd..(i + 1) * hd]);
    }
}

/// `tanh(u) = 1 − 2 / (1 + e^{2u})` in f32: one `exp` instead of libm's f64 `tanh` (which took a third of a
/// training step); exact at both tails (`e^{2u}` overflowing to ∞ gives 1, underflowing to 0 gives −1).
fn tanh_f32(u: f32) -> f32 {
    1.0 - 2.0 / (1.0 + (2.0 * u).exp())
}

const GELU_C: f32 = crate::reference::act::GELU_C as f32;
const GELU_A: f32 = crate::reference::act::GELU_A as f32;

impl Kernels for Fast {
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + tanh_f32(GELU_C * (v + GELU_A * v * v * v)));
        }
    }

    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let t = tanh_f32(GELU_C * (v + GELU_A * v * v * v));
            *o = g
                * (0.5 * (1.0 + t)
                    + 0.5 * v * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * v * v));
        }
    }

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
        sgemm(form, m, k, n, a, b, if accumulate { 1.0 } else { 0.0 }, c);
    }

    fn attention_forward(&self, dims: AttnDims, qkv: &[f32], probs: &mut [f32], y: &mut [f32]) {
        let (t, hd, c) = (dims.seq, dims.head_width(), dims.width);
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut q, mut k, mut v, mut yh) = (
            vec![0.0; t * hd],
            vec![0.0; t * hd],
            vec![0.0; t * hd],
            vec![0.0; t * hd],
        );
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                gather(dims, qkv, b, 0, h, &mut q);
                gather(dims, qkv, b, 1, h, &mut k);
                gather(dims, qkv, b, 2, h, &mut v);
                let p = &mut probs[(b * dims.heads + h) * t * t..(b * dims.heads + h + 1) * t * t];
                sgemm(MatmulForm::ABt, t, hd, t, &q, &k, 0.0, p);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let max = row[..=i]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, s| m.max(*s * scale));
                    let mut sum = 0.0f32;
                    for s in &mut row[..=i] {
                        *s = (*s * scale - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    row[..=i].iter_mut().for_each(|s| *s *= inv);
                    row[i + 1..].fill(0.0);
                }
                sgemm(MatmulForm::AB, t, t, hd, p, &v, 0.0, &mut yh);
                scatter(dims, &yh, b, h * hd, c, y);
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
        let scale = 1.0 / (hd as f32).sqrt();
        let buf = || vec![0.0f32; t * hd];
        let (mut q, mut k, mut v, mut dyh) = (buf(), buf(), buf(), buf());
        let (mut dq, mut dk, mut dv) = (buf(), buf(), buf());
        let mut ds = vec![0.0f32; t * t];
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                gather(dims, qkv, b, 0, h, &mut q);
                gather(dims, qkv, b, 1, h, &mut k);
                gather(dims, qkv, b, 2, h, &mut v);
                for i in 0..t {
                    let src = (b * t + i) * c + h * hd;
                    dyh[i * hd..(i + 1) * hd].copy_from_slice(&dy[src..src + hd]);
                }
                let p = &probs[(b * dims.heads + h) * t * t..(b * dims.heads + h + 1) * t * t];
                // dP = dY·Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)), scaled by 1/√D for the q·k product.
                sgemm(MatmulForm::ABt, t, hd, t, &dyh, &v, 0.0, &mut ds);
                for (i, (drow, prow)) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                    let dot: f32 = drow[..=i].iter().zip(&prow[..=i]).map(|(d, p)| d * p).sum();
                    for (d, p) in drow[..=i].iter_mut().zip(&prow[..=i]) {
                        *d = p * (*d - dot) * scale;
                    }
                    drow[i + 1..].fill(0.0);
                }
                sgemm(MatmulForm::AB, t, t, hd, &ds, &k, 0.0, &mut dq);
                sgemm(MatmulForm::AtB, t, t, hd, &ds, &q, 0.0, &mut dk);
                sgemm(MatmulForm::AtB, t, t, hd, p, &dyh, 0.0, &mut dv);
                scatter(dims, &dq, b, h * hd, 3 * c, dqkv);
                scatter(dims, &dk, b, c + h * hd, 3 * c, dqkv);
                scatter(dims, &dv, b, 2 * c + h * hd, 3 * c, dqkv);
            }
        }
    }
}
