// Bias + activation, forward, in place: Z[r, j] = act(Z[r, j] + bias[j]) with act = relu (max(·, 0)) or identity.
//
// Layout: z is [rows, cols] row-major starting at element 0; the bias is cols consecutive floats at element
// `bias_off` of the parameter buffer (layer offsets inside the flat parameter buffer are not 256-byte aligned, so
// they travel here rather than as binding offsets).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `BiasActParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read_write  z: array<f32>       (pre-activation in, post-activation out)
//   2  storage, read        params: array<f32>  (flat model parameters; the bias is read from here)
//
// Dispatch: one invocation per element, workgroup_size(64); the host spreads ceil(rows * cols / 64) workgroups
// over x and y (x ≤ 65535), and the flat index is (wid.y * num_workgroups.x + wid.x) * 64 + lid.x. Indices past
// rows * cols do nothing, so any shape works.

struct Params {
    rows: u32,
    cols: u32,
    bias_off: u32,
    // 1 = relu, 0 = none.
    relu: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> z: array<f32>;
@group(0) @binding(2) var<storage, read> params: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * groups.x + wid.x) * 64u + lid;
    if (idx >= p.rows * p.cols) {
        return;
    }
    var v = z[idx] + params[p.bias_off + idx % p.cols];
    if (p.relu != 0u) {
        v = max(v, 0.0);
    }
    z[idx] = v;
}
