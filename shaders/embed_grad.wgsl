// Token and positional embeddings, backward: the table gradient from dy [N, C], N = B·T positions, without float
// atomics (each table element is one invocation's sum, so the result is deterministic):
//   mode 0 (token):      g[v, c] = Σ_{n : id(n) = v} dy[n, c]        over every position n, in order
//   mode 1 (positional): g[t, c] = Σ_{b} dy[b·T + t, c]
//   grad[table + r·C + c] = g[r, c] + (accumulate ? grad[table + r·C + c] : 0)
// `accumulate` = 1 for the token table of a tied head, which the head's backward pass wrote first (both
// contributions add up); 0 overwrites, so every step fully rewrites its slots.
//
// Layout: x holds the N token ids as f32 (mode 0; unread in mode 1); dy is [N, C] row-major from element 0; the
// table gradient is [vocab, C] (mode 0) or [T, C] (mode 1) at element `table` of the gradient buffer.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `EmbedParams` in web-worker/src/gpu/kernels/embed.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read        dy: array<f32>
//   3  storage, read_write  grad: array<f32>  (flat gradient buffer)
//
// Dispatch: one invocation per table element (vocab·C or T·C), workgroup_size(64), ceil(rows·C / 64) workgroups
// spread over x and y; indices past the table do nothing. Mode 0 reads every id once per element: O(vocab·C·N),
// cheap next to the model's matmuls at the vocabularies of char- and byte-level models.

struct Params {
    positions: u32,
    width: u32,
    seq: u32,
    vocab: u32,
    table: u32,
    mode: u32,
    accumulate: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * 64u + lid;
    let rows = select(p.seq, p.vocab, p.mode == 0u);
    if (e >= rows * p.width) {
        return;
    }
    let r = e / p.width;
    let c = e % p.width;
    var s = 0.0;
    if (p.mode == 0u) {
        for (var n = 0u; n < p.positions; n++) {
            if (u32(x[n]) == r) {
                s += dy[n * p.width + c];
            }
        }
    } else {
        for (var n = r; n < p.positions; n += p.seq) {
            s += dy[n * p.width + c];
        }
    }
    let at = p.table + e;
    if (p.accumulate != 0u) {
        s += grad[at];
    }
    grad[at] = s;
}
