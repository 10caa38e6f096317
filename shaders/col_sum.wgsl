// Column sums for bias gradients: out[out_off + j] = Σ_r dz[r, j].
//
// Layout: dz is [rows, cols] row-major from element 0; the result is written to cols consecutive floats starting at
// element `out_off` of the gradient buffer (the layer's bias slot in the flat layout; not 256-byte aligned, hence
// an element offset rather than a binding offset).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ColSumParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read        dz: array<f32>
//   2  storage, read_write  out: array<f32>  (the flat gradient buffer)
//
// Dispatch: one invocation per column, workgroup_size(64), grid (ceil(cols / 64), 1, 1); each invocation walks
// the rows, so neighbouring invocations read neighbouring words. Columns ≥ cols do nothing.

struct Params {
    rows: u32,
    cols: u32,
    out_off: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dz: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    if (j >= p.cols) {
        return;
    }
    var sum = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        sum += dz[r * p.cols + j];
    }
    out[p.out_off + j] = sum;
}
