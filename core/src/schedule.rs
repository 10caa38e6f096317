//! The deterministic training schedule shared by the coordinator and the single-process trainer: which rows
//! form step `s`'s global batch and how it splits into micro-batches. A pure function of (seed, step), so a
//! restarted coordinator re-derives exactly the batch it was working on.

use crate::rng::SplitMix64;

/// The rows of step `step`'s global batch: epoch `e = step / steps_per_epoch` uses a permutation seeded by
/// `(seed, e)`, and consecutive steps take consecutive slices of it (the remainder of an epoch is dropped).
pub fn step_rows(train_rows: usize, global_batch: usize, seed: u64, step: u64) -> Vec<u32> {
    let batch = global_batch.min(train_rows).max(1);
    let steps_per_epoch = (train_rows / batch).max(1) as u64;
    let (epoch, within) = (step / steps_per_epoch, (step % steps_per_epoch) as usize);
    let mut order: Vec<u32> = (0..train_rows as u32).collect();
    SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut order);
    order[within * batch..(within + 1) * batch].to_vec()
}

/// Splits a global batch into micro-batches of at most `micro_batch` rows.
pub fn micro_batches(rows: &[u32], micro_batch: usize) -> Vec<Vec<u32>> {
    rows.chunks(micro_batch.max(1))
        .map(<[u32]>::to_vec)
        .collect()
}

/// Row-weighted mean of micro-batch gradients: equals the gradient of the mean loss over the whole global batch.
pub fn weighted_mean(parts: &[(u32, &[f32])]) -> Vec<f32> {
    let total: u32 = parts.iter().map(|(r, _)| *r).sum();
    let mut out = vec![0.0f32; parts.first().map_or(0, |(_, g)| g.len())];
    for (rows, g) in parts {
        let w = *rows as f32 / total.max(1) as f32;
        for (o, v) in out.iter_mut().zip(g.iter()) {
            *o += w * v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_visits_every_row_once_and_steps_are_reproducible() {
        let mut seen: Vec<u32> = (0..10).flat_map(|s| step_rows(100, 10, 7, s)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(step_rows(100, 10, 7, 13), step_rows(100, 10, 7, 13));
        assert_ne!(
            step_rows(100, 10, 7, 3),
            step_rows(100, 10, 7, 13),
            "epochs are reshuffled"
        );
    }
}
