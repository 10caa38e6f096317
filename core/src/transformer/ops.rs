//! The per-position pieces of a transformer, forward and backward, as plain loops over `[N, C]` row-major
//! activations (`N = B·T` positions): token and positional embeddings, bias and residual adds. (Layer norm and
//! GELU are the reference's, `crate::reference::{norm, act}`.)
//!
//! These are cheap (O(N·C)) next to the matmuls, so the reference and the fast path share them; sums run in f64.

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
