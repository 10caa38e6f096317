// Causal multi-head self-attention core, forward, with keys and values tiled through workgroup memory; the math,
// the summation order and the output are those of attention_forward.wgsl (D = C / H):
//   s_ij = (q_i · k_j) / √D  for j ≤ i;   p_ij = exp(s_ij − max_j s_ij) / Σ_j exp(s_ij − max_j s_ij);  p_ij = 0 for j > i
//   y_i[h·D + d] = Σ_{j ≤ i} p_ij · v_j[d]
// where q_i, k_j, v_j are the D-wide slices of rows b·T + i (resp. j) of qkv at columns h·D, C + h·D, 2C + h·D.
// The mask is the loop bound j ≤ i: no query reads a later key or value.
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
// Dispatch: one workgroup of 64 invocations per (b, h, block of 64 queries): B·H·ceil(T / 64) workgroups spread
// over x and y (w = wid.y · num_workgroups.x + wid.x; query block w % ceil(T/64), (b·H + h) = w / ceil(T/64)),
// invocation `lid` owning query i = block·64 + lid (queries ≥ T only help stage tiles). The block's keys
// 0 .. min(block·64 + 64, T) are staged 32 at a time (32 × D floats, D ≤ 64: 8 KiB of workgroup memory) — first
// the keys, for the scores, then the values, for y — so each key and value is read from storage once per block
// instead of once per query, and a row's probabilities are read once per key instead of once per key and column.
// Only for head widths D ≤ 64 (the host falls back to attention_forward.wgsl above that).
// The engine runs the per-row kernel: on lavapipe this one measured 0.55–0.75× its speed
// (web-worker/src/gpu/kernels/attention.rs, examples/attention_bench.rs).

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

// Queries per workgroup (one per invocation).
const QB: u32 = 64u;
// Keys (or values) per staged tile.
const KT: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// KT rows of D values (row jj at jj·D): a tile of keys, then of values.
var<workgroup> tile: array<f32, 2048>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = p.seq;
    let blocks = (t + QB - 1u) / QB;
    let w = wid.y * groups.x + wid.x;
    // Uniform across the workgroup: every barrier below is reached by all of its invocations or none.
    if (w >= p.batch * p.heads * blocks || p.width / p.heads > 64u) {
        return;
    }
    let block = w % blocks;
    let bh = w / blocks;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let c = p.width;
    let hd = c / p.heads;
    let c3 = 3u * c;
    let i = block * QB + lid;
    let live = i < t;
    let row = (bh * t + i) * t;
    let seq0 = b * t * c3 + h * hd;
    var q: array<f32, 64>;
    if (live) {
        for (var d = 0u; d < hd; d++) {
            q[d] = qkv[seq0 + i * c3 + d];
        }
    }
    // Keys the block's last query sees, and the tiles that hold them.
    let keys = min(block * QB + QB, t);
    let tiles = (keys + KT - 1u) / KT;
    var mx = -3.402823e38;
    for (var kt = 0u; kt < tiles; kt++) {
        let j0 = kt * KT;
        let n = min(KT, keys - j0);
        for (var e = lid; e < n * hd; e += QB) {
            tile[e] = qkv[seq0 + (j0 + e / hd) * c3 + c + e % hd];
        }
        workgroupBarrier();
        if (live && i >= j0) {
            let m = min(n, i + 1u - j0);
            for (var jj = 0u; jj < m; jj++) {
                var s = 0.0;
                for (var d = 0u; d < hd; d++) {
                    s += q[d] * tile[jj * hd + d];
                }
                s *= p.scale;
                probs[row + j0 + jj] = s;
                mx = max(mx, s);
            }
        }
        workgroupBarrier();
    }
    if (live) {
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
    }
    var acc: array<f32, 64>;
    for (var kt = 0u; kt < tiles; kt++) {
        let j0 = kt * KT;
        let n = min(KT, keys - j0);
        for (var e = lid; e < n * hd; e += QB) {
            tile[e] = qkv[seq0 + (j0 + e / hd) * c3 + 2u * c + e % hd];
        }
        workgroupBarrier();
        if (live && i >= j0) {
            let m = min(n, i + 1u - j0);
            for (var jj = 0u; jj < m; jj++) {
                let pj = probs[row + j0 + jj];
                for (var d = 0u; d < hd; d++) {
                    acc[d] += pj * tile[jj * hd + d];
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let y0 = (b * t + i) * c + h * hd;
        for (var d = 0u; d < hd; d++) {
            y[y0 + d] = acc[d];
        }
    }
}
