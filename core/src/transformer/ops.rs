//! The per-position layers of a transformer, forward and backward, as plain loops over `[N, C]` row-major
//! activations (`N = B·T` positions): token and positional embeddings, layer norm, GELU, bias and residual adds.
//!
//! These are cheap (O(N·C)) next to the matmuls, so the reference and the fast path share them; statistics are
//! summed in f64 so both agree to rounding.

/// `x[n] = table[ids[n]]`: `[N, C]` from a `[vocab, C]` table. Ids are checked by the caller.
pub fn embed(ids: &[u32], table: &[f32], width: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(ids.len() * width);
    for &id in ids {
        let r = id as usize * width;
        x.extend_from_slice(&table[r..r + width]);
    }
    x
}

/// `dtable[ids[n]] += dx[n]`.
pub fn embed_backward(ids: &[u32], dx: &[f32], dtable: &mut [f32]) {
    let width = dx.len() / ids.len().max(1);
    for (&id, row) in ids.iter().zip(dx.chunks_exact(width)) {
        let r = id as usize * width;
        for (g, d) in dtable[r..r + width].iter_mut().zip(row) {
            *g += *d;
        }
    }
}

/// `x[b, t] += pos[t]` for sequences of `seq` positions (`pos` holds at least `seq` rows).
pub fn add_positional(x: &mut [f32], pos: &[f32], seq: usize) {
    let width = pos.len() / seq;
    for (n, row) in x.chunks_exact_mut(width).enumerate() {
        let t = n % seq;
        for (v, p) in row.iter_mut().zip(&pos[t * width..(t + 1) * width]) {
            *v += *p;
        }
    }
}

/// `dpos[t] += Σ_b dx[b, t]` (summed in f64).
pub fn positional_backward(dx: &[f32], seq: usize, dpos: &mut [f32]) {
    let width = dpos.len() / seq;
    let rows = dx.len() / width;
    for t in 0..seq {
        for c in 0..width {
            let s: f64 = (t..rows)
                .step_by(seq)
                .map(|n| dx[n * width + c] as f64)
                .sum();
            dpos[t * width + c] += s as f32;
        }
    }
}

/// Per-row statistics a layer norm keeps for its backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct NormCache {
    pub mean: Vec<f32>,
    /// `1 / √(var + eps)`, biased variance.
    pub rstd: Vec<f32>,
}

/// `y = γ ⊙ (x − mean) / √(var + eps) + β` over each row of `γ.len()` values.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, NormCache) {
    let width = gamma.len();
    let rows = x.len() / width;
    let mut y = vec![0.0f32; x.len()];
    let mut cache = NormCache {
        mean: Vec::with_capacity(rows),
        rstd: Vec::with_capacity(rows),
    };
    for (xr, yr) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
        let mean = xr.iter().map(|v| *v as f64).sum::<f64>() / width as f64;
        let var = xr.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for j in 0..width {
            yr[j] = (((xr[j] as f64 - mean) * rstd) as f32) * gamma[j] + beta[j];
        }
        cache.mean.push(mean as f32);
        cache.rstd.push(rstd as f32);
    }
    (y, cache)
}

/// Backward of [`layer_norm`]: adds the input gradient to `dx` (the residual stream's) and `Σ dy·x̂`, `Σ dy` to
/// the `γ` and `β` gradients at `(gamma_off, beta_off)` of `grad`:
/// `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` with `dx̂ = dy ⊙ γ`.
pub fn layer_norm_backward(
    x: &[f32],
    cache: &NormCache,
    gamma: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    grad: &mut [f32],
    (gamma_off, beta_off): (usize, usize),
) {
    let width = gamma.len();
    let mut dgamma = vec![0.0f64; width];
    let mut dbeta = vec![0.0f64; width];
    for (r, ((xr, dyr), dxr)) in x
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .zip(dx.chunks_exact_mut(width))
        .enumerate()
    {
        let (mean, rstd) = (cache.mean[r] as f64, cache.rstd[r] as f64);
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for j in 0..width {
            let xhat = (xr[j] as f64 - mean) * rstd;
            let dxhat = dyr[j] as f64 * gamma[j] as f64;
            s1 += dxhat;
            s2 += dxhat * xhat;
            dgamma[j] += dyr[j] as f64 * xhat;
            dbeta[j] += dyr[j] as f64;
        }
        let (m1, m2) = (s1 / width as f64, s2 / width as f64);
        for j in 0..width {
            let xhat = (xr[j] as f64 - mean) * rstd;
            let dxhat = dyr[j] as f64 * gamma[j] as f64;
            dxr[j] += (rstd * (dxhat - m1 - xhat * m2)) as f32;
        }
    }
    for j in 0..width {
        grad[gamma_off + j] += dgamma[j] as f32;
        grad[beta_off + j] += dbeta[j] as f32;
    }
}

const GELU_A: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_B: f64 = 0.044_715;

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v * (1.0 + (GELU_A * (v + GELU_B * v * v * v)).tanh())) as f32
        })
        .collect()
}

/// `dx = dy ⊙ gelu'(x)`.
pub fn gelu_backward(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &d)| {
            let v = v as f64;
            let t = (GELU_A * (v + GELU_B * v * v * v)).tanh();
            let dt = GELU_A * (1.0 + 3.0 * GELU_B * v * v);
            (d as f64 * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * dt)) as f32
        })
        .collect()
}

/// `y[r, j] += b[j]`.
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, bj) in row.iter_mut().zip(b) {
            *v += *bj;
        }
    }
}

/// `out[j] += Σ_r dy[r, j]` (summed in f64).
pub fn add_col_sum(dy: &[f32], out: &mut [f32]) {
    let cols = out.len();
    let mut acc = vec![0.0f64; cols];
    for row in dy.chunks_exact(cols) {
        for (a, d) in acc.iter_mut().zip(row) {
            *a += *d as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o += a as f32;
    }
}

/// `x += a` (a residual connection).
pub fn add_into(x: &mut [f32], a: &[f32]) {
    for (v, d) in x.iter_mut().zip(a) {
        *v += *d;
    }
}
