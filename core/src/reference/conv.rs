//! Plain-loop conv2d: forward, the input gradient and the weight + bias gradient (the oracle for im2col and the
//! WGSL kernels).
//!
//! Layouts (batch-major, NCHW per sample; see [`Conv2dDims`]): `x` `[batch, in_c, in_h, in_w]`, `y` and `dy`
//! `[batch, out_c, out_h, out_w]`, `w` `[out_c, in_c, k, k]`, `b` `[out_c]`. Every output slice is overwritten;
//! sums are accumulated in f64.

use crate::spec::Conv2dDims;

/// The input pixel `(iy, ix)` a kernel tap reads for output `(oy, ox)`, or `None` in the zero padding.
fn tap(d: &Conv2dDims, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let iy = (oy * d.stride + ky).checked_sub(d.padding)?;
    let ix = (ox * d.stride + kx).checked_sub(d.padding)?;
    (iy < d.in_h && ix < d.in_w).then_some((iy, ix))
}

fn check(d: &Conv2dDims, batch: usize, x: usize, y: usize, w: usize) {
    assert!(
        x == batch * d.in_len() && y == batch * d.out_len() && w == d.weight_len(),
        "conv2d operand lengths do not match {d:?} × {batch}"
    );
}

/// `y[n, co, oy, ox] = b[co] + Σ_{ci, ky, kx} w[co, ci, ky, kx] · x[n, ci, oy·s + ky − p, ox·s + kx − p]`.
pub fn conv2d_forward(
    d: &Conv2dDims,
    batch: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    check(d, batch, x.len(), y.len(), w.len());
    let k = d.kernel;
    for n in 0..batch {
        let xs = &x[n * d.in_len()..(n + 1) * d.in_len()];
        for co in 0..d.out_c {
            for oy in 0..d.out_h {
                for ox in 0..d.out_w {
                    let mut acc = b[co] as f64;
                    for ci in 0..d.in_c {
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((iy, ix)) = tap(d, oy, ox, ky, kx) {
                                    acc += w[((co * d.in_c + ci) * k + ky) * k + kx] as f64
                                        * xs[(ci * d.in_h + iy) * d.in_w + ix] as f64;
                                }
                            }
                        }
                    }
                    y[n * d.out_len() + (co * d.out_h + oy) * d.out_w + ox] = acc as f32;
                }
            }
        }
    }
}

/// `dx[n, ci, iy, ix] = Σ_{co, ky, kx} w[co, ci, ky, kx] · dy[n, co, oy, ox]` over the outputs whose tap
/// `(ky, kx)` reads `(iy, ix)`; padding positions get no gradient.
pub fn conv2d_backward_input(d: &Conv2dDims, batch: usize, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    check(d, batch, dx.len(), dy.len(), w.len());
    let k = d.kernel;
    let mut acc = vec![0.0f64; d.in_len()];
    for n in 0..batch {
        acc.fill(0.0);
        let dys = &dy[n * d.out_len()..(n + 1) * d.out_len()];
        for co in 0..d.out_c {
            for oy in 0..d.out_h {
                for ox in 0..d.out_w {
                    let g = dys[(co * d.out_h + oy) * d.out_w + ox] as f64;
                    for ci in 0..d.in_c {
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((iy, ix)) = tap(d, oy, ox, ky, kx) {
                                    acc[(ci * d.in_h + iy) * d.in_w + ix] +=
                                        w[((co * d.in_c + ci) * k + ky) * k + kx] as f64 * g;
                                }
                            }
                        }
                    }
                }
            }
        }
        for (o, a) in dx[n * d.in_len()..(n + 1) * d.in_len()]
            .iter_mut()
            .zip(&acc)
        {
            *o = *a as f32;
        }
    }
}

/// `dw[co, ci, ky, kx] = Σ_{n, oy, ox} dy[n, co, oy, ox] · x[n, ci, oy·s + ky − p, ox·s + kx − p]` and
/// `db[co] = Σ_{n, oy, ox} dy[n, co, oy, ox]`.
pub fn conv2d_backward_weight(
    d: &Conv2dDims,
    batch: usize,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    check(d, batch, x.len(), dy.len(), dw.len());
    assert_eq!(db.len(), d.out_c, "conv2d bias gradient length");
    let k = d.kernel;
    let mut acc = vec![0.0f64; d.weight_len()];
    let mut bacc = vec![0.0f64; d.out_c];
    for n in 0..batch {
        let xs = &x[n * d.in_len()..(n + 1) * d.in_len()];
        let dys = &dy[n * d.out_len()..(n + 1) * d.out_len()];
        for co in 0..d.out_c {
            for oy in 0..d.out_h {
                for ox in 0..d.out_w {
                    let g = dys[(co * d.out_h + oy) * d.out_w + ox] as f64;
                    bacc[co] += g;
                    for ci in 0..d.in_c {
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((iy, ix)) = tap(d, oy, ox, ky, kx) {
                                    acc[((co * d.in_c + ci) * k + ky) * k + kx] +=
                                        g * xs[(ci * d.in_h + iy) * d.in_w + ix] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    for (o, a) in dw.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
    for (o, a) in db.iter_mut().zip(&bacc) {
        *o = *a as f32;
    }
}
