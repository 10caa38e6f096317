//! Text generation from a trained LM: repeatedly run the model over the last `context` tokens and draw the next
//! token from `softmax(logits / temperature)` (arg-max at temperature 0), with the shared seeded RNG so a seed
//! gives the same text on every platform.

use super::fast::Fast;
use super::{LmBatchError, LmSpec, logits};
use crate::rng::SplitMix64;

/// Appends `tokens` sampled tokens to `prompt` and returns only the new ones. An empty prompt starts from token 0.
pub fn generate(
    spec: &LmSpec,
    params: &[f32],
    prompt: &[u32],
    tokens: usize,
    temperature: f32,
    seed: u64,
) -> Result<Vec<u32>, LmBatchError> {
    let context = spec.context as usize;
    let v = spec.vocab as usize;
    let mut seq: Vec<u32> = if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    };
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        let window = &seq[seq.len().saturating_sub(context)..];
        let z = logits(&Fast, spec, params, window, 1, window.len())?;
        let last = &z[(window.len() - 1) * v..window.len() * v];
        let next = draw(last, temperature, &mut rng);
        out.push(next);
        seq.push(next);
    }
    Ok(out)
}

/// One draw from `softmax(logits / temperature)`; the first arg-max when `temperature ≤ 0`.
pub fn draw(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> u32 {
    let argmax = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &z)| {
            if z > best.1 { (i, z) } else { best }
        })
        .0;
    if temperature <= 0.0 || !temperature.is_finite() {
        return argmax as u32;
    }
    let max = logits[argmax] as f64;
    let w: Vec<f64> = logits
        .iter()
        .map(|&z| ((z as f64 - max) / temperature as f64).exp())
        .collect();
    let mut u = rng.next_f64() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        if u < *wi {
            return i as u32;
        }
        u -= wi;
    }
    argmax as u32
}
