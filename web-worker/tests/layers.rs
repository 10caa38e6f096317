//! The CNN layers' kernels against the plain-loop reference (`starling_core::reference`), one layer at a time, on
//! odd shapes: channels 1, 3 and 5, sizes 1, 7 and 28, stride 2, padding, overlapping pooling windows and ties.
//! Each helper in `starling_worker::gpu::ops` records exactly the dispatches the engine records for that layer.
//! GPU tests run on whatever adapter wgpu finds (lavapipe in CI) and FAIL when there is none.

use std::sync::OnceLock;

use starling_core::reference;
use starling_core::rng::SplitMix64;
use starling_core::spec::{Conv2dDims, GroupNormDims, Pool2dDims};
use starling_worker::gpu::{
    ConvLayer, ConvShape, ElementwiseAct, GpuContext, Kernels, NormShape, PoolKind, PoolShape, ops,
};

/// One device and one set of pipelines (each built on first use) for the whole binary; a missing adapter is a
/// failure, not a skip (CI installs lavapipe).
fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| Kernels::new(ctx()))
}

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let ctx = pollster::block_on(GpuContext::new())
            .expect("no WebGPU adapter: install Mesa lavapipe (mesa-vulkan-drivers)");
        eprintln!("adapter: {}", ctx.summary().label());
        ctx
    })
}

fn randn(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// Every element within `terms·ε·bound + 1e-6`, where `bound` is the same sum over absolute values (the
/// standard bound for an f32 sum of `terms` products in any order; the reference accumulates in f64).
#[track_caller]
fn assert_within(what: &str, gpu: &[f32], want: &[f32], bound: &[f32], terms: usize) {
    assert_eq!(gpu.len(), want.len(), "{what}: length");
    for (i, ((g, w), b)) in gpu.iter().zip(want).zip(bound).enumerate() {
        let tol = terms as f64 * f32::EPSILON as f64 * *b as f64 + 1e-6;
        assert!(
            ((g - w) as f64).abs() <= tol,
            "{what} at {i}: gpu {g} vs reference {w} (tol {tol:e})"
        );
    }
}

/// `(n, c, h, w, out_c, kernel, stride, padding)`: 1×1 images, 7×7 with stride 2 and padding, 28×28 with
/// "same" padding, kernels as large as the padded image, and channels 1, 3, 5.
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize);
const CONVS: [ConvCase; 8] = [
    (2, 1, 1, 1, 3, 1, 1, 0),
    (3, 3, 1, 1, 5, 3, 1, 1),
    (3, 3, 7, 7, 5, 3, 2, 1),
    (2, 5, 7, 7, 1, 3, 1, 0),
    (2, 1, 28, 28, 5, 5, 1, 2),
    (2, 5, 28, 28, 3, 5, 2, 0),
    (1, 3, 7, 7, 3, 7, 2, 3),
    (5, 1, 7, 7, 16, 5, 1, 0),
];

fn conv_dims(c: usize, h: usize, w: usize, oc: usize, k: usize, s: usize, p: usize) -> Conv2dDims {
    Conv2dDims {
        in_c: c,
        in_h: h,
        in_w: w,
        out_c: oc,
        kernel: k,
        stride: s,
        padding: p,
        out_h: (h + 2 * p - k) / s + 1,
        out_w: (w + 2 * p - k) / s + 1,
    }
}

#[test]
fn conv2d_forward_and_backward_match_reference() {
    let mut rng = SplitMix64::new(21);
    for (n, c, h, w, oc, k, s, p) in CONVS {
        let d = conv_dims(c, h, w, oc, k, s, p);
        // The weight sits at an odd offset inside a larger parameter buffer, as layers do.
        let off = 7;
        let mut params = randn(&mut rng, off + d.weight_len() + oc + 3);
        let (wo, bo) = (off, off + d.weight_len());
        let layer = ConvLayer {
            shape: ConvShape {
                n,
                c,
                h,
                w,
                kh: k,
                kw: k,
                stride: s,
                pad: p,
            },
            out_channels: oc,
            weight: wo,
            bias: bo,
        };
        assert_eq!((layer.shape.oh(), layer.shape.ow()), (d.out_h, d.out_w));
        let x = randn(&mut rng, n * d.in_len());
        let shape = format!("conv n{n} c{c} {h}x{w} oc{oc} k{k} s{s} p{p}");

        let gpu = pollster::block_on(ops::conv2d_forward(kernels(), &layer, false, &x, &params))
            .expect("gpu conv forward");
        let mut want = vec![0.0; n * d.out_len()];
        let (wt, b) = (params[wo..bo].to_vec(), params[bo..bo + oc].to_vec());
        reference::conv2d_forward(&d, n, &x, &wt, &b, &mut want);
        let mut bound = vec![0.0; want.len()];
        reference::conv2d_forward(&d, n, &abs(&x), &abs(&wt), &abs(&b), &mut bound);
        assert_within(
            &format!("{shape} forward"),
            &gpu,
            &want,
            &bound,
            d.patch_len() + 1,
        );
        // The fused ReLU is exactly max(·, 0) of the same values.
        let relu = pollster::block_on(ops::conv2d_forward(kernels(), &layer, true, &x, &params))
            .expect("gpu conv forward + relu");
        let clipped: Vec<f32> = gpu.iter().map(|v| v.max(0.0)).collect();
        assert_eq!(relu, clipped, "{shape} fused relu");

        let dy = randn(&mut rng, n * d.out_len());
        params[bo + oc..].fill(0.5); // untouched slots must come back as 0 in the gradient buffer
        let (grad, dx) =
            pollster::block_on(ops::conv2d_backward(kernels(), &layer, &x, &dy, &params))
                .expect("gpu conv backward");
        let (mut dw, mut db) = (vec![0.0; d.weight_len()], vec![0.0; oc]);
        reference::conv2d_backward_weight(&d, n, &x, &dy, &mut dw, &mut db);
        let (mut dw_bound, mut db_bound) = (vec![0.0; d.weight_len()], vec![0.0; oc]);
        reference::conv2d_backward_weight(&d, n, &abs(&x), &abs(&dy), &mut dw_bound, &mut db_bound);
        let terms = n * d.out_h * d.out_w;
        assert_within(&format!("{shape} dW"), &grad[wo..bo], &dw, &dw_bound, terms);
        assert_within(
            &format!("{shape} db"),
            &grad[bo..bo + oc],
            &db,
            &db_bound,
            terms,
        );
        assert!(
            grad[..wo].iter().chain(&grad[bo + oc..]).all(|g| *g == 0.0),
            "{shape}: only the layer's slots are written"
        );
        let mut want_dx = vec![0.0; x.len()];
        reference::conv2d_backward_input(&d, n, &dy, &wt, &mut want_dx);
        let mut dx_bound = vec![0.0; x.len()];
        reference::conv2d_backward_input(&d, n, &abs(&dy), &abs(&wt), &mut dx_bound);
        assert_within(&format!("{shape} dx"), &dx, &want_dx, &dx_bound, oc * k * k);
    }
}

/// `(n, c, h, w, kernel, stride)`: 1×1, 7×7 with a ragged last window, 28×28, overlapping windows (stride 1 and
/// 3×3 at stride 2), channels 1, 3, 5.
const POOLS: [(usize, usize, usize, usize, usize, usize); 6] = [
    (2, 1, 1, 1, 1, 1),
    (3, 3, 7, 7, 2, 2),
    (2, 5, 28, 28, 2, 2),
    (2, 3, 7, 7, 3, 2),
    (1, 5, 7, 7, 3, 1),
    (2, 1, 28, 28, 7, 3),
];

#[test]
fn pooling_forward_and_backward_match_reference() {
    let mut rng = SplitMix64::new(22);
    for (n, c, h, w, k, s) in POOLS {
        let d = Pool2dDims {
            channels: c,
            in_h: h,
            in_w: w,
            kernel: k,
            stride: s,
            out_h: (h - k) / s + 1,
            out_w: (w - k) / s + 1,
        };
        let shape = PoolShape {
            n,
            c,
            h,
            w,
            kh: k,
            kw: k,
            stride: s,
            pad: 0,
        };
        let what = format!("pool n{n} c{c} {h}x{w} k{k} s{s}");
        // Values on a coarse grid, so windows hold ties: the first maximum must win on both sides.
        let x: Vec<f32> = (0..n * d.in_len())
            .map(|_| rng.below(5) as f32 - 2.0)
            .collect();
        let dy = randn(&mut rng, n * d.out_len());

        let (y, idx) = pollster::block_on(ops::pool_forward(kernels(), &shape, PoolKind::Max, &x))
            .expect("gpu max pool");
        let mut want = vec![0.0; n * d.out_len()];
        reference::max_pool2d_forward(&d, n, &x, &mut want);
        assert_eq!(y, want, "{what} max forward");
        let dx = pollster::block_on(ops::pool_backward(
            kernels(),
            &shape,
            PoolKind::Max,
            &dy,
            &idx,
        ))
        .expect("gpu max pool backward");
        let mut want_dx = vec![0.0; x.len()];
        reference::max_pool2d_backward(&d, n, &x, &dy, &mut want_dx);
        // A pixel collects at most ⌈k/s⌉² window gradients.
        let windows = k.div_ceil(s).pow(2);
        let mut bound = vec![0.0; x.len()];
        reference::max_pool2d_backward(&d, n, &x, &abs(&dy), &mut bound);
        assert_within(&format!("{what} max dx"), &dx, &want_dx, &bound, windows);

        let avg = PoolKind::Avg { count_pad: true };
        let x = randn(&mut rng, n * d.in_len());
        let (y, _) = pollster::block_on(ops::pool_forward(kernels(), &shape, avg, &x))
            .expect("gpu avg pool");
        reference::avg_pool2d_forward(&d, n, &x, &mut want);
        let mut bound = vec![0.0; want.len()];
        reference::avg_pool2d_forward(&d, n, &abs(&x), &mut bound);
        assert_within(&format!("{what} avg forward"), &y, &want, &bound, k * k + 1);
        let dx = pollster::block_on(ops::pool_backward(kernels(), &shape, avg, &dy, &idx))
            .expect("gpu avg pool backward");
        reference::avg_pool2d_backward(&d, n, &dy, &mut want_dx);
        let mut bound = vec![0.0; x.len()];
        reference::avg_pool2d_backward(&d, n, &abs(&dy), &mut bound);
        assert_within(
            &format!("{what} avg dx"),
            &dx,
            &want_dx,
            &bound,
            2 * windows,
        );
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Normalisation output is O(1) per element whatever the input scale, so the tolerances are absolute on y and
/// relative (L2) on the gradients: f32 mean and variance over up to 3,920 values sit ~1e-6 from f64's.
#[test]
fn layer_norm_matches_reference() {
    let mut rng = SplitMix64::new(23);
    for (rows, dim) in [(1, 1), (3, 7), (5, 784), (2, 3 * 7 * 7), (4, 300)] {
        let eps = 1e-5;
        let (gamma, beta) = (3, 3 + dim);
        let mut params = randn(&mut rng, 3 + 2 * dim + 2);
        params[beta..beta + dim].iter_mut().for_each(|b| *b *= 0.1);
        // An offset and a scale far from 0 and 1, where a one-pass variance would lose digits.
        let x: Vec<f32> = randn(&mut rng, rows * dim)
            .into_iter()
            .map(|v| 50.0 + 4.0 * v)
            .collect();
        let shape = NormShape::layer(rows, dim, eps, gamma, beta);
        let what = format!("layer_norm {rows}x{dim}");
        let (y, _) = pollster::block_on(ops::norm_forward(kernels(), &shape, &x, &params))
            .expect("gpu layer norm");
        let mut want = vec![0.0; x.len()];
        let (g, b) = (&params[gamma..beta], &params[beta..beta + dim]);
        reference::layer_norm_forward(&x, g, b, dim, eps, &mut want);
        for (i, (a, w)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} y at {i}: {a} vs {w}"
            );
        }
        let dy = randn(&mut rng, x.len());
        let (grad, dx) =
            pollster::block_on(ops::norm_backward(kernels(), &shape, &x, &dy, &params))
                .expect("gpu layer norm backward");
        let (mut want_dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
        reference::layer_norm_backward(&x, g, &dy, dim, eps, &mut want_dx, &mut dg, &mut db);
        check_norm_grads(
            &what,
            &grad[gamma..beta],
            &grad[beta..beta + dim],
            &dx,
            &dg,
            &db,
            &want_dx,
        );
    }
}

#[track_caller]
fn check_norm_grads(
    what: &str,
    gpu_dg: &[f32],
    gpu_db: &[f32],
    gpu_dx: &[f32],
    dg: &[f32],
    db: &[f32],
    dx: &[f32],
) {
    let (e_dg, e_db, e_dx) = (rel_l2(gpu_dg, dg), rel_l2(gpu_db, db), rel_l2(gpu_dx, dx));
    assert!(
        e_dg < 1e-4 && e_db < 1e-5 && (e_dx < 1e-4 || dx.iter().all(|v| v.abs() < 1e-6)),
        "{what}: rel L2 dgamma {e_dg:e}, dbeta {e_db:e}, dx {e_dx:e}"
    );
}

#[test]
fn group_norm_matches_reference() {
    let mut rng = SplitMix64::new(24);
    // (n, channels, hw, groups): 1×1 images, channels 3 and 5 in one group or one per channel, 28×28.
    for (n, c, hw, groups) in [
        (2, 1, 1, 1),
        (3, 3, 49, 3),
        (3, 3, 49, 1),
        (2, 5, 784, 5),
        (2, 6, 49, 2),
        (1, 5, 1, 5),
    ] {
        let eps = 1e-5;
        let d = GroupNormDims {
            channels: c,
            groups,
            hw,
        };
        let (gamma, beta) = (1, 1 + c);
        let params = randn(&mut rng, 1 + 2 * c);
        let x: Vec<f32> = randn(&mut rng, n * d.len())
            .into_iter()
            .map(|v| -3.0 + 2.0 * v)
            .collect();
        let shape = NormShape::group(n, c, hw, groups, eps, gamma, beta);
        let what = format!("group_norm n{n} c{c} hw{hw} g{groups}");
        let (y, _) = pollster::block_on(ops::norm_forward(kernels(), &shape, &x, &params))
            .expect("gpu group norm");
        let mut want = vec![0.0; x.len()];
        let (g, b) = (&params[gamma..beta], &params[beta..beta + c]);
        reference::group_norm_forward(&d, n, &x, g, b, eps, &mut want);
        for (i, (a, w)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} y at {i}: {a} vs {w}"
            );
        }
        let dy = randn(&mut rng, x.len());
        let (grad, dx) =
            pollster::block_on(ops::norm_backward(kernels(), &shape, &x, &dy, &params))
                .expect("gpu group norm backward");
        let (mut want_dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        reference::group_norm_backward(&d, n, &x, g, &dy, eps, &mut want_dx, &mut dg, &mut db);
        check_norm_grads(
            &what,
            &grad[gamma..beta],
            &grad[beta..beta + c],
            &dx,
            &dg,
            &db,
            &want_dx,
        );
    }
}

#[test]
fn relu_and_gelu_match_reference() {
    let mut rng = SplitMix64::new(25);
    let mut x: Vec<f32> = randn(&mut rng, 1000).into_iter().map(|v| 4.0 * v).collect();
    x.extend([
        0.0, -0.0, 1e-30, -1e-30, 10.0, -10.0, 30.0, -30.0, 1e4, -1e4,
    ]);
    let dy = randn(&mut rng, x.len());
    for (act, name) in [
        (ElementwiseAct::Relu, "relu"),
        (ElementwiseAct::Gelu, "gelu"),
    ] {
        let y = pollster::block_on(ops::act_forward(kernels(), act, &x)).expect("gpu act");
        let dx =
            pollster::block_on(ops::act_backward(kernels(), act, &x, &dy)).expect("gpu act grad");
        let (mut want, mut want_dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        match act {
            ElementwiseAct::Relu => {
                reference::relu_forward(&x, &mut want);
                reference::relu_backward(&x, &dy, &mut want_dx);
                // Tolerance: none, a max and a select are exact.
                assert_eq!((&y, &dx), (&want, &want_dx), "relu");
            }
            ElementwiseAct::Gelu => {
                reference::gelu_forward(&x, &mut want);
                reference::gelu_backward(&x, &dy, &mut want_dx);
                // Tolerance: exp on GPUs is accurate to a few ulp; a handful of f32 operations on top.
                for i in 0..x.len() {
                    let (tol_y, tol_d) = (
                        1e-6 + 1e-5 * want[i].abs(),
                        1e-6 + 1e-5 * (dy[i].abs() * 1.2),
                    );
                    assert!(
                        (y[i] - want[i]).abs() <= tol_y && (dx[i] - want_dx[i]).abs() <= tol_d,
                        "{name}({}) = {} vs {}, grad {} vs {}",
                        x[i],
                        y[i],
                        want[i],
                        dx[i],
                        want_dx[i]
                    );
                }
            }
        }
    }
}
