// Causal attention core, backward, part 1 of 2 (one query row at a time), from dy = ∂loss/∂y [B·T, C] and the
// forward's probabilities p (D = C / H, q_i, k_j, v_j as in attention_forward.wgsl):
//   dp_ij = dy_i · v_j;   ds_ij = p_ij · (dp_ij − Σ_{j' ≤ i} p_ij' · dp_ij')   for j ≤ i, 0 for j > i
//   dq_i[d] = (Σ_{j ≤ i} ds_ij · k_j[d]) / √D
// ds is kept for part 2 (attention_grad_cols.wgsl: dk, dv); dq goes to the q columns of dqkv (overwritten).
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
// Dispatch: one invocation per (b, h, i) row, r = (b·H + h)·T + i, workgroup_size(64), ceil(B·H·T / 64)
// workgroups spread over x and y (r = (wid.y · num_workgroups.x + wid.x) · 64 + lid); rows ≥ B·H·T do nothing.

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
@group(0) @binding(4) var<storage, read_write> ds: array<f32>;
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
    let i = r % t;
    let bh = r / t;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let c = p.width;
    let hd = c / p.heads;
    let c3 = 3u * c;
    let row = r * t;
    let dy0 = (b * t + i) * c + h * hd;
    let seq0 = b * t * c3 + h * hd;
    var dot = 0.0;
    for (var j = 0u; j <= i; j++) {
        let v0 = seq0 + j * c3 + 2u * c;
        var dp = 0.0;
        for (var d = 0u; d < hd; d++) {
            dp += dy[dy0 + d] * qkv[v0 + d];
        }
        ds[row + j] = dp;
        dot += probs[row + j] * dp;
    }
    for (var j = 0u; j <= i; j++) {
        ds[row + j] = probs[row + j] * (ds[row + j] - dot);
    }
    for (var j = i + 1u; j < t; j++) {
        ds[row + j] = 0.0;
    }
    let q0 = (b * t + i) * c3 + h * hd;
    for (var d = 0u; d < hd; d++) {
        var acc = 0.0;
        for (var j = 0u; j <= i; j++) {
            acc += ds[row + j] * qkv[seq0 + j * c3 + c + d];
        }
        dqkv[q0 + d] = acc * p.scale;
    }
}
