// Elementwise activation forward, out of place: y[e] = f(x[e]) with f one of
//   relu: max(x, 0)
//   gelu (tanh form): 0.5·x·(1 + tanh(u)), u = sqrt(2/π)·(x + 0.044715·x³), evaluated as x · σ(2u) with
//         σ(t) = 1 / (1 + exp(−t)) — the same value without the cancellation of 1 + tanh(u) for negative x
//         (the argument of exp is clamped to ±80, where σ is already 0 or 1 in f32).
//
// Layout: x and y are flat arrays of `len` elements from element 0 (any shape: activations are elementwise).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ActParams` in web-worker/src/gpu/kernels/act.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read_write  y: array<f32>  (must not alias x)
//
// Dispatch: one invocation per element, workgroup_size(64), ceil(len / 64) workgroups spread over x and y (flat
// index (wid.y · num_workgroups.x + wid.x) · 64 + lid); indices ≥ len do nothing.

struct Params {
    len: u32,
    // 0 = relu, 1 = gelu (tanh form).
    kind: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

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
        y[e] = max(v, 0.0);
    } else {
        let u2 = clamp(2.0 * SQRT_2_OVER_PI * (v + 0.044715 * v * v * v), -80.0, 80.0);
        y[e] = v / (1.0 + exp(-u2));
    }
}
