//! Tests of the reference itself: every layer's backward against central finite differences of its forward on
//! odd shapes (channels 1, 3, 5; sizes 1, 7, 28; stride 2; padding), hand-computed forward values, and the whole
//! pass of a small CNN and a dense stack against finite differences of the loss.

use super::*;
use crate::rng::SplitMix64;
use crate::spec::{Conv2dDims, GroupNormDims, Layer, Pool2dDims};

fn randn(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Indices to probe: all of them for small tensors, else an even spread of `limit` (first and last included).
fn probes(len: usize, limit: usize) -> Vec<usize> {
    if len <= limit {
        (0..len).collect()
    } else {
        (0..limit).map(|i| i * (len - 1) / (limit - 1)).collect()
    }
}

/// Checks `analytic[i] ≈ ∂f/∂v[i]` by central differences (f evaluated in f64 from f32 forward values), at the
/// probed indices: `|numeric − analytic| ≤ tol · max(1, |analytic|)`.
fn fd_check(what: &str, v: &[f32], analytic: &[f32], tol: f64, f: impl Fn(&[f32]) -> f64) {
    fd_check_h(what, v, analytic, tol, 1e-2, f)
}

fn fd_check_h(
    what: &str,
    v: &[f32],
    analytic: &[f32],
    tol: f64,
    h: f32,
    f: impl Fn(&[f32]) -> f64,
) {
    assert_eq!(v.len(), analytic.len(), "{what}: gradient length");
    for i in probes(v.len(), 48) {
        let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (f(&plus) - f(&minus)) / (2.0 * h as f64);
        let a = analytic[i] as f64;
        assert!(
            (numeric - a).abs() <= tol * a.abs().max(1.0),
            "{what}[{i}]: numeric {numeric}, analytic {a}"
        );
    }
}

/// `Σ dy ⊙ y`, the scalar whose gradient with respect to `y` is `dy`.
fn dot(dy: &[f32], y: &[f32]) -> f64 {
    dy.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn conv_dims(in_c: usize, size: usize, out_c: usize, k: usize, s: usize, p: usize) -> Conv2dDims {
    Conv2dDims {
        in_c,
        in_h: size,
        in_w: size + 1, // non-square, so rows and columns cannot be swapped unnoticed
        out_c,
        kernel: k,
        stride: s,
        padding: p,
        out_h: (size + 2 * p - k) / s + 1,
        out_w: (size + 1 + 2 * p - k) / s + 1,
    }
}

#[test]
fn conv2d_backward_matches_finite_differences_on_odd_shapes() {
    let mut rng = SplitMix64::new(1);
    // (in_c, size, out_c, kernel, stride, padding)
    for &(ci, size, co, k, s, p) in &[
        (1, 1, 1, 1, 1, 0),
        (1, 1, 3, 3, 1, 1),
        (3, 7, 5, 3, 2, 1),
        (5, 7, 3, 5, 1, 2),
        (3, 7, 1, 2, 2, 0),
        (1, 28, 5, 5, 1, 2),
        (5, 28, 3, 3, 2, 0),
    ] {
        let d = conv_dims(ci, size, co, k, s, p);
        let batch = 2;
        let x = randn(&mut rng, batch * d.in_len());
        let w = randn(&mut rng, d.weight_len());
        let b = randn(&mut rng, co);
        let dy = randn(&mut rng, batch * d.out_len());
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; batch * d.out_len()];
            conv2d_forward(&d, batch, x, w, b, &mut y);
            dot(&dy, &y)
        };
        let mut dx = vec![0.0; x.len()];
        conv2d_backward_input(&d, batch, &dy, &w, &mut dx);
        let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; co]);
        conv2d_backward_weight(&d, batch, &x, &dy, &mut dw, &mut db);
        let what = format!("conv {ci}x{size} -> {co} k{k} s{s} p{p}");
        // The loss is linear in each operand, so central differences are exact up to f32 rounding.
        fd_check(&format!("{what} dx"), &x, &dx, 1e-3, |v| loss(v, &w, &b));
        fd_check(&format!("{what} dw"), &w, &dw, 1e-3, |v| loss(&x, v, &b));
        fd_check(&format!("{what} db"), &b, &db, 1e-3, |v| loss(&x, &w, v));
    }
}

#[test]
fn conv2d_forward_hand_computed() {
    // One 3×3 input, a 2×2 kernel of ones, padding 1, stride 2: windows at (−1, −1), (−1, 1), (1, −1), (1, 1).
    let d = Conv2dDims {
        in_c: 1,
        in_h: 3,
        in_w: 3,
        out_c: 1,
        kernel: 2,
        stride: 2,
        padding: 1,
        out_h: 2,
        out_w: 2,
    };
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect(); // [[1,2,3],[4,5,6],[7,8,9]]
    let mut y = vec![0.0; 4];
    conv2d_forward(&d, 1, &x, &[1.0; 4], &[0.5], &mut y);
    assert_eq!(y, [1.5, 5.5, 11.5, 28.5]);
    // A 1×1 kernel picks channels: out = 2·c0 − c1 + 0.
    let d1 = Conv2dDims {
        in_c: 2,
        in_h: 1,
        in_w: 2,
        out_c: 1,
        kernel: 1,
        stride: 1,
        padding: 0,
        out_h: 1,
        out_w: 2,
    };
    let mut y1 = vec![0.0; 2];
    conv2d_forward(
        &d1,
        1,
        &[1.0, 2.0, 10.0, 20.0],
        &[2.0, -1.0],
        &[0.0],
        &mut y1,
    );
    assert_eq!(y1, [-8.0, -16.0]);
}

fn pool_dims(c: usize, size: usize, k: usize, s: usize) -> Pool2dDims {
    Pool2dDims {
        channels: c,
        in_h: size,
        in_w: size + 2,
        kernel: k,
        stride: s,
        out_h: (size - k) / s + 1,
        out_w: (size + 2 - k) / s + 1,
    }
}

#[test]
fn pooling_backward_matches_finite_differences_on_odd_shapes() {
    let mut rng = SplitMix64::new(2);
    for &(c, size, k, s) in &[
        (1, 1, 1, 1),
        (3, 7, 2, 2),
        (5, 7, 3, 2),
        (1, 28, 2, 2),
        (3, 28, 3, 1),
    ] {
        let d = pool_dims(c, size, k, s);
        let batch = 2;
        // Distinct values 2e-3 apart, 4 FD steps, so no window's maximum changes under the probe.
        let n = batch * d.in_len();
        let mut x: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 2e-3).collect();
        for i in (1..x.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            x.swap(i, j);
        }
        let dy = randn(&mut rng, batch * d.out_len());
        let what = format!("pool c{c} {size} k{k} s{s}");
        let max_loss = |x: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            max_pool2d_forward(&d, batch, x, &mut y);
            dot(&dy, &y)
        };
        let mut dx = vec![0.0; x.len()];
        max_pool2d_backward(&d, batch, &x, &dy, &mut dx);
        fd_check_h(&format!("{what} max dx"), &x, &dx, 2e-3, 5e-4, max_loss);
        let x = randn(&mut rng, n);
        let avg_loss = |x: &[f32]| {
            let mut y = vec![0.0; dy.len()];
            avg_pool2d_forward(&d, batch, x, &mut y);
            dot(&dy, &y)
        };
        avg_pool2d_backward(&d, batch, &dy, &mut dx);
        fd_check(&format!("{what} avg dx"), &x, &dx, 1e-3, avg_loss);
    }
}

#[test]
fn max_pool_ties_go_to_the_first_maximum() {
    let d = pool_dims(1, 2, 2, 2); // one 2×2 window over columns 0..2 and one over 2..4
    let x = [1.0, 7.0, 3.0, 3.0, 7.0, 2.0, 3.0, 3.0];
    let mut y = vec![0.0; 2];
    max_pool2d_forward(&d, 1, &x, &mut y);
    assert_eq!(y, [7.0, 3.0]);
    let mut dx = vec![0.0; 8];
    max_pool2d_backward(&d, 1, &x, &[1.0, 2.0], &mut dx);
    assert_eq!(dx, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // Average pooling of the same windows; the uncovered right part (none here) would get 0.
    avg_pool2d_forward(&d, 1, &x, &mut y);
    assert_eq!(y, [17.0 / 4.0, 12.0 / 4.0]);
}

#[test]
fn norms_backward_match_finite_differences_on_odd_shapes() {
    let mut rng = SplitMix64::new(3);
    for &(c, size, groups) in &[
        (1, 1, 1),
        (3, 7, 1),
        (3, 7, 3),
        (5, 7, 5),
        (5, 28, 1),
        (6, 7, 3),
    ] {
        let d = GroupNormDims {
            channels: c,
            groups,
            hw: size * (size + 1),
        };
        let batch = 2;
        let x = randn(&mut rng, batch * d.len());
        let gamma: Vec<f32> = (0..c).map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
        let beta = randn(&mut rng, c);
        let dy = randn(&mut rng, x.len());
        let eps = 1e-5;
        let loss = |x: &[f32], g: &[f32], b: &[f32]| {
            let mut y = vec![0.0; x.len()];
            group_norm_forward(&d, batch, x, g, b, eps, &mut y);
            dot(&dy, &y)
        };
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        group_norm_backward(&d, batch, &x, &gamma, &dy, eps, &mut dx, &mut dg, &mut db);
        let what = format!("group_norm c{c} {size} g{groups}");
        // Normalisation is non-linear in x: a looser bound for the FD truncation error at h = 1e-2.
        fd_check(&format!("{what} dx"), &x, &dx, 2e-2, |v| {
            loss(v, &gamma, &beta)
        });
        fd_check(&format!("{what} dgamma"), &gamma, &dg, 1e-3, |v| {
            loss(&x, v, &beta)
        });
        fd_check(&format!("{what} dbeta"), &beta, &db, 1e-3, |v| {
            loss(&x, &gamma, v)
        });
    }
    for &dim in &[1usize, 2, 7, 28 * 28] {
        let rows = 3;
        let x = randn(&mut rng, rows * dim);
        let gamma: Vec<f32> = (0..dim).map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
        let beta = randn(&mut rng, dim);
        let dy = randn(&mut rng, x.len());
        let eps = 1e-5;
        let loss = |x: &[f32], g: &[f32], b: &[f32]| {
            let mut y = vec![0.0; x.len()];
            layer_norm_forward(x, g, b, dim, eps, &mut y);
            dot(&dy, &y)
        };
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
        layer_norm_backward(&x, &gamma, &dy, dim, eps, &mut dx, &mut dg, &mut db);
        let what = format!("layer_norm {dim}");
        fd_check(&format!("{what} dx"), &x, &dx, 2e-2, |v| {
            loss(v, &gamma, &beta)
        });
        fd_check(&format!("{what} dgamma"), &gamma, &dg, 1e-3, |v| {
            loss(&x, v, &beta)
        });
        fd_check(&format!("{what} dbeta"), &beta, &db, 1e-3, |v| {
            loss(&x, &gamma, v)
        });
    }
}

#[test]
fn norm_outputs_are_standardised() {
    let mut rng = SplitMix64::new(4);
    let x: Vec<f32> = (0..2 * 7)
        .map(|_| 3.0 + 5.0 * rng.normal() as f32)
        .collect();
    let mut y = vec![0.0; x.len()];
    layer_norm_forward(&x, &[1.0; 7], &[0.0; 7], 7, 1e-5, &mut y);
    for row in y.chunks(7) {
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / 7.0;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / 7.0;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-4,
            "mean {mean} var {var}"
        );
    }
    // Group norm with one group per channel on constant channels: 0 everywhere, plus β.
    let d = GroupNormDims {
        channels: 2,
        groups: 2,
        hw: 3,
    };
    let mut y = vec![0.0; 6];
    group_norm_forward(&d, 1, &[4.0; 6], &[2.0, 2.0], &[0.5, -1.0], 1e-5, &mut y);
    assert_eq!(y, [0.5, 0.5, 0.5, -1.0, -1.0, -1.0]);
}

#[test]
fn activations_match_known_values_and_finite_differences() {
    // gelu (tanh form) at 1 and −1: 0.8411920 and −0.1588080 (the erf form would give 0.8413447).
    let mut y = [0.0f32; 3];
    gelu_forward(&[1.0, -1.0, 0.0], &mut y);
    assert!(
        (y[0] - 0.841_192).abs() < 1e-6 && (y[1] + 0.158_808).abs() < 1e-6 && y[2] == 0.0,
        "{y:?}"
    );
    let mut rng = SplitMix64::new(5);
    let x: Vec<f32> = randn(&mut rng, 50).iter().map(|v| v * 3.0).collect();
    let dy = randn(&mut rng, 50);
    let mut dx = vec![0.0; 50];
    gelu_backward(&x, &dy, &mut dx);
    fd_check("gelu dx", &x, &dx, 1e-3, |v| {
        let mut y = vec![0.0; v.len()];
        gelu_forward(v, &mut y);
        dot(&dy, &y)
    });
    relu_forward(&[-1.0, 0.0, 2.0], &mut y);
    assert_eq!(y, [0.0, 0.0, 2.0]);
    relu_backward(&[-1.0, 0.0, 2.0], &[5.0, 5.0, 5.0], &mut y);
    assert_eq!(y, [0.0, 0.0, 5.0]);
}

/// Central differences of the mean loss with respect to every parameter of `spec`.
fn check_whole_pass(spec: &ModelSpec, rows: usize, seed: u64, tol: f64) {
    spec.validate().unwrap();
    let mut rng = SplitMix64::new(seed);
    let mut params = spec.init_params(seed);
    for p in params.iter_mut() {
        *p += 0.05 * rng.normal() as f32; // non-zero biases and β, γ away from 1
    }
    let x = randn(&mut rng, rows * spec.input_len());
    let labels: Vec<u32> = (0..rows).map(|r| (r % spec.classes()) as u32).collect();
    let out = forward_backward(spec, &params, &x, &labels).unwrap();
    let plans = spec.plan();
    let loss_at = |p: &[f32]| {
        let outs = forward(&plans, p, &x, rows);
        softmax_xent(&outs[outs.len() - 1], &labels, spec.classes(), None).0 / rows as f64
    };
    assert!((loss_at(&params) - out.loss as f64).abs() < 1e-5);
    let h = 1e-3f32;
    let mut worst = (0.0f64, 0usize);
    for i in 0..params.len() {
        let (mut plus, mut minus) = (params.clone(), params.clone());
        plus[i] += h;
        minus[i] -= h;
        let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64);
        let err = (numeric - out.grad[i] as f64).abs();
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 < tol,
        "max |numeric - analytic| = {} at parameter {}",
        worst.0,
        worst.1
    );
}

/// The v1 dense stack: the dense path is a special case of the layer graph.
#[test]
fn dense_backward_matches_finite_differences() {
    let spec = ModelSpec::dense(
        5,
        &[
            (7, Activation::Relu),
            (4, Activation::Relu),
            (3, Activation::None),
        ],
    );
    check_whole_pass(&spec, 6, 11, 2e-3);
}

/// A small CNN with every layer kind: odd channels, stride 2, padding, overlapping pooling, both norms, gelu.
#[test]
fn cnn_backward_matches_finite_differences() {
    let spec = ModelSpec {
        input: crate::spec::Input::Shape(vec![3, 9, 8]),
        layers: vec![
            Layer::Conv2d {
                out_channels: 5,
                kernel: 3,
                stride: 2,
                padding: 1,
            }, // [5, 5, 4]
            Layer::GroupNorm {
                groups: 5,
                eps: 1e-5,
            },
            Layer::Relu,
            Layer::MaxPool2d {
                kernel: 2,
                stride: Some(1),
            }, // [5, 4, 3]
            Layer::Conv2d {
                out_channels: 3,
                kernel: 3,
                stride: 1,
                padding: 1,
            }, // [3, 4, 3]
            Layer::GroupNorm {
                groups: 1,
                eps: 1e-5,
            },
            Layer::Gelu,
            Layer::AvgPool2d {
                kernel: 2,
                stride: None,
            }, // [3, 2, 1]
            Layer::Flatten,
            Layer::dense(7, Activation::Relu),
            Layer::LayerNorm { eps: 1e-5 },
            Layer::dense(4, Activation::None),
        ],
    };
    check_whole_pass(&spec, 3, 21, 3e-3);
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
