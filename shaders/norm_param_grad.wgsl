// Layer / group normalisation backward, the gamma and beta gradients (see norm_forward.wgsl for the affine index):
//   dgamma[k] = Σ dy · x̂,  dbeta[k] = Σ dy,  over every (r, e) with ((r mod G)·D + e) / P = k, x̂ = (x − μ_r) · ρ_r
// Those are the rows r ≡ g (mod G) and the P consecutive elements e ∈ [e0, e0 + P) of each, where g·D + e0 = k·P.
//
// Layout: x and dy are [rows, D] row-major from element 0; stats is [rows, 2] = (μ, ρ); the K = G·D / P results go
// to elements gamma_off + k and beta_off + k of the gradient buffer (the layer's slots in the flat layout).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `NormParams` in web-worker/src/gpu/kernels/norm.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read        dy: array<f32>
//   3  storage, read        stats: array<f32>
//   4  storage, read_write  grad: array<f32>  (the flat gradient buffer)
//
// Dispatch: one workgroup of 256 invocations per affine index k, grid spread over x and y (k = wid.y ·
// num_workgroups.x + wid.x); each invocation strides over the (rows / G)·P contributions and a tree reduction of
// both sums in 2 KiB of workgroup memory finishes. k ≥ K only takes part in the barriers.

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
@group(0) @binding(3) var<storage, read> stats: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;

var<workgroup> partial: array<vec2<f32>, WG>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let k = wid.y * groups.x + wid.x;
    let live = k < p.groups * p.len / p.plane;
    let g = k * p.plane / p.len;
    let e0 = k * p.plane % p.len;
    let per_group = p.rows / p.groups;
    var acc = vec2<f32>(0.0, 0.0);
    if (live) {
        for (var t = lid; t < per_group * p.plane; t += WG) {
            let r = (t / p.plane) * p.groups + g;
            let at = r * p.len + e0 + t % p.plane;
            let xh = (x[at] - stats[2u * r]) * stats[2u * r + 1u];
            acc += vec2<f32>(dy[at] * xh, dy[at]);
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
    if (live && lid == 0u) {
        grad[p.gamma_off + k] = partial[0].x;
        grad[p.beta_off + k] = partial[0].y;
    }
}
