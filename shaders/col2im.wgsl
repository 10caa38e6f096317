// col2im for conv2d's input gradient: folds the columns of dcol = Wᵀ · dY back onto the input pixels they were
// unfolded from (the adjoint of im2col.wgsl), as a gather so that no two invocations write one element:
//   dx[n, c, y, x] = Σ_{ki < KH, kj < KW} dcol[(c·KH + ki)·KW + kj, n·P + oy·OW + ox]
//   over the (ki, kj) with oy = (y + pad − ki) / stride and ox = (x + pad − kj) / stride exact and in range.
//
// Layout: dcol is [CK, N·P] row-major from element 0 (CK = C·KH·KW, P = OH·OW), as im2col.wgsl writes col; dx is
// NCHW, [N, C, H, W] row-major from element 0, overwritten.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ConvParams` in web-worker/src/gpu/kernels/conv.rs; x_off unused)
//   1  storage, read        dcol: array<f32>
//   2  storage, read_write  dx: array<f32>
//
// Dispatch: workgroup_size(64, 1, 1) over a 3-D grid (ceil(H·W / 64), C, N), each axis capped at the adapter's
// per-dimension limit and walked with grid-stride loops: invocation (q, c, n) writes dx[n, c, q]. Only the taps
// that hit an output position are visited: ki runs over (y + pad) mod stride, + stride, … while oy counts down,
// so no division happens per tap (integer division is what CPU emulations pay most for).

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    oh: u32,
    ow: u32,
    x_off: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dcol: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let plane = p.oh * p.ow;
    let np = p.n * plane;
    let hw = p.h * p.w;
    for (var ni = gid.z; ni < p.n; ni += groups.z) {
        for (var ci = gid.y; ci < p.c; ci += groups.y) {
            for (var q = gid.x; q < hw; q += groups.x * 64u) {
                let yy = q / p.w;
                let xx = q - yy * p.w;
                let ty = yy + p.pad;
                let tx = xx + p.pad;
                let oy0 = ty / p.stride;
                let ox0 = tx / p.stride;
                let ki0 = ty - oy0 * p.stride;
                let kj0 = tx - ox0 * p.stride;
                var sum = 0.0;
                var oy = i32(oy0);
                for (var ki = ki0; ki < p.kh && oy >= 0; ki += p.stride) {
                    if (u32(oy) < p.oh) {
                        var ox = i32(ox0);
                        for (var kj = kj0; kj < p.kw && ox >= 0; kj += p.stride) {
                            if (u32(ox) < p.ow) {
                                let r = (ci * p.kh + ki) * p.kw + kj;
                                sum += dcol[r * np + ni * plane + u32(oy) * p.ow + u32(ox)];
                            }
                            ox -= 1;
                        }
                    }
                    oy -= 1;
                }
                dx[(ni * p.c + ci) * hw + q] = sum;
            }
        }
    }
}
