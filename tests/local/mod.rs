//! `local` jobs end to end (protocol v2): real coordinators on 127.0.0.1:0, real native workers (CPU backend and
//! the WGSL engine on lavapipe) running H-step local leases with int8 deltas both ways; lying workers of every kind
//! the issue names; a restart mid-round; a v1 worker on a `sync` job beside them.

use std::time::{Duration, Instant};

use starling_coordinator::job::{Hyper, Mode};
use starling_core::StepOutput;
use starling_core::local::{LeasePlan, LocalOutput};
use starling_core::protocol::Quant;
use starling_tests::*;
use starling_worker::engine::{BackendChoice, Device};
use starling_worker::native::{WorkerOptions, WorkerReport, run_lying};
use starling_worker::session::LocalLie;

mod attacks; // Every lie of the attack list against local leases, and raw v2 frames.
mod datasets; // The `dataset` frame: compact for new workers, raw for old ones, cached on disk.
mod elastic; // Elastic rounds: 64 workers all kept busy, measured from their own timestamps.
mod recovery; // A restart mid-round; a v1 worker on a sync job beside a local job.

/// The demo MNIST job in `local` mode: 4 leases of `h` inner steps of 32 rows per outer round.
pub fn local_hyper(h: u32, rounds: u64, quant: Quant) -> Hyper {
    let lease_rows = (h * 32).min(2000);
    Hyper {
        mode: Mode::Local,
        h,
        inner_batch: 32,
        micro_batch: lease_rows,
        global_batch: 4 * lease_rows,
        steps: rounds,
        eval_every: 5,
        quant,
        ..Hyper::default()
    }
}

/// Runs a native worker on its own thread, optionally lying (see [`LocalLie`]) or tampering with every inner step.
pub fn spawn_liar(
    url: String,
    backend: BackendChoice,
    name: &str,
    tamper: Option<SendTamper>,
    lie: Option<Box<dyn LocalLie>>,
) -> std::thread::JoinHandle<anyhow::Result<WorkerReport>> {
    let name = name.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let device = Device::open(backend).await?;
            run_lying(
                device,
                WorkerOptions {
                    coordinator: url,
                    backend,
                    name: Some(name),
                    token: None,
                    max_leases: None,
                    dataset_cache: None,
                },
                tamper.map(|t| -> starling_worker::session::Tamper { t }),
                lie,
            )
            .await
        })
    })
}

/// Every applied round's training metric must come from leases with at least `min` agreeing computations.
pub async fn assert_rounds_verified(server: &Server, job: u64, min: u64) -> anyhow::Result<usize> {
    let (_, metrics) = server.get(&format!("/api/v1/jobs/{job}/metrics")).await?;
    let rows = metrics
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("metrics is not a list: {metrics}"))?;
    let train: Vec<&serde_json::Value> = rows.iter().filter(|m| m["kind"] == "train").collect();
    anyhow::ensure!(!train.is_empty(), "no round was applied");
    for m in &train {
        anyhow::ensure!(
            m["min_agreeing"].as_u64().unwrap_or(0) >= min,
            "round {} applied with fewer than {min} agreeing computations",
            m["step"]
        );
    }
    Ok(train.len())
}

/// Honest CPU and WGSL workers train the demo MLP in `local` mode (H = 16, int8 both ways) to the accuracy the
/// `sync` demo reaches on about the same number of training samples, with every round verified and nobody
/// rejected; the workers hold their model through int8 deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_leases_train_the_demo_mlp_with_int8_deltas() -> anyhow::Result<()> {
    init_tracing();
    // 30 rounds of 4 × 512 rows: 61,440 training samples, about what the sync demo needs for 95% (step ~450 of
    // 128 rows: 57,600).
    let cluster = Cluster::builder("local-train")
        .hyper(local_hyper(16, 30, Quant::Int8))
        .worker("gpu-lavapipe", BackendChoice::Gpu, None)
        .workers(2)
        .start()
        .await?;
    let started = Instant::now();
    let job = cluster
        .server
        .wait_job(1, Duration::from_secs(600), |j| j["status"] == "completed")
        .await?;
    let acc = job["best_test_accuracy"].as_f64().unwrap_or(0.0);
    let rounds = assert_rounds_verified(&cluster.server, 1, 2).await?;
    let c = job["counters"].clone();
    println!(
        "local H=16 int8: {:.2}% held-out accuracy after {rounds} rounds in {:.1}s; accepted {} rejected {} late {} arbitrations {}",
        100.0 * acc,
        started.elapsed().as_secs_f64(),
        c["results_accepted"],
        c["results_rejected"],
        c["results_late"],
        c["arbitrations"],
    );
    let (_, reports) = cluster.finish().await?;
    assert!(acc >= 0.93, "best held-out accuracy {acc}");
    assert_eq!(
        c["results_rejected"], 0,
        "honest workers are never rejected"
    );
    for r in &reports {
        println!("worker: {:?}", r.stats);
        assert_eq!(r.stats.protocol, 2, "a v2 worker gets v2");
        assert!(
            r.stats.accepted > 0 && r.stats.rejected == 0,
            "{:?}",
            r.stats
        );
        assert!(
            r.stats.model_deltas > 0,
            "workers follow the model by deltas: {:?}",
            r.stats
        );
        assert_eq!(r.stats.inner_steps, 16);
    }
    Ok(())
}

/// A lie that changes the lease's plan or its output.
pub struct Lie {
    pub plan: fn(&mut LeasePlan),
    pub output: fn(&mut LocalOutput),
}

impl LocalLie for Lie {
    fn plan(&mut self, plan: &mut LeasePlan) {
        (self.plan)(plan)
    }
    fn output(&mut self, out: &mut LocalOutput) {
        (self.output)(out)
    }
}

/// A tamper of every inner step's gradient.
pub fn each_step(f: fn(&mut StepOutput)) -> SendTamper {
    Box::new(f)
}
