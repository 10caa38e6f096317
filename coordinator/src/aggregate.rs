//! Robust aggregation: how a step's accepted micro-batch gradients become one gradient.
//!
//! Verification already keeps every single wrong result out; aggregation is the second line, against what
//! verification cannot see (a colluding pair that agrees on a wrong result, a poisoned but consistent data shard).
//! `mean` is the row-weighted mean (exact mini-batch SGD); `trimmed-mean` drops, coordinate by coordinate, the
//! largest and smallest `max(1, ⌊n/10⌋)` values when there are at least 3 parts; `median` takes the coordinate-wise
//! median. `clip_norm` first scales each part down to at most that L2 norm. Pure functions, no state.

use serde::{Deserialize, Serialize};

/// A job's aggregation rule (`Hyper.aggregate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    #[default]
    Mean,
    TrimmedMean,
    Median,
}

/// Combines `(rows, gradient)` parts of equal length under `rule`, after clipping each to `clip_norm`.
pub fn combine(parts: &[(u32, &[f32])], rule: Rule, clip_norm: Option<f32>) -> Vec<f32> {
    let clipped: Vec<(u32, std::borrow::Cow<'_, [f32]>)> = parts
        .iter()
        .map(|(r, g)| (*r, clip(g, clip_norm)))
        .collect();
    let views: Vec<(u32, &[f32])> = clipped.iter().map(|(r, g)| (*r, g.as_ref())).collect();
    match rule {
        Rule::Mean => starling_core::schedule::weighted_mean(&views),
        Rule::TrimmedMean if views.len() >= 3 => coordinatewise(&views, |col| {
            let k = (col.len() / 10).max(1);
            let kept = &col[k..col.len() - k];
            kept.iter().map(|v| *v as f64).sum::<f64>() as f32 / kept.len() as f32
        }),
        Rule::TrimmedMean => starling_core::schedule::weighted_mean(&views),
        Rule::Median => coordinatewise(&views, |col| {
            let n = col.len();
            if n % 2 == 1 {
                col[n / 2]
            } else {
                (col[n / 2 - 1] + col[n / 2]) / 2.0
            }
        }),
    }
}

/// `g` scaled down to L2 norm `max` when it is longer (norm accumulated in f64); unchanged otherwise.
pub fn clip(g: &[f32], max: Option<f32>) -> std::borrow::Cow<'_, [f32]> {
    let Some(max) = max else { return g.into() };
    let norm = g
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt();
    if norm <= max as f64 || norm == 0.0 {
        return g.into();
    }
    let s = (max as f64 / norm) as f32;
    g.iter().map(|v| v * s).collect::<Vec<f32>>().into()
}

/// Applies `pick` to each coordinate's values, sorted ascending (total order; inputs are finite after validation).
fn coordinatewise(parts: &[(u32, &[f32])], pick: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let len = parts.first().map_or(0, |(_, g)| g.len());
    let mut col = vec![0.0f32; parts.len()];
    (0..len)
        .map(|i| {
            for (c, (_, g)) in col.iter_mut().zip(parts) {
                *c = g[i];
            }
            col.sort_unstable_by(f32::total_cmp);
            pick(&col)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rule: Rule, clip: Option<f32>, parts: &[Vec<f32>]) -> Vec<f32> {
        let views: Vec<(u32, &[f32])> = parts.iter().map(|g| (32, g.as_slice())).collect();
        combine(&views, rule, clip)
    }

    #[test]
    fn mean_is_the_row_weighted_mean() {
        let (a, b) = (vec![1.0f32, 2.0], vec![3.0f32, 6.0]);
        assert_eq!(
            combine(&[(1, &a), (3, &b)], Rule::Mean, None),
            vec![2.5, 5.0]
        );
    }

    #[test]
    fn trimmed_mean_and_median_ignore_one_outlier() {
        let mut parts: Vec<Vec<f32>> = (0..4).map(|i| vec![1.0 + i as f32 * 0.1, -1.0]).collect();
        parts.push(vec![1e6, 1e6]); // a poisoned part
        let t = run(Rule::TrimmedMean, None, &parts);
        assert!(
            (t[0] - 1.2).abs() < 1e-5 && (t[1] + 1.0).abs() < 1e-5,
            "{t:?}"
        ); // drops 1 top and 1 bottom of 5
        let m = run(Rule::Median, None, &parts);
        assert_eq!(m, vec![1.2, -1.0]);
        assert!(
            run(Rule::Mean, None, &parts)[0] > 1e5,
            "the mean is what robust rules protect against"
        );
        // Even counts: the median averages the middle two.
        assert_eq!(
            run(
                Rule::Median,
                None,
                &[vec![1.0], vec![2.0], vec![4.0], vec![8.0]]
            ),
            vec![3.0]
        );
        // Fewer than 3 parts: nothing to trim, the mean.
        assert_eq!(
            run(Rule::TrimmedMean, None, &[vec![1.0], vec![3.0]]),
            vec![2.0]
        );
    }

    #[test]
    fn clipping_bounds_each_part_norm() {
        let big = vec![30.0f32, 40.0]; // norm 50
        assert_eq!(clip(&big, Some(5.0)).as_ref(), &[3.0, 4.0]);
        assert_eq!(clip(&big, Some(100.0)).as_ref(), big.as_slice());
        assert_eq!(clip(&big, None).as_ref(), big.as_slice());
        assert_eq!(
            run(Rule::Mean, Some(5.0), &[big.clone(), vec![0.0, 0.0]]),
            vec![1.5, 2.0]
        );
    }
}
