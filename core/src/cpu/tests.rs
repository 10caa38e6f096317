//! CPU backend tests: SGEMM in every form, and every layer and the whole pass against the plain-loop reference.

use super::*;
use crate::reference;
use crate::rng::SplitMix64;

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn sgemm_matches_reference_in_every_form_on_odd_shapes() {
    let mut rng = SplitMix64::new(1);
    for &(m, k, n) in &[
        (1, 1, 1),
        (7, 33, 5),
        (33, 100, 7),
        (100, 785, 33),
        (64, 784, 128),
    ] {
        for form in [MatmulForm::AB, MatmulForm::AtB, MatmulForm::ABt] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let mut want = vec![0.0; m * n];
            reference::matmul(form, m, k, n, &a, &b, &mut want);
            let mut got = vec![0.0; m * n];
            sgemm(form, m, k, n, &a, &b, 0.0, &mut got);
            assert!(rel_l2(&got, &want) < 1e-5, "{form:?} {m}x{k}x{n}");
        }
    }
}

#[test]
fn step_and_eval_match_reference() {
    let spec = ModelSpec::mnist_mlp();
    let params = spec.init_params(5);
    let mut rng = SplitMix64::new(9);
    let rows = 64;
    let x: Vec<f32> = (0..rows * 784).map(|_| rng.next_f64() as f32).collect();
    let labels: Vec<u32> = (0..rows).map(|_| rng.below(10) as u32).collect();
    let want = reference::forward_backward(&spec, &params, &x, &labels).unwrap();
    let mut engine = CpuEngine::new(spec.clone());
    engine.load(&params).unwrap();
    let got = engine.step(&x, &labels).unwrap();
    assert!((got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0));
    assert_eq!(got.correct, want.correct);
    assert!(rel_l2(&got.grad, &want.grad) < 1e-5);
    let e = engine.evaluate(&x, &labels).unwrap();
    assert_eq!(e.correct, want.correct);
    assert!((e.loss - want.loss).abs() < 1e-5);
}

#[test]
fn bad_batches_are_rejected() {
    let mut engine = CpuEngine::new(ModelSpec::mnist_mlp());
    assert_eq!(
        engine.step(&[0.0; 10], &[1]),
        Err(BatchError::FeatureShape {
            got: 10,
            rows: 1,
            input: 784
        })
    );
    assert_eq!(
        engine.step(&[0.0; 784], &[10]),
        Err(BatchError::LabelRange {
            row: 0,
            label: 10,
            classes: 10
        })
    );
    assert_eq!(
        engine.load(&[0.0; 3]),
        Err(BatchError::ParamCount {
            got: 3,
            expected: 101_770
        })
    );
}

fn randn(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// im2col + GEMM against the reference loops on odd shapes, with the batch split into groups of 1, 2 and all.
#[test]
fn conv_matches_reference_on_odd_shapes() {
    use crate::spec::Conv2dDims;
    let mut rng = SplitMix64::new(2);
    // (in_c, h, w, out_c, kernel, stride, padding)
    for &(ci, h, w, co, k, s, p) in &[
        (1, 1, 1, 1, 1, 1, 0),
        (1, 1, 1, 3, 3, 1, 1),
        (3, 7, 8, 5, 3, 2, 1),
        (5, 7, 7, 3, 5, 1, 2),
        (3, 7, 6, 1, 2, 2, 0),
        (1, 28, 28, 5, 5, 1, 2),
        (5, 28, 27, 3, 3, 2, 0),
        (3, 9, 9, 4, 4, 3, 3),
    ] {
        let d = Conv2dDims {
            in_c: ci,
            in_h: h,
            in_w: w,
            out_c: co,
            kernel: k,
            stride: s,
            padding: p,
            out_h: (h + 2 * p - k) / s + 1,
            out_w: (w + 2 * p - k) / s + 1,
        };
        let batch = 3;
        let x = randn(&mut rng, batch * d.in_len());
        let wt = randn(&mut rng, d.weight_len());
        let b = randn(&mut rng, co);
        let dy = randn(&mut rng, batch * d.out_len());
        let mut want_y = vec![0.0; dy.len()];
        reference::conv2d_forward(&d, batch, &x, &wt, &b, &mut want_y);
        let mut want_dx = vec![0.0; x.len()];
        reference::conv2d_backward_input(&d, batch, &dy, &wt, &mut want_dx);
        let (mut want_dw, mut want_db) = (vec![0.0; wt.len()], vec![0.0; co]);
        reference::conv2d_backward_weight(&d, batch, &x, &dy, &mut want_dw, &mut want_db);
        let per_sample = d.patch_len() * d.out_h * d.out_w;
        for budget in [1, 2 * per_sample, conv::COL_BUDGET] {
            let what = format!("{d:?} budget {budget}");
            let mut scratch = conv::ConvScratch::with_budget(budget);
            let mut y = vec![f32::NAN; dy.len()];
            conv::forward(&d, batch, &x, &wt, &b, &mut y, &mut scratch);
            assert!(rel_l2(&y, &want_y) < 1e-5, "{what}: forward");
            let (mut dx, mut dw, mut db) = (
                vec![f32::NAN; x.len()],
                vec![f32::NAN; wt.len()],
                vec![f32::NAN; co],
            );
            conv::backward(
                &d,
                batch,
                &x,
                &wt,
                &dy,
                &mut dw,
                &mut db,
                Some(&mut dx),
                &mut scratch,
            );
            assert!(rel_l2(&dx, &want_dx) < 1e-5, "{what}: dx");
            assert!(rel_l2(&dw, &want_dw) < 1e-5, "{what}: dw");
            assert!(rel_l2(&db, &want_db) < 1e-5, "{what}: db");
        }
    }
}

/// The whole step and evaluation of CNNs (every layer kind; the demo's shape) against the reference.
#[test]
fn cnn_step_and_eval_match_reference() {
    let specs = [
        r#"{"input": [3, 9, 8], "layers": [
            {"type": "conv2d", "out_channels": 5, "kernel": 3, "stride": 2, "padding": 1},
            {"type": "group_norm", "groups": 5}, {"type": "relu"}, {"type": "max_pool2d", "kernel": 2, "stride": 1},
            {"type": "conv2d", "out_channels": 3, "kernel": 3, "padding": 1}, {"type": "group_norm", "groups": 1},
            {"type": "gelu"}, {"type": "avg_pool2d", "kernel": 2}, {"type": "flatten"},
            {"type": "dense", "units": 7, "activation": "relu"}, {"type": "layer_norm"}, {"type": "dense", "units": 4}]}"#,
        r#"{"input": [1, 28, 28], "layers": [
            {"type": "conv2d", "out_channels": 16, "kernel": 5, "padding": 2}, {"type": "relu"},
            {"type": "max_pool2d", "kernel": 2},
            {"type": "conv2d", "out_channels": 32, "kernel": 5, "padding": 2}, {"type": "relu"},
            {"type": "max_pool2d", "kernel": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]}"#,
    ];
    for json in specs {
        let spec = ModelSpec::from_json(json).unwrap();
        let mut rng = SplitMix64::new(9);
        let mut params = spec.init_params(5);
        for p in params.iter_mut() {
            *p += 0.05 * rng.normal() as f32;
        }
        let rows = 5;
        let x: Vec<f32> = (0..rows * spec.input_len())
            .map(|_| rng.next_f64() as f32)
            .collect();
        let labels: Vec<u32> = (0..rows)
            .map(|_| rng.below(spec.classes() as u64) as u32)
            .collect();
        let want = reference::forward_backward(&spec, &params, &x, &labels).unwrap();
        let mut engine = CpuEngine::new(spec.clone());
        engine.load(&params).unwrap();
        for _ in 0..2 {
            // Twice: scratch buffers reused from the first call must not leak into the second.
            let got = engine.step(&x, &labels).unwrap();
            assert!((got.loss - want.loss).abs() < 1e-5 * want.loss.abs().max(1.0));
            assert_eq!(got.correct, want.correct);
            assert!(
                rel_l2(&got.grad, &want.grad) < 1e-5,
                "{}",
                rel_l2(&got.grad, &want.grad)
            );
        }
        let e = engine.evaluate(&x, &labels).unwrap();
        assert_eq!(e.correct, want.correct);
        assert!((e.loss - want.loss).abs() < 1e-5);
    }
}
