// Layer / group normalisation forward, one normalised row per workgroup:
//   per row r (D consecutive values): μ = Σ x / D;  σ² = Σ (x − μ)² / D (two passes);  ρ = 1 / sqrt(σ² + eps)
//   y[r, e] = (x[r, e] − μ) · ρ · gamma[k] + beta[k],  k = ((r mod G)·D + e) / P
// The affine index k covers both layers: layer_norm is G = 1, P = 1 (k = e, one gamma per feature), or P = H·W
// for a per-channel affine over a sample's C·H·W values; group_norm over NCHW is rows = N·G, D = (C / G)·H·W,
// P = H·W, so k is the channel. stats[r] = (μ, ρ) is kept for the backward kernels.
//
// Layout: x and y are [rows, D] row-major from element 0; gamma and beta are consecutive floats at elements
// gamma_off and beta_off of the parameter buffer; stats is [rows, 2] from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `NormParams` in web-worker/src/gpu/kernels/norm.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read_write  y: array<f32>  (must not alias x)
//   3  storage, read        params: array<f32>  (flat model parameters)
//   4  storage, read_write  stats: array<f32>
//
// Dispatch: one workgroup of 256 invocations per row, grid spread over x and y (row = wid.y · num_workgroups.x +
// wid.x); each invocation strides over the row and two tree reductions in 1 KiB of workgroup memory give Σ x and
// Σ (x − μ)². Rows ≥ rows only take part in the barriers. Any rows and D work.

struct Params {
    rows: u32,
    len: u32,
    groups: u32,
    plane: u32,
    gamma_off: u32,
    beta_off: u32,
    eps: f32,
    _pad0: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;

var<workgroup> partial: array<f32, WG>;

// Sum of every invocation's `v` over the workgroup (all invocations must call it).
fn reduce(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wid.y * groups.x + wid.x;
    let live = r < p.rows;
    let base = r * p.len;
    var s = 0.0;
    if (live) {
        for (var e = lid; e < p.len; e += WG) {
            s += x[base + e];
        }
    }
    let mean = reduce(lid, s) / f32(p.len);
    var q = 0.0;
    if (live) {
        for (var e = lid; e < p.len; e += WG) {
            let d = x[base + e] - mean;
            q += d * d;
        }
    }
    let rstd = inverseSqrt(reduce(lid, q) / f32(p.len) + p.eps);
    if (!live) {
        return;
    }
    let shift = (r % p.groups) * p.len;
    for (var e = lid; e < p.len; e += WG) {
        let k = (shift + e) / p.plane;
        y[base + e] = (x[base + e] - mean) * rstd * params[p.gamma_off + k] + params[p.beta_off + k];
    }
    if (lid == 0u) {
        stats[2u * r] = mean;
        stats[2u * r + 1u] = rstd;
    }
}
