// Causal attention core, backward, part 2 of 2 (one key / value position at a time), from part 1's ds
// (attention_grad_rows.wgsl), the forward's probabilities p and dy = ∂loss/∂y (D = C / H):
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
// Dispatch: one invocation per (b, h, j), r = (b·H + h)·T + j, workgroup_size(64), ceil(B·H·T / 64) workgroups
// spread over x and y (r = (wid.y · num_workgroups.x + wid.x) · 64 + lid); indices ≥ B·H·T do nothing.

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

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> probs: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> ds: array<f32>;
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;

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
    let j = r % t;
    let bh = r / t;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let c = p.width;
    let hd = c / p.heads;
    let c3 = 3u * c;
    // Element (i, j) of this head's [T, T] block sits at base + i·T + j.
    let base = bh * t * t + j;
    let q0 = b * t * c3 + h * hd;
    let dy0 = b * t * c + h * hd;
    let out = (b * t + j) * c3 + h * hd;
    for (var d = 0u; d < hd; d++) {
        var dk = 0.0;
        var dv = 0.0;
        for (var i = j; i < t; i++) {
            dk += ds[base + i * t] * qkv[q0 + i * c3 + d];
            dv += probs[base + i * t] * dy[dy0 + i * c + d];
        }
        dqkv[out + c + d] = dk * p.scale;
        dqkv[out + 2u * c + d] = dv;
    }
}
