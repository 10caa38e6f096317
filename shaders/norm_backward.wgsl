// Layer / group normalisation backward, the input gradient, one normalised row per workgroup (see
// norm_forward.wgsl for the affine index k and the statistics):
//   x̂ = (x − μ) · ρ;  g = dy · gamma[k];  dx = ρ · (g − mean_e(g) − x̂ · mean_e(g · x̂))
//
// Layout: x, dy and dx are [rows, D] row-major from element 0; gamma at element gamma_off of the parameter buffer;
// stats is [rows, 2] = (μ, ρ) from element 0, as the forward kernel wrote it.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `NormParams` in web-worker/src/gpu/kernels/norm.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read        dy: array<f32>
//   3  storage, read        params: array<f32>
//   4  storage, read        stats: array<f32>
//   5  storage, read_write  dx: array<f32>  (must not alias dy)
//
// Dispatch: one workgroup of 256 invocations per row, grid spread over x and y as in norm_forward.wgsl; two sums
// (Σ g, Σ g·x̂) reduced together in 2 KiB of workgroup memory. Rows ≥ rows only take part in the barriers.

struct Params {
    rows: u32,
    len: u32,
    groups: u32,
    plane: u32,
    gamma_off: u32,
    beta_off: u32,
    eps: f32,
    _pad0: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> params: array<f32>;
@group(0) @binding(4) var<storage, read> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

var<workgroup> partial: array<vec2<f32>, WG>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wid.y * groups.x + wid.x;
    let live = r < p.rows;
    let base = r * p.len;
    let shift = (r % p.groups) * p.len;
    var mean = 0.0;
    var rstd = 0.0;
    var acc = vec2<f32>(0.0, 0.0);
    if (live) {
        mean = stats[2u * r];
        rstd = stats[2u * r + 1u];
        for (var e = lid; e < p.len; e += WG) {
            let g = dy[base + e] * params[p.gamma_off + (shift + e) / p.plane];
            let xh = (x[base + e] - mean) * rstd;
            acc += vec2<f32>(g, g * xh);
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    let m = partial[0] / f32(p.len);
    for (var e = lid; e < p.len; e += WG) {
        let g = dy[base + e] * params[p.gamma_off + (shift + e) / p.plane];
        let xh = (x[base + e] - mean) * rstd;
        dx[base + e] = rstd * (g - m.x - xh * m.y);
    }
}
