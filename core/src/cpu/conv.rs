//! conv2d on the CPU backend: im2col around [`super::sgemm`], a group of samples per GEMM.
//!
//! For a group of `g` samples, `col` is `[in_c·k², g·out_h·out_w]`: row `(ci·k + ky)·k + kx`, column
//! `s·out_hw + oy·out_w + ox` holds `x[s, ci, oy·stride + ky − pad, ox·stride + kx − pad]` (0 in the padding).
//! Then forward is `Y = W·col` (`W` `[out_c, in_c·k²]` as stored), the weight gradient `dW += dY·colᵀ` and the input
//! gradient `dcol = Wᵀ·dY`, scattered back by col2im. `Y`/`dY` are `[out_c, g·out_hw]`, permuted from and to the
//! NCHW batch. Same math as [`crate::reference::conv`], in float32 GEMM order.

use super::sgemm;
use crate::reference::MatmulForm;
use crate::spec::Conv2dDims;

/// Most floats one im2col buffer may hold (16 MiB): bounds scratch memory on big evaluation chunks; a group is
/// never smaller than one sample.
pub(super) const COL_BUDGET: usize = 1 << 22;

/// Reusable scratch for the GEMM operands.
#[derive(Debug)]
pub(super) struct ConvScratch {
    col: Vec<f32>,
    /// `[out_c, g·out_hw]`: the forward output or the incoming gradient, channel-major across the group.
    y: Vec<f32>,
    /// Most floats in `col` ([`COL_BUDGET`]; tests lower it to split batches into several groups).
    budget: usize,
}

impl Default for ConvScratch {
    fn default() -> Self {
        Self::with_budget(COL_BUDGET)
    }
}

impl ConvScratch {
    pub(super) fn with_budget(budget: usize) -> Self {
        Self {
            col: Vec::new(),
            y: Vec::new(),
            budget,
        }
    }

    /// Samples per GEMM for these dimensions.
    fn group(&self, d: &Conv2dDims) -> usize {
        (self.budget / (d.patch_len() * d.out_h * d.out_w).max(1)).max(1)
    }
}

/// Fills `col` for samples `x` (`g` of them, NCHW).
fn im2col(d: &Conv2dDims, g: usize, x: &[f32], col: &mut Vec<f32>) {
    let hw = d.out_h * d.out_w;
    let k = d.kernel;
    col.clear();
    col.resize(d.patch_len() * g * hw, 0.0);
    for ci in 0..d.in_c {
        for ky in 0..k {
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                for s in 0..g {
                    let plane = &x[(s * d.in_c + ci) * d.in_h * d.in_w..][..d.in_h * d.in_w];
                    let out = &mut col[row * g * hw + s * hw..][..hw];
                    for oy in 0..d.out_h {
                        let Some(iy) = (oy * d.stride + ky).checked_sub(d.padding) else {
                            continue;
                        };
                        if iy >= d.in_h {
                            continue;
                        }
                        let src = &plane[iy * d.in_w..][..d.in_w];
                        let dst = &mut out[oy * d.out_w..][..d.out_w];
                        for (ox, o) in dst.iter_mut().enumerate() {
                            if let Some(ix) = (ox * d.stride + kx).checked_sub(d.padding)
                                && ix < d.in_w
                            {
                                *o = src[ix];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds `dcol` back into `dx` (`g` samples, NCHW; must start zeroed): the transpose of [`im2col`].
fn col2im(d: &Conv2dDims, g: usize, dcol: &[f32], dx: &mut [f32]) {
    let hw = d.out_h * d.out_w;
    let k = d.kernel;
    for ci in 0..d.in_c {
        for ky in 0..k {
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                for s in 0..g {
                    let plane = &mut dx[(s * d.in_c + ci) * d.in_h * d.in_w..][..d.in_h * d.in_w];
                    let src = &dcol[row * g * hw + s * hw..][..hw];
                    for oy in 0..d.out_h {
                        let Some(iy) = (oy * d.stride + ky).checked_sub(d.padding) else {
                            continue;
                        };
                        if iy >= d.in_h {
                            continue;
                        }
                        let dst = &mut plane[iy * d.in_w..][..d.in_w];
                        for (ox, v) in src[oy * d.out_w..][..d.out_w].iter().enumerate() {
                            if let Some(ix) = (ox * d.stride + kx).checked_sub(d.padding)
                                && ix < d.in_w
                            {
                                dst[ix] += *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv2d(x)` over `batch` samples (layouts as [`crate::reference::conv2d_forward`]).
pub(super) fn forward(
    d: &Conv2dDims,
    batch: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
    scratch: &mut ConvScratch,
) {
    let hw = d.out_h * d.out_w;
    let g_max = scratch.group(d);
    let mut n0 = 0;
    while n0 < batch {
        let g = g_max.min(batch - n0);
        im2col(
            d,
            g,
            &x[n0 * d.in_len()..(n0 + g) * d.in_len()],
            &mut scratch.col,
        );
        scratch.y.resize(d.out_c * g * hw, 0.0);
        sgemm(
            MatmulForm::AB,
            d.out_c,
            d.patch_len(),
            g * hw,
            w,
            &scratch.col,
            0.0,
            &mut scratch.y,
        );
        for s in 0..g {
            for co in 0..d.out_c {
                let src = &scratch.y[co * g * hw + s * hw..][..hw];
                let dst = &mut y[(n0 + s) * d.out_len() + co * hw..][..hw];
                for (o, v) in dst.iter_mut().zip(src) {
                    *o = *v + b[co];
                }
            }
        }
        n0 += g;
    }
}

/// Weight and bias gradients (overwritten) and, when `dx` is given, the input gradient (overwritten).
#[allow(clippy::too_many_arguments)] // forward operands, incoming gradient, three outputs, scratch
pub(super) fn backward(
    d: &Conv2dDims,
    batch: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    mut dx: Option<&mut [f32]>,
    scratch: &mut ConvScratch,
) {
    let hw = d.out_h * d.out_w;
    let g_max = scratch.group(d);
    db.fill(0.0);
    for n in 0..batch {
        for (co, acc) in db.iter_mut().enumerate() {
            *acc += dy[n * d.out_len() + co * hw..][..hw].iter().sum::<f32>();
        }
    }
    if let Some(dx) = dx.as_deref_mut() {
        dx.fill(0.0);
    }
    let mut n0 = 0;
    while n0 < batch {
        let g = g_max.min(batch - n0);
        // dY permuted to [out_c, g·hw].
        scratch.y.resize(d.out_c * g * hw, 0.0);
        for s in 0..g {
            for co in 0..d.out_c {
                scratch.y[co * g * hw + s * hw..][..hw]
                    .copy_from_slice(&dy[(n0 + s) * d.out_len() + co * hw..][..hw]);
            }
        }
        im2col(
            d,
            g,
            &x[n0 * d.in_len()..(n0 + g) * d.in_len()],
            &mut scratch.col,
        );
        let beta = if n0 == 0 { 0.0 } else { 1.0 };
        sgemm(
            MatmulForm::ABt,
            d.out_c,
            g * hw,
            d.patch_len(),
            &scratch.y,
            &scratch.col,
            beta,
            dw,
        );
        if let Some(dx) = dx.as_deref_mut() {
            // The im2col of x is no longer needed: reuse its buffer for dcol.
            sgemm(
                MatmulForm::AtB,
                d.patch_len(),
                d.out_c,
                g * hw,
                w,
                &scratch.y,
                0.0,
                &mut scratch.col,
            );
            col2im(
                d,
                g,
                &scratch.col,
                &mut dx[n0 * d.in_len()..(n0 + g) * d.in_len()],
            );
        }
        n0 += g;
    }
}
