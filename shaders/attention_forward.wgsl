// Causal multi-head self-attention core, forward, per sequence b, head h and query position i (D = C / H):
//   s_ij = (q_i · k_j) / √D  for j ≤ i;   p_ij = exp(s_ij − max_j s_ij) / Σ_j exp(s_ij − max_j s_ij);  p_ij = 0 for j > i
//   y_i[h·D + d] = Σ_{j ≤ i} p_ij · v_j[d]
// where q_i, k_j, v_j are the D-wide slices of rows b·T + i (resp. j) of qkv at columns h·D, C + h·D, 2C + h·D
// (starling_core::transformer::Kernels). The mask is the loop bound j ≤ i: no query reads a later key or value.
//
// Layout: qkv is [B·T, 3C] row-major, y is [B·T, C] row-major, probs is [B, H, T, T] row-major (row (b·H + h)·T + i
// holds p_i·, zeros past the diagonal; the backward kernels read it), all from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `AttnParams` in web-worker/src/gpu/kernels/attention.rs)
//   1  storage, read        qkv: array<f32>
//   2  storage, read_write  probs: array<f32>
//   3  storage, read_write  y: array<f32>
//
// Dispatch: one invocation per (b, h, i) row, flat index r = (b·H + h)·T + i, workgroup_size(64),
// ceil(B·H·T / 64) workgroups spread over x and y (r = (wid.y · num_workgroups.x + wid.x) · 64 + lid); rows ≥ B·H·T
// do nothing. Neighbouring invocations are neighbouring queries of one head, so they read the same k_j, v_j
// together. Scores are staged in the row's slice of probs (any T works, no workgroup memory).

struct Params {
    batch: u32,
    seq: u32,
    width: u32,
    heads: u32,
    // 1 / √D, rounded once on the host.
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = (wid.y * groups.x + wid.x) * 64u + lid;
    let t = p.seq;
    if (r >= p.batch * p.heads * t) {
        return;
    }
    let i = r % t;
    let bh = r / t;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let c = p.width;
    let hd = c / p.heads;
    let c3 = 3u * c;
    let q0 = (b * t + i) * c3 + h * hd;
    let row = r * t;
    var mx = -3.402823e38;
    for (var j = 0u; j <= i; j++) {
        let k0 = (b * t + j) * c3 + c + h * hd;
        var s = 0.0;
        for (var d = 0u; d < hd; d++) {
            s += qkv[q0 + d] * qkv[k0 + d];
        }
        s *= p.scale;
        probs[row + j] = s;
        mx = max(mx, s);
    }
    var sum = 0.0;
    for (var j = 0u; j <= i; j++) {
        let e = exp(probs[row + j] - mx);
        probs[row + j] = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for (var j = 0u; j <= i; j++) {
        probs[row + j] *= inv;
    }
    for (var j = i + 1u; j < t; j++) {
        probs[row + j] = 0.0;
    }
    let y0 = (b * t + i) * c + h * hd;
    let v0 = b * t * c3 + 2u * c + h * hd;
    for (var d = 0u; d < hd; d++) {
        var acc = 0.0;
        for (var j = 0u; j <= i; j++) {
            acc += probs[row + j] * qkv[v0 + j * c3 + d];
        }
        y[y0 + d] = acc;
    }
}
