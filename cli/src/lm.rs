//! `starling train --model char-lm`: the char-level Moby-Dick language model, as a layer-graph model spec, trained
//! in this process on the CPU backend (`CpuEngine`, as a CPU worker runs it): the single-process reference for the
//! distributed LM job. Prints the held-out loss in nats per character and the time per step, optionally saves a
//! checkpoint for `starling job sample`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use starling_core::cpu::CpuEngine;
use starling_core::optim::{LrSchedule, Optimizer, OptimizerSpec};
use starling_core::tokens::{self, TokenStream};
use starling_core::transformer::export::{LmCheckpoint, to_safetensors};
use starling_core::transformer::{LmSpec, sample};

/// Flags of `starling train` that only the LM reads.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Language model (--model char-lm)")]
pub struct LmTrainArgs {
    /// The corpus text (char-level; the last 10% is held out).
    #[arg(long, default_value = tokens::MOBY_DICK_PATH)]
    pub corpus: PathBuf,
    /// Sequences per step (each of `--context` tokens).
    #[arg(long, default_value_t = 12)]
    pub batch: usize,
    /// Context length.
    #[arg(long, default_value_t = 64)]
    pub context: u32,
    /// Peak learning rate of AdamW (β₂ 0.99), cosine-decayed to a tenth after 100 warm-up steps.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 250)]
    pub eval_every: u64,
    /// Held-out windows in the interim evaluations (evenly spaced); the final one covers the whole held-out text.
    #[arg(long, default_value_t = 256)]
    pub eval_windows: usize,
    /// Write the final model here (safetensors, for `starling job sample --checkpoint`).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Seed of the initialisation and of the batches.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Token ids as the f32 features a layer-graph model reads.
fn features(ids: &[u32]) -> Vec<f32> {
    ids.iter().map(|&i| i as f32).collect()
}

/// Loss over the held-out windows starting at `starts` (the engine holds the current parameters).
fn held_out(engine: &mut CpuEngine, test: &TokenStream, starts: &[u32]) -> anyhow::Result<f32> {
    let (ids, targets) = test.gather(starts);
    Ok(engine.evaluate(&features(&ids), &targets)?.loss)
}

pub fn train(steps: u64, args: &LmTrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let ds = tokens::moby_dick_from_file(&args.corpus, args.context).map_err(anyhow::Error::msg)?;
    let (train, test) = ds.split(tokens::MOBY_DICK_HELD_OUT as f32)?;
    let spec = LmSpec {
        context: args.context,
        ..LmSpec::char_lm(ds.vocab_size)
    };
    spec.validate()?;
    let graph = spec.model_spec();
    let mut engine = CpuEngine::new(graph.clone());
    let mut params = graph.init_params(args.seed);
    let mut opt = Optimizer::new(
        OptimizerSpec::Adam {
            lr: args.lr,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        },
        params.len(),
    );
    let schedule = LrSchedule::Cosine {
        warmup_steps: 100.min(steps / 10),
        min_ratio: 0.1,
    };
    let all = test.eval_starts();
    let stride = all.len().div_ceil(args.eval_windows.max(1)).max(1);
    let interim: Vec<u32> = all.iter().step_by(stride).copied().collect();
    println!(
        "training a char-level LM as a layer-graph spec on the CPU engine ({} blocks, {} heads, width {}, context {}, {} parameters, vocab {}): \
         {} train / {} held-out characters, batch {}",
        spec.layers,
        spec.heads,
        spec.width,
        spec.context,
        spec.param_count(),
        spec.vocab,
        train.tokens.len(),
        test.tokens.len(),
        args.batch
    );
    let started = Instant::now();
    let mut compute = Duration::ZERO;
    let mut curve = Vec::new();
    for step in 0..steps {
        let starts = tokens::step_windows(train.windows(), args.batch, args.seed, step);
        let (ids, targets) = train.gather(&starts);
        let t0 = Instant::now();
        engine.load(&params)?;
        let out = engine.step(&features(&ids), &targets)?;
        opt.step_scaled(
            &mut params,
            &out.grad,
            schedule.factor(step, steps),
            args.weight_decay,
        );
        compute += t0.elapsed();
        let done = step + 1;
        if done % args.eval_every.max(1) == 0 || done == steps {
            let last = done == steps;
            engine.load(&params)?;
            let loss = held_out(&mut engine, &test, if last { &all } else { &interim })?;
            curve.push((done, loss));
            println!(
                "step {done:>5}  train loss {:.4}  held-out {:.4} nats/char{}  {:.1} ms/step  {:.0}s",
                out.loss,
                loss,
                if last { " (all held-out text)" } else { "" },
                compute.as_secs_f64() * 1e3 / done as f64,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let vocab = tokens::CharVocab::from_strings(ds.vocab.as_deref().unwrap_or_default())
        .context("the corpus vocabulary is not char-level")?;
    let prompt = vocab.encode("\n")?;
    let text = sample::generate(&spec, &params, &prompt, 300, 0.8, args.seed)?;
    println!("sample (temperature 0.8):\n{}", vocab.decode(&text));
    println!(
        "{}",
        serde_json::json!({
            "model": "char-lm",
            "params": spec.param_count(),
            "steps": steps,
            "batch": args.batch,
            "ms_per_step": compute.as_secs_f64() * 1e3 / steps.max(1) as f64,
            "held_out_nats_per_char": curve,
        })
    );
    if let Some(path) = &args.save {
        let ck = LmCheckpoint {
            spec,
            params,
            vocab: ds.vocab.clone(),
            step: steps,
        };
        std::fs::write(path, to_safetensors(&ck)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
