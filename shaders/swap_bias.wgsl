// Swaps the two outer axes of a [A, B, P] tensor, optionally adding a bias over the first axis and applying ReLU:
//   out[b, a, q] = act(in[a, b, q] + (has_bias ? params[bias_off + a] : 0)),  act = relu (max(·, 0)) or identity
// conv2d uses it both ways: forward, the matmul's [OC, N, P] result becomes the NCHW output [N, OC, P] with the
// conv bias (and a following ReLU) applied; backward, the NCHW output gradient [N, OC, P] becomes the [OC, N·P]
// matrix that the weight- and input-gradient matmuls read.
//
// Layout: in is [A, B, P] row-major from element 0; out is [B, A, P] row-major from element 0 (overwritten); the
// bias is A consecutive floats at element `bias_off` of the parameter buffer (read only when has_bias = 1).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `SwapParams` in web-worker/src/gpu/kernels/conv.rs)
//   1  storage, read        src: array<f32>
//   2  storage, read_write  dst: array<f32>  (must not alias src)
//   3  storage, read        params: array<f32>  (flat model parameters)
//
// Dispatch: workgroup_size(64, 1, 1) over a 3-D grid (ceil(P / 64), A, B), each axis capped at the adapter's
// per-dimension limit and walked with grid-stride loops: invocation (q, a, b) writes out[b, a, q], so no index
// is divided (integer division is what CPU emulations pay most for); neighbours read and write neighbouring words.

struct Params {
    a: u32,
    b: u32,
    plane: u32,
    bias_off: u32,
    // 1 = add params[bias_off + a], 0 = no bias.
    has_bias: u32,
    // 1 = relu, 0 = none.
    relu: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    for (var bi = gid.z; bi < p.b; bi += groups.z) {
        for (var ai = gid.y; ai < p.a; ai += groups.y) {
            var bias = 0.0;
            if (p.has_bias != 0u) {
                bias = params[p.bias_off + ai];
            }
            let src_at = (ai * p.b + bi) * p.plane;
            let dst_at = (bi * p.a + ai) * p.plane;
            for (var q = gid.x; q < p.plane; q += groups.x * 64u) {
                var v = src[src_at + q] + bias;
                if (p.relu != 0u) {
                    v = max(v, 0.0);
                }
                dst[dst_at + q] = v;
            }
        }
    }
}
