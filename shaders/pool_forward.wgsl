// 2-D pooling forward over each plane of an NCHW tensor, max or average:
//   window(oy, ox) = the cells (oy·stride + ki − pad, ox·stride + kj − pad), ki < KH, kj < KW, inside the plane
//   max:     y = the largest x over the window; idx = its position y·W + x in the plane — the FIRST maximum in
//            row-major window order wins ties — or 0xFFFFFFFF (and y = 0) for a window wholly in the padding
//   average: y = Σ_window x / divisor, divisor = KH·KW when count_pad = 1 (padding counts as zeros), else the
//            number of cells inside the plane; idx is not written
//
// Layout: x is [planes, H, W] from element 0 (planes = N·C), y and idx are [planes, OH, OW] from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `PoolParams` in web-worker/src/gpu/kernels/pool.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read_write  y: array<f32>
//   3  storage, read_write  idx: array<u32>  (arg-max per output, read by pool_backward.wgsl; max only)
//
// Dispatch: one invocation per output element, workgroup_size(64), ceil(planes·OH·OW / 64) workgroups spread over
// x and y (flat index (wid.y · num_workgroups.x + wid.x) · 64 + lid). Indices ≥ planes·OH·OW do nothing.

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
    // 1 = max, 0 = average.
    is_max: u32,
    // Average only: 1 = divide by KH·KW, 0 = by the cells inside the plane.
    count_pad: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> idx: array<u32>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let o = (wid.y * groups.x + wid.x) * 64u + lid;
    if (o >= p.planes * p.oh * p.ow) {
        return;
    }
    let ox = o % p.ow;
    let oy = (o / p.ow) % p.oh;
    let base = (o / (p.ow * p.oh)) * p.h * p.w;
    var best = 0.0;
    var best_at = 0xFFFFFFFFu;
    var sum = 0.0;
    var cells = 0u;
    for (var ki = 0u; ki < p.kh; ki++) {
        let iy = i32(oy * p.stride + ki) - i32(p.pad);
        if (iy < 0 || iy >= i32(p.h)) {
            continue;
        }
        for (var kj = 0u; kj < p.kw; kj++) {
            let ix = i32(ox * p.stride + kj) - i32(p.pad);
            if (ix < 0 || ix >= i32(p.w)) {
                continue;
            }
            let at = u32(iy) * p.w + u32(ix);
            let v = x[base + at];
            if (best_at == 0xFFFFFFFFu || v > best) {
                best = v;
                best_at = at;
            }
            sum += v;
            cells += 1u;
        }
    }
    if (p.is_max != 0u) {
        y[o] = best;
        idx[o] = best_at;
    } else {
        var divisor = f32(max(cells, 1u));
        if (p.count_pad != 0u) {
            divisor = f32(p.kh * p.kw);
        }
        y[o] = sum / divisor;
    }
}
