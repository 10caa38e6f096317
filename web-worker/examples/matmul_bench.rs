//! Side-by-side matmul GFLOP/s on this machine's adapter, without burn: the old tiled kernel, the register-blocked
//! kernel (its shape table and each tile alone), the subgroup kernel where the adapter runs one, and the CPU
//! backend's SGEMM, at square sizes and at the 784-128 MLP's three backprop products. Prints a table and one JSON
//! line. Run: `cargo run -p starling-worker --example matmul_bench` (`--quick` for fewer repetitions).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    bench::run()
}

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod bench {
    use std::time::Instant;

    use anyhow::Context as _;
    use serde_json::json;
    use starling_core::cpu::sgemm;
    use starling_core::reference::MatmulForm;
    use starling_worker::gpu::{BlockTile, GpuContext, MatmulKernel, MatmulVariant};

    /// (label, form, m, k, n): square products, then the MLP's forward (x·W), weight gradient (xᵀ·dz) and input
    /// gradient (dz·Wᵀ) at batches 32 and 256.
    fn shapes() -> Vec<(String, MatmulForm, usize, usize, usize)> {
        let mut v: Vec<_> = [256, 512, 1024]
            .map(|n| (format!("{n}^3"), MatmulForm::AB, n, n, n))
            .into();
        for b in [32, 256] {
            v.push((format!("fwd b{b}"), MatmulForm::AB, b, 784, 128));
            v.push((format!("dW b{b}"), MatmulForm::AtB, 784, b, 128));
            v.push((format!("dx b{b}"), MatmulForm::ABt, b, 128, 784));
        }
        v
    }

    /// Repetitions for about `work` FLOP per measurement, at least 3.
    fn reps(flop: f64, work: f64) -> usize {
        (work / flop).ceil().clamp(3.0, 2000.0) as usize
    }

    fn cpu_gflops(form: MatmulForm, m: usize, k: usize, n: usize, reps: usize) -> f64 {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        sgemm(form, m, k, n, &a, &b, 0.0, &mut c);
        let start = Instant::now();
        for _ in 0..reps {
            sgemm(form, m, k, n, &a, &b, 0.0, &mut c);
        }
        2.0 * (m * k * n * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
    }

    pub fn run() -> anyhow::Result<()> {
        let quick = std::env::args().any(|a| a == "--quick");
        let work = if quick { 0.3e9 } else { 2e9 };
        let ctx = pollster::block_on(GpuContext::new()).context("no WebGPU adapter")?;
        let adapter = ctx.summary().label();
        eprintln!("adapter: {adapter}");
        let table = MatmulVariant::Blocked {
            largest: BlockTile::LARGE,
        };
        let mut kernels = vec![
            (
                "tiled".to_string(),
                MatmulKernel::new(&ctx, MatmulVariant::Tiled),
            ),
            ("blocked".to_string(), MatmulKernel::new(&ctx, table)),
        ];
        for tile in BlockTile::ALL {
            let name = format!("blk{}", tile.rows());
            kernels.push((
                name,
                MatmulKernel::new(&ctx, MatmulVariant::BlockedFixed(tile)),
            ));
        }
        if let MatmulVariant::Subgroup(_) = ctx.matmul_variant() {
            kernels.push((
                ctx.matmul_variant().to_string(),
                MatmulKernel::new(&ctx, ctx.matmul_variant()),
            ));
        }

        println!(
            "matmul GFLOP/s on {adapter} (higher is better); `blocked` = the shape table, its tile in []"
        );
        print!("{:>9} {:>5} {:>14}", "shape", "form", "m×k×n");
        for (name, _) in &kernels {
            print!(" {name:>10}");
        }
        println!(" {:>10} {:>13}", "cpu sgemm", "blocked/tiled");
        let mut rows = Vec::new();
        for (label, form, m, k, n) in shapes() {
            let flop = 2.0 * (m * k * n) as f64;
            let r = reps(flop, work);
            print!(
                "{label:>9} {:>5} {:>14}",
                format!("{form:?}"),
                format!("{m}×{k}×{n}")
            );
            let mut row = serde_json::Map::new();
            row.insert("shape".into(), json!(label));
            row.insert("form".into(), json!(format!("{form:?}")));
            row.insert("mkn".into(), json!([m, k, n]));
            let (mut tiled, mut blocked) = (0.0, 0.0);
            for (name, kernel) in &kernels {
                let g = kernel.time_gflops_form(&ctx, form, m, k, n, r)?;
                match name.as_str() {
                    "tiled" => tiled = g,
                    "blocked" => blocked = g,
                    _ => {}
                }
                print!(" {g:>10.2}");
                row.insert(format!("{name}_gflops"), json!(round2(g)));
            }
            let cpu = cpu_gflops(form, m, k, n, r);
            let tile = kernels[1]
                .1
                .tile_for(m, n)
                .map(|t| t.to_string())
                .unwrap_or_default();
            println!(" {cpu:>10.2} {:>8.2} [{tile}]", blocked / tiled);
            row.insert("cpu_gflops".into(), json!(round2(cpu)));
            row.insert("blocked_tile".into(), json!(tile));
            row.insert("blocked_over_tiled".into(), json!(round2(blocked / tiled)));
            rows.push(serde_json::Value::Object(row));
        }
        println!("{}", json!({"adapter": adapter, "matmul": rows}));
        Ok(())
    }

    fn round2(v: f64) -> f64 {
        (v * 100.0).round() / 100.0
    }
}
