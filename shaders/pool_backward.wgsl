// 2-D pooling backward (the adjoint of pool_forward.wgsl), as a gather so that no two invocations write one element:
//   max:     dx[plane, y, x] = Σ dy[plane, oy, ox] over the windows containing (y, x) whose arg-max idx is y·W + x
//   average: dx[plane, y, x] = Σ dy[plane, oy, ox] / divisor(oy, ox) over the windows containing (y, x)
// The windows containing row y are oy ∈ [ceil((y + pad − KH + 1) / stride), floor((y + pad) / stride)] ∩ [0, OH),
// likewise for columns; the divisor is recomputed exactly as the forward pass computed it.
//
// Layout: dy and idx are [planes, OH, OW] from element 0; dx is [planes, H, W] from element 0, overwritten.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `PoolParams` in web-worker/src/gpu/kernels/pool.rs)
//   1  storage, read        dy: array<f32>
//   2  storage, read        idx: array<u32>  (written by pool_forward.wgsl; read for max only)
//   3  storage, read_write  dx: array<f32>
//
// Dispatch: one invocation per input element, workgroup_size(64), ceil(planes·H·W / 64) workgroups spread over x
// and y as in pool_forward.wgsl. Indices ≥ planes·H·W do nothing.

struct Params {
    planes: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    is_max: u32,
    count_pad: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// Cells of window (oy, ox) inside the plane: the average's divisor when count_pad = 0.
fn cells(oy: u32, ox: u32) -> u32 {
    let y0 = i32(oy * p.stride) - i32(p.pad);
    let x0 = i32(ox * p.stride) - i32(p.pad);
    let rows = min(y0 + i32(p.kh), i32(p.h)) - max(y0, 0);
    let cols = min(x0 + i32(p.kw), i32(p.w)) - max(x0, 0);
    return u32(max(rows, 1) * max(cols, 1));
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = (wid.y * groups.x + wid.x) * 64u + lid;
    if (e >= p.planes * p.h * p.w) {
        return;
    }
    let xx = e % p.w;
    let yy = (e / p.w) % p.h;
    let plane = e / (p.w * p.h);
    let at = yy * p.w + xx;
    let s = i32(p.stride);
    // Smallest oy with oy·stride − pad + KH − 1 ≥ y, i.e. ceil((y + pad − KH + 1) / stride), clamped at 0.
    let oy0 = u32(max((i32(yy + p.pad) - i32(p.kh) + s) / s, 0));
    let ox0 = u32(max((i32(xx + p.pad) - i32(p.kw) + s) / s, 0));
    let oy1 = min((yy + p.pad) / p.stride + 1u, p.oh);
    let ox1 = min((xx + p.pad) / p.stride + 1u, p.ow);
    var sum = 0.0;
    for (var oy = oy0; oy < oy1; oy++) {
        for (var ox = ox0; ox < ox1; ox++) {
            let o = (plane * p.oh + oy) * p.ow + ox;
            if (p.is_max != 0u) {
                if (idx[o] == at) {
                    sum += dy[o];
                }
            } else {
                var divisor = f32(cells(oy, ox));
                if (p.count_pad != 0u) {
                    divisor = f32(p.kh * p.kw);
                }
                sum += dy[o] / divisor;
            }
        }
    }
    dx[e] = sum;
}
