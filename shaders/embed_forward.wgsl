// Token and positional embeddings, forward, over N = B·T positions of width C:
//   mode 0 (token):      y[n, c] = params[table + id(n)·C + c],   id(n) = u32(x[n])  (x holds token ids as f32)
//   mode 1 (positional): y[n, c] = x[n, c] + params[table + (n mod T)·C + c]
// Token ids are checked on the host (`starling_core::check_batch`: integers in 0..vocab); an id ≥ vocab would read
// another tensor's parameters, so the kernel also clamps it to the table.
//
// Layout: x is [N] (mode 0) or [N, C] (mode 1) row-major from element 0; y is [N, C]; the table is [vocab, C]
// (mode 0) or [T, C] (mode 1) row-major at element `table` of the parameter buffer.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `EmbedParams` in web-worker/src/gpu/kernels/embed.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read        params: array<f32>  (flat model parameters)
//   3  storage, read_write  y: array<f32>  (must not alias x)
//
// Dispatch: one invocation per output element, workgroup_size(64), ceil(N·C / 64) workgroups spread over x and y
// (flat index (wid.y · num_workgroups.x + wid.x) · 64 + lid); indices ≥ N·C do nothing.

struct Params {
    // Positions N = B·T.
    positions: u32,
    width: u32,
    // Positions per sequence T.
    seq: u32,
    vocab: u32,
    table: u32,
    // 0 = token gather, 1 = positional add.
    mode: u32,
    // Unused here (the gradient kernel shares the struct).
    accumulate: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * 64u + lid;
    if (e >= p.positions * p.width) {
        return;
    }
    let n = e / p.width;
    let c = e % p.width;
    if (p.mode == 0u) {
        let id = min(u32(x[n]), p.vocab - 1u);
        y[e] = params[p.table + id * p.width + c];
    } else {
        y[e] = x[e] + params[p.table + (n % p.seq) * p.width + c];
    }
}
