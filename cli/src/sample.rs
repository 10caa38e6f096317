//! `starling job sample`: generates text from an LM checkpoint on the CPU — the job's latest checkpoint from the
//! coordinator (its layer-graph export), or a local file written by `starling train --model char-lm --save` or
//! `starling job download`. Text needs the vocabulary in the checkpoint's `starling.vocab` metadata.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Args;

use starling_core::tokens::CharVocab;
use starling_core::transformer::export::from_safetensors;
use starling_core::transformer::sample::generate;

use crate::client::Client;

/// `starling job sample`.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// The job whose latest checkpoint to sample (downloaded with the owner token).
    #[arg(required_unless_present = "checkpoint")]
    pub id: Option<u64>,
    /// Sample a local checkpoint file instead of a job's.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Text the sample continues (each character must be in the model's vocabulary).
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature; 0 takes the most likely token every time.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Seed of the draws (the same seed gives the same text).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Loads the checkpoint, encodes the prompt, prints the prompt followed by the generated text.
pub fn run(client: &Client, has_token: bool, args: &SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.temperature.is_finite() && args.temperature >= 0.0,
        "--temperature must be a finite number ≥ 0"
    );
    let bytes = match (&args.checkpoint, args.id) {
        (Some(path), _) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, Some(id)) => {
            if !has_token {
                bail!(
                    "sampling a job needs an owner token: --token or STARLING_TOKEN (or pass --checkpoint FILE)"
                );
            }
            let mut buf = Vec::new();
            match client.download(
                &format!("/api/v1/jobs/{id}/checkpoint?which=latest"),
                &mut buf,
            )? {
                Ok(_) => buf,
                Err(r) => bail!("job {id} checkpoint: {}", r.error_message()),
            }
        }
        (None, None) => bail!("give a job id or --checkpoint FILE"),
    };
    let ck = from_safetensors(&bytes)?;
    let vocab = ck
        .vocab
        .as_deref()
        .and_then(CharVocab::from_strings)
        .context("the checkpoint has no char-level vocabulary (starling.vocab), so its tokens cannot be shown as text")?;
    let prompt = vocab.encode(&args.prompt)?;
    let out = generate(
        &ck.spec,
        &ck.params,
        &prompt,
        args.tokens,
        args.temperature,
        args.seed,
    )?;
    println!("{}{}", args.prompt, vocab.decode(&out));
    Ok(())
}
