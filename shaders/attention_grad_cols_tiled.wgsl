// Causal attention core, backward, part 2 of 2 (key / value positions), with queries and output gradients tiled
// through workgroup memory; the math, the summation order and the output are those of attention_grad_cols.wgsl,
// from part 1's ds (attention_grad_rows_tiled.wgsl), the forward's probabilities p and dy = ∂loss/∂y (D = C / H):
//   dk_j[d] = (Σ_{i ≥ j} ds_ij · q_i[d]) / √D;   dv_j[d] = Σ_{i ≥ j} p_ij · dy_i[h·D + d]
// written to the k and v columns of dqkv (overwritten): only later (or the same) queries saw position j.
//
// Layout: qkv and dqkv are [B·T, 3C], dy is [B·T, C], probs and ds are [B, H, T, T], all row-major from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `AttnParams` in web-worker/src/gpu/kernels/attention.rs)
//   1  storage, read        qkv: array<f32>
//   2  storage, read        probs: array<f32>
//   3  storage, read        dy: array<f32>
//   4  storage, read        ds: array<f32>
//   5  storage, read_write  dqkv: array<f32>  (this kernel writes only the k and v columns)
//
// Dispatch: one workgroup of 64 invocations per (b, h, block of 64 key positions), B·H·ceil(T / 64) workgroups
// spread over x and y as in attention_forward_tiled.wgsl; invocation `lid` owns position j = block·64 + lid. The
// queries block·64 .. T that see the block are staged 32 at a time, q and dy side by side (2 × 32 × D floats,
// D ≤ 64: 16 KiB). Only for head widths D ≤ 64 (the host falls back to attention_grad_cols.wgsl above that).
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

// Key positions per workgroup (one per invocation).
const KB: u32 = 64u;
// Queries per staged tile.
const QT: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> probs: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> ds: array<f32>;
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;

// QT rows of D values each (row ii at ii·D): the tile's queries, and their output gradients.
var<workgroup> q_tile: array<f32, 2048>;
var<workgroup> dy_tile: array<f32, 2048>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = p.seq;
    let blocks = (t + KB - 1u) / KB;
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
    let j = block * KB + lid;
    let live = j < t;
    // Element (i, j) of this head's [T, T] block sits at base + i·T.
    let base = bh * t * t + j;
    let q0 = b * t * c3 + h * hd;
    let dy0 = b * t * c + h * hd;
    var dk: array<f32, 64>;
    var dv: array<f32, 64>;
    // Queries from the block's first position on (tile-aligned), to the end of the sequence.
    for (var i0 = (block * KB / QT) * QT; i0 < t; i0 += QT) {
        let n = min(QT, t - i0);
        for (var e = lid; e < n * hd; e += KB) {
            q_tile[e] = qkv[q0 + (i0 + e / hd) * c3 + e % hd];
            dy_tile[e] = dy[dy0 + (i0 + e / hd) * c + e % hd];
        }
        workgroupBarrier();
        if (live && i0 + n > j) {
            // The tile's queries i ≥ j, in order.
            for (var ii = select(0u, j - i0, j > i0); ii < n; ii++) {
                let at = base + (i0 + ii) * t;
                let sij = ds[at];
                let pij = probs[at];
                for (var d = 0u; d < hd; d++) {
                    dk[d] += sij * q_tile[ii * hd + d];
                    dv[d] += pij * dy_tile[ii * hd + d];
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let out = (b * t + j) * c3 + h * hd;
        for (var d = 0u; d < hd; d++) {
            dqkv[out + c + d] = dk[d] * p.scale;
            dqkv[out + 2u * c + d] = dv[d];
        }
    }
}
