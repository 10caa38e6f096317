// Elementwise activation backward, out of place: dx[e] = dy[e] · f'(x[e]), x the activation's INPUT, with
//   relu: f' = [x > 0]
//   gelu (tanh form, see act_forward.wgsl): with s = σ(2u), u = sqrt(2/π)·(x + 0.044715·x³),
//         f' = s + 2·x·s·(1 − s)·sqrt(2/π)·(1 + 3·0.044715·x²)   (1 − s evaluated as σ(−2u), no cancellation)
//
// Layout: x, dy and dx are flat arrays of `len` elements from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ActParams` in web-worker/src/gpu/kernels/act.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read        dy: array<f32>
//   3  storage, read_write  dx: array<f32>  (must not alias dy)
//
// Dispatch: one invocation per element, workgroup_size(64), ceil(len / 64) workgroups spread over x and y as in
// act_forward.wgsl; indices ≥ len do nothing.

struct Params {
    len: u32,
    kind: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * 64u + lid;
    if (e >= p.len) {
        return;
    }
    let v = x[e];
    if (p.kind == 0u) {
        dx[e] = select(0.0, dy[e], v > 0.0);
    } else {
        let u2 = clamp(2.0 * SQRT_2_OVER_PI * (v + 0.044715 * v * v * v), -80.0, 80.0);
        let s = 1.0 / (1.0 + exp(-u2));
        let sc = 1.0 / (1.0 + exp(u2));
        let d = s + 2.0 * v * s * sc * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v);
        dx[e] = dy[e] * d;
    }
}
