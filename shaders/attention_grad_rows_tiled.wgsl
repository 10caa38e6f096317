// Causal attention core, backward, part 1 of 2 (query rows), with values and keys tiled through workgroup memory;
// the math, the summation order and the output are those of attention_grad_rows.wgsl (D = C / H, q_i, k_j, v_j as
// in attention_forward.wgsl), from dy = ∂loss/∂y [B·T, C] and the forward's probabilities p:
//   dp_ij = dy_i · v_j;   ds_ij = p_ij · (dp_ij − Σ_{j' ≤ i} p_ij' · dp_ij')   for j ≤ i, 0 for j > i
//   dq_i[d] = (Σ_{j ≤ i} ds_ij · k_j[d]) / √D
// ds is kept for part 2 (attention_grad_cols_tiled.wgsl: dk, dv); dq goes to the q columns of dqkv (overwritten).
//
// Layout: qkv and dqkv are [B·T, 3C], dy is [B·T, C], probs and ds are [B, H, T, T], all row-major from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `AttnParams` in web-worker/src/gpu/kernels/attention.rs)
//   1  storage, read        qkv: array<f32>
//   2  storage, read        probs: array<f32>
//   3  storage, read        dy: array<f32>
//   4  storage, read_write  ds: array<f32>
//   5  storage, read_write  dqkv: array<f32>  (this kernel writes only the q columns)
//
// Dispatch: one workgroup of 64 invocations per (b, h, block of 64 queries), B·H·ceil(T / 64) workgroups spread
// over x and y as in attention_forward_tiled.wgsl; invocation `lid` owns query i = block·64 + lid. The keys
// 0 .. min(block·64 + 64, T) are staged 32 at a time (32 × D floats, D ≤ 64: 8 KiB), values first (for dp), then
// keys (for dq). Only for head widths D ≤ 64 (the host falls back to attention_grad_rows.wgsl above that).
// The engine runs the per-row kernel: on lavapipe this one measured 0.55–0.75× its speed
// (web-worker/src/gpu/kernels/attention.rs, examples/attention_bench.rs).

struct Params {
    batch: u32,
    seq: u32,
    width: u32,
    heads: u32,
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
@group(0) @binding(2) var<storage, read> probs: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> ds: array<f32>;
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;

// KT rows of D values (row jj at jj·D): a tile of values, then of keys.
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
    var g: array<f32, 64>;
    if (live) {
        let dy0 = (b * t + i) * c + h * hd;
        for (var d = 0u; d < hd; d++) {
            g[d] = dy[dy0 + d];
        }
    }
    let keys = min(block * QB + QB, t);
    let tiles = (keys + KT - 1u) / KT;
    var dot = 0.0;
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
                var dp = 0.0;
                for (var d = 0u; d < hd; d++) {
                    dp += g[d] * tile[jj * hd + d];
                }
                ds[row + j0 + jj] = dp;
                dot += probs[row + j0 + jj] * dp;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var j = 0u; j <= i; j++) {
            ds[row + j] = probs[row + j] * (ds[row + j] - dot);
        }
        for (var j = i + 1u; j < t; j++) {
            ds[row + j] = 0.0;
        }
    }
    var acc: array<f32, 64>;
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
                let sj = ds[row + j0 + jj];
                for (var d = 0u; d < hd; d++) {
                    acc[d] += sj * tile[jj * hd + d];
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let q0 = (b * t + i) * c3 + h * hd;
        for (var d = 0u; d < hd; d++) {
            dqkv[q0 + d] = acc[d] * p.scale;
        }
    }
}
