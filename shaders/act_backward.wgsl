// Activation backward, in place: dZ[e] = dA[e] * act'(·). For relu, act' = (a[e] > 0) where a is the layer's
// post-activation output (a > 0 ⇔ z > 0); the identity activation needs no dispatch at all.
//
// Layout: dz and a are both [rows, cols] row-major from element 0, flattened to `len` = rows * cols elements.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ActBackwardParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read_write  dz: array<f32>  (gradient w.r.t. the activation in, w.r.t. the pre-activation out)
//   2  storage, read        a: array<f32>   (post-activation output of the forward pass)
//
// Dispatch: one invocation per element, workgroup_size(64), ceil(len / 64) workgroups spread over x and y as in
// bias_act.wgsl; indices ≥ len do nothing.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dz: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * groups.x + wid.x) * 64u + lid;
    if (idx >= p.len) {
        return;
    }
    if (a[idx] <= 0.0) {
        dz[idx] = 0.0;
    }
}
