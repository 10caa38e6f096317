//! Plain-loop max and average pooling, forward and backward.
//!
//! Layouts (see [`Pool2dDims`]): `x` and `dx` `[batch, channels, in_h, in_w]`, `y` and `dy`
//! `[batch, channels, out_h, out_w]`. Outputs are overwritten. Max pooling ties: the **first** maximum in the
//! window's row-major order (top row first, left to right) wins and alone receives the gradient; where windows
//! overlap (stride < kernel) an input's gradients from every window are summed.

use crate::spec::Pool2dDims;

fn check(d: &Pool2dDims, batch: usize, x: usize, y: usize) {
    assert!(
        x == batch * d.in_len() && y == batch * d.out_len(),
        "pooling operand lengths do not match {d:?} × {batch}"
    );
}

/// Index (within one channel plane) of the first maximum of window `(oy, ox)`.
fn argmax(d: &Pool2dDims, plane: &[f32], oy: usize, ox: usize) -> usize {
    let mut best = (oy * d.stride) * d.in_w + ox * d.stride;
    for ky in 0..d.kernel {
        for kx in 0..d.kernel {
            let i = (oy * d.stride + ky) * d.in_w + ox * d.stride + kx;
            if plane[i] > plane[best] {
                best = i;
            }
        }
    }
    best
}

/// `y[n, c, oy, ox] = max_{ky, kx} x[n, c, oy·s + ky, ox·s + kx]`.
pub fn max_pool2d_forward(d: &Pool2dDims, batch: usize, x: &[f32], y: &mut [f32]) {
    check(d, batch, x.len(), y.len());
    let (plane, out) = (d.in_h * d.in_w, d.out_h * d.out_w);
    for nc in 0..batch * d.channels {
        let p = &x[nc * plane..(nc + 1) * plane];
        for oy in 0..d.out_h {
            for ox in 0..d.out_w {
                y[nc * out + oy * d.out_w + ox] = p[argmax(d, p, oy, ox)];
            }
        }
    }
}

/// `dx[n, c, iy, ix] = Σ dy[n, c, oy, ox]` over the windows whose first maximum is `(iy, ix)`; needs the
/// forward input `x` (it recomputes the arg-max rather than storing indices).
pub fn max_pool2d_backward(d: &Pool2dDims, batch: usize, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    check(d, batch, x.len(), dy.len());
    assert_eq!(dx.len(), x.len(), "max_pool2d dx length");
    dx.fill(0.0);
    let (plane, out) = (d.in_h * d.in_w, d.out_h * d.out_w);
    for nc in 0..batch * d.channels {
        let p = &x[nc * plane..(nc + 1) * plane];
        for oy in 0..d.out_h {
            for ox in 0..d.out_w {
                dx[nc * plane + argmax(d, p, oy, ox)] += dy[nc * out + oy * d.out_w + ox];
            }
        }
    }
}

/// `y[n, c, oy, ox] = (1 / k²) · Σ_{ky, kx} x[n, c, oy·s + ky, ox·s + kx]`.
pub fn avg_pool2d_forward(d: &Pool2dDims, batch: usize, x: &[f32], y: &mut [f32]) {
    check(d, batch, x.len(), y.len());
    let (plane, out) = (d.in_h * d.in_w, d.out_h * d.out_w);
    let area = (d.kernel * d.kernel) as f64;
    for nc in 0..batch * d.channels {
        let p = &x[nc * plane..(nc + 1) * plane];
        for oy in 0..d.out_h {
            for ox in 0..d.out_w {
                let mut acc = 0.0f64;
                for ky in 0..d.kernel {
                    for kx in 0..d.kernel {
                        acc += p[(oy * d.stride + ky) * d.in_w + ox * d.stride + kx] as f64;
                    }
                }
                y[nc * out + oy * d.out_w + ox] = (acc / area) as f32;
            }
        }
    }
}

/// `dx[n, c, iy, ix] = (1 / k²) · Σ dy[n, c, oy, ox]` over the windows covering `(iy, ix)` (0 for inputs no
/// window covers, e.g. the last column when `(in − k)` is not a multiple of the stride).
pub fn avg_pool2d_backward(d: &Pool2dDims, batch: usize, dy: &[f32], dx: &mut [f32]) {
    check(d, batch, dx.len(), dy.len());
    let (plane, out) = (d.in_h * d.in_w, d.out_h * d.out_w);
    let area = (d.kernel * d.kernel) as f64;
    let mut acc = vec![0.0f64; plane];
    for nc in 0..batch * d.channels {
        acc.fill(0.0);
        for oy in 0..d.out_h {
            for ox in 0..d.out_w {
                let g = dy[nc * out + oy * d.out_w + ox] as f64 / area;
                for ky in 0..d.kernel {
                    for kx in 0..d.kernel {
                        acc[(oy * d.stride + ky) * d.in_w + ox * d.stride + kx] += g;
                    }
                }
            }
        }
        for (o, a) in dx[nc * plane..(nc + 1) * plane].iter_mut().zip(&acc) {
            *o = *a as f32;
        }
    }
}
