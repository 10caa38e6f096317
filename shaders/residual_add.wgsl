// Residual connection, out of place: y[e] = a[e] + b[e] over `len` elements.
//
// Layout: a, b and y are flat arrays of `len` elements from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `AddParams` in web-worker/src/gpu/kernels/embed.rs)
//   1  storage, read        a: array<f32>
//   2  storage, read        b: array<f32>
//   3  storage, read_write  y: array<f32>  (must alias neither a nor b)
//
// Dispatch: one invocation per element, workgroup_size(64), ceil(len / 64) workgroups spread over x and y (flat
// index (wid.y · num_workgroups.x + wid.x) · 64 + lid); indices ≥ len do nothing.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * 64u + lid;
    if (e < p.len) {
        y[e] = a[e] + b[e];
    }
}
