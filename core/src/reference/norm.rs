//! Plain-loop layer norm and group norm, forward and backward (statistics in f64, biased variance).
//!
//! For a set of `m` values normalised together: `μ = Σx / m`, `σ² = Σ(x − μ)² / m`, `r = 1 / √(σ² + eps)`,
//! `x̂ = (x − μ)·r`, `y = γ ⊙ x̂ + β`. Backward, with `g = dy ⊙ γ`:
//! `dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))`, `dγ = Σ dy ⊙ x̂`, `dβ = Σ dy` (summed over every set and sample).
//! Outputs are overwritten.

use crate::spec::GroupNormDims;

/// Mean and `1 / √(var + eps)` of `values`.
fn stats(values: impl Iterator<Item = f32> + Clone, eps: f32) -> (f64, f64) {
    let m = values.clone().count() as f64;
    let mean = values.clone().map(f64::from).sum::<f64>() / m;
    let var = values.map(|v| (v as f64 - mean).powi(2)).sum::<f64>() / m;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// Layer norm over consecutive vectors of `dim` values (`x.len()` a multiple of `dim`; one per sample for a flat
/// activation): `y[v, j] = γ[j] · x̂[v, j] + β[j]`, `gamma` and `beta` `[dim]`.
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dim: usize,
    eps: f32,
    y: &mut [f32],
) {
    assert!(
        x.len().is_multiple_of(dim)
            && y.len() == x.len()
            && gamma.len() == dim
            && beta.len() == dim,
        "layer_norm operand lengths"
    );
    for (xs, ys) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let (mean, r) = stats(xs.iter().copied(), eps);
        for j in 0..dim {
            ys[j] = (gamma[j] as f64 * (xs[j] as f64 - mean) * r + beta[j] as f64) as f32;
        }
    }
}

/// Gradients of [`layer_norm_forward`]: `dx` like `x`, `dgamma` and `dbeta` `[dim]`.
#[allow(clippy::too_many_arguments)] // the forward operands, the incoming gradient and three outputs
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dim: usize,
    eps: f32,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert!(
        x.len().is_multiple_of(dim)
            && dy.len() == x.len()
            && dx.len() == x.len()
            && gamma.len() == dim,
        "layer_norm operand lengths"
    );
    assert!(
        dgamma.len() == dim && dbeta.len() == dim,
        "layer_norm parameter gradient lengths"
    );
    let (mut dg, mut db) = (vec![0.0f64; dim], vec![0.0f64; dim]);
    for ((xs, dys), dxs) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let (mean, r) = stats(xs.iter().copied(), eps);
        let xhat: Vec<f64> = xs.iter().map(|v| (*v as f64 - mean) * r).collect();
        let g: Vec<f64> = (0..dim).map(|j| dys[j] as f64 * gamma[j] as f64).collect();
        let mean_g = g.iter().sum::<f64>() / dim as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / dim as f64;
        for j in 0..dim {
            dxs[j] = (r * (g[j] - mean_g - xhat[j] * mean_gx)) as f32;
            dg[j] += dys[j] as f64 * xhat[j];
            db[j] += dys[j] as f64;
        }
    }
    for j in 0..dim {
        dgamma[j] = dg[j] as f32;
        dbeta[j] = db[j] as f32;
    }
}

/// Group norm over `[batch, channels, hw]`: each sample's group `g` (channels `g·C/G .. (g+1)·C/G`) is
/// normalised over its `(C/G)·hw` values, then `y[n, c, i] = γ[c] · x̂[n, c, i] + β[c]`; `gamma`, `beta` `[C]`.
pub fn group_norm_forward(
    d: &GroupNormDims,
    batch: usize,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    assert!(
        x.len() == batch * d.len()
            && y.len() == x.len()
            && gamma.len() == d.channels
            && beta.len() == d.channels,
        "group_norm operand lengths"
    );
    let group = d.channels / d.groups * d.hw;
    let cg = d.channels / d.groups;
    for (gi, (xs, ys)) in x
        .chunks_exact(group)
        .zip(y.chunks_exact_mut(group))
        .enumerate()
    {
        let (mean, r) = stats(xs.iter().copied(), eps);
        let c0 = (gi % d.groups) * cg;
        for (i, (xv, yv)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            let c = c0 + i / d.hw;
            *yv = (gamma[c] as f64 * (*xv as f64 - mean) * r + beta[c] as f64) as f32;
        }
    }
}

/// Gradients of [`group_norm_forward`]: `dx` like `x`, `dgamma` and `dbeta` `[C]`.
#[allow(clippy::too_many_arguments)] // the forward operands, the incoming gradient and three outputs
pub fn group_norm_backward(
    d: &GroupNormDims,
    batch: usize,
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert!(
        x.len() == batch * d.len()
            && dy.len() == x.len()
            && dx.len() == x.len()
            && gamma.len() == d.channels,
        "group_norm operand lengths"
    );
    assert!(
        dgamma.len() == d.channels && dbeta.len() == d.channels,
        "group_norm parameter gradient lengths"
    );
    let group = d.channels / d.groups * d.hw;
    let cg = d.channels / d.groups;
    let (mut dg, mut db) = (vec![0.0f64; d.channels], vec![0.0f64; d.channels]);
    for (gi, ((xs, dys), dxs)) in x
        .chunks_exact(group)
        .zip(dy.chunks_exact(group))
        .zip(dx.chunks_exact_mut(group))
        .enumerate()
    {
        let (mean, r) = stats(xs.iter().copied(), eps);
        let c0 = (gi % d.groups) * cg;
        let xhat: Vec<f64> = xs.iter().map(|v| (*v as f64 - mean) * r).collect();
        let g: Vec<f64> = (0..group)
            .map(|i| dys[i] as f64 * gamma[c0 + i / d.hw] as f64)
            .collect();
        let mean_g = g.iter().sum::<f64>() / group as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / group as f64;
        for i in 0..group {
            dxs[i] = (r * (g[i] - mean_g - xhat[i] * mean_gx)) as f32;
            dg[c0 + i / d.hw] += dys[i] as f64 * xhat[i];
            db[c0 + i / d.hw] += dys[i] as f64;
        }
    }
    for c in 0..d.channels {
        dgamma[c] = dg[c] as f32;
        dbeta[c] = db[c] as f32;
    }
}
