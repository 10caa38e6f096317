//! `starling`: the coordinator (`serve`), a native volunteer (`worker`), the single-process trainer (`train`), the
//! owner client (`job`) and the host tools (`token`, `ledger`). This package is where the parts meet: it links the
//! coordinator library and the worker engine, which know nothing of each other.

mod client; // The coordinator's HTTP API over ureq, for `starling job`.
mod config; // Flags and subcommands.
mod lm; // `starling train --model char-lm`: the char-level LM in one process.
mod owner; // `starling job ...`.
mod sample; // `starling job sample`: text from an LM checkpoint.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use starling_coordinator::store::Store;
use starling_worker::engine::{BackendChoice, Device};

use crate::config::{
    Cli, Command, LedgerCommand, ServeConfig, TokenCommand, TrainArgs, WorkerArgs,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,wgpu=warn,naga=warn")),
        )
        .init();
    let result = match cli.command {
        // Blocking HTTP: no async runtime needed.
        Command::Job(args) => owner::run(args),
        command => tokio::runtime::Runtime::new()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(cfg) => serve(cfg).await,
        Command::Worker(args) => worker(args).await,
        Command::Train(args) => train(args).await,
        Command::Ledger(LedgerCommand::Verify { db }) => ledger_verify(&db).await,
        Command::Token(TokenCommand::Create { name, db }) => {
            let store = Store::connect(&db.to_string_lossy()).await?;
            let token = starling_coordinator::create_owner(&store, &name).await?;
            println!("{token}");
            eprintln!("owner {name:?} created; keep this token secret (only its hash is stored)");
            Ok(())
        }
        Command::Job(args) => owner::run(args),
    }
}

/// `starling ledger verify`: the chain and every balance, or an error naming the first break (exit code 1).
async fn ledger_verify(db: &std::path::Path) -> anyhow::Result<()> {
    let url = db.to_string_lossy();
    let postgres = starling_coordinator::store::is_postgres_url(&url);
    anyhow::ensure!(postgres || db.exists(), "no database at {}", db.display());
    let store = Store::connect(&url)
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    let report = store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("ledger does not verify: {e}"))?;
    println!(
        "ledger ok: {} entries, {} workers, {:.3} GFLOP credited, head {}",
        report.entries,
        report.workers,
        report.total_flops as f64 / 1e9,
        report.head
    );
    Ok(())
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| format!("binding {}", cfg.addr))?;
    starling_coordinator::run(listener, cfg, stop_signal()).await
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM, the signal service managers and `kill` send: either stops the
/// coordinator gracefully (workers are told it is shutting down).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the coordinator")
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let backend: BackendChoice = args.backend.parse().map_err(anyhow::Error::msg)?;
    let token = match &args.token_file {
        Some(p) if p.exists() => Some(std::fs::read_to_string(p)?.trim().to_string()),
        _ => None,
    };
    let opts = starling_worker::native::WorkerOptions {
        coordinator: args.coordinator,
        backend,
        name: args.name,
        token,
        max_leases: args.max_leases,
        dataset_cache: if args.no_dataset_cache {
            None
        } else {
            args.dataset_cache.or_else(|| {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(std::path::PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
                    })?;
                Some(base.join("starling").join("datasets"))
            })
        },
    };
    let device = starling_worker::engine::Device::open(opts.backend)
        .await
        .context("opening the compute device")?;
    tracing::info!(backend = ?device.backend(), adapter = %device.label(), "worker device ready");
    let reconnect = starling_worker::native::Reconnect {
        fallbacks: args.fallbacks,
        give_up_after: args.reconnect_secs.map(std::time::Duration::from_secs),
        silence: args
            .reconnect_secs
            .map(|_| std::time::Duration::from_millis(args.silence_ms)),
    };
    let report = starling_worker::native::run_reconnecting(device, opts, None, reconnect).await?;
    if let (Some(p), Some(t)) = (&args.token_file, &report.token) {
        std::fs::write(p, t)
            .with_context(|| format!("saving the worker token to {}", p.display()))?;
    }
    let s = &report.stats;
    println!(
        "worker done: {} leases, {} accepted, {} rejected, {} late, {:.3} GFLOP credits{}",
        s.leases,
        s.accepted,
        s.rejected,
        s.late,
        s.credits,
        report
            .closed_by
            .map(|c| format!(" (closed: {c})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Trains a demo job's model and schedule in this process on one engine, with the coordinator's update rule
/// (learning-rate schedule, weight decay, early stopping): the reference the distributed run is compared with.
async fn train(args: TrainArgs) -> anyhow::Result<()> {
    use starling_coordinator::job::Hyper;
    use starling_core::{ModelSpec, data, optim::Optimizer, schedule};
    if args.model == "char-lm" {
        anyhow::ensure!(
            args.backend == "cpu",
            "the char-level LM trains on the CPU backend only (--backend cpu)"
        );
        return lm::train(args.steps.unwrap_or(2000), &args.lm);
    }
    let backend: BackendChoice = args.backend.parse().map_err(anyhow::Error::msg)?;
    let (spec, hyper) = match args.model.as_str() {
        "mlp" => (ModelSpec::mnist_mlp(), starling_coordinator::demo_hyper()),
        "cnn" => (
            starling_coordinator::demo_cnn_spec(),
            starling_coordinator::demo_cnn_hyper(),
        ),
        other => anyhow::bail!("unknown --model `{other}` (expected mlp, cnn or char-lm)"),
    };
    let spec = match &args.spec {
        Some(path) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ModelSpec::from_json(&json)?
        }
        None => spec,
    };
    let mut hyper = match &args.hyper {
        Some(json) => {
            // Fields given override the demo schedule's; the rest keep its values.
            let mut base = serde_json::to_value(&hyper)?;
            let over: serde_json::Value =
                serde_json::from_str(json).context("--hyper is not JSON")?;
            if let (Some(b), Some(o)) = (base.as_object_mut(), over.as_object()) {
                b.extend(o.clone());
            }
            serde_json::from_value::<Hyper>(base).context("--hyper")?
        }
        None => hyper,
    };
    if let Some(steps) = args.steps {
        hyper.steps = steps;
    }
    let device = Device::open(backend).await?;
    let all = data::mnist_from_dir(&args.mnist_dir).map_err(anyhow::Error::msg)?;
    let (train, test) = data::mnist_split(&all);
    hyper.validate(train.rows()).map_err(anyhow::Error::msg)?;
    let mut params = spec.init_params(hyper.seed);
    let mut opt = Optimizer::new(hyper.optimizer, params.len());
    println!(
        "training {} ({} parameters) on {} ({} train / {} test rows), hyper {}",
        serde_json::to_string(&spec)?,
        params.len(),
        device.label(),
        train.rows(),
        test.rows(),
        serde_json::to_string(&hyper)?
    );
    let mut engine = device.engine(spec)?;
    let started = std::time::Instant::now();
    let (mut best_acc, mut best_loss, mut since_best) = (0.0f32, f32::INFINITY, 0u32);
    let mut step_time = std::time::Duration::ZERO;
    for step in 0..hyper.steps {
        let rows = schedule::step_rows(train.rows(), hyper.global_batch as usize, hyper.seed, step);
        let (x, y) = train.gather(&rows);
        let t = std::time::Instant::now();
        engine.load(&params).await?;
        let out = engine.step(&x, &y).await?;
        step_time += t.elapsed();
        let scale = hyper.lr_schedule.factor(step, hyper.steps);
        opt.step_scaled(&mut params, &out.grad, scale, hyper.weight_decay);
        let done = step + 1;
        if done % hyper.eval_every == 0 || done == hyper.steps {
            engine.load(&params).await?;
            let ev = engine.evaluate(&test.features, &test.labels).await?;
            best_acc = best_acc.max(ev.accuracy());
            if ev.loss < best_loss {
                (best_loss, since_best) = (ev.loss, 0);
            } else {
                since_best += 1;
            }
            println!(
                "step {done:>5}  train loss {:.4}  test loss {:.4}  test accuracy {:.2}% (best {:.2}%)  {:.1}s  {:.1} ms/step",
                out.loss,
                ev.loss,
                100.0 * ev.accuracy(),
                100.0 * best_acc,
                started.elapsed().as_secs_f64(),
                1e3 * step_time.as_secs_f64() / done as f64
            );
            if args
                .target_accuracy
                .or(hyper.target_accuracy)
                .is_some_and(|t| ev.accuracy() >= t)
            {
                println!(
                    "target accuracy reached at step {done} after {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if hyper.patience.is_some_and(|p| since_best >= p) {
                println!(
                    "early stop at step {done}: no lower held-out loss for {since_best} evaluations; best accuracy {:.2}%",
                    100.0 * best_acc
                );
                break;
            }
        }
    }
    Ok(())
}
