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
// Dispatch: one invocation per element of dx, workgroup_size(64), ceil(N·C·H·W / 64) workgroups spread over x and y
// as in im2col.wgsl; each walks its KH·KW kernel taps. Indices ≥ N·C·H·W do nothing.

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

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * groups.x + wid.x) * 64u + lid;
    if (idx >= p.n * p.c * p.h * p.w) {
        return;
    }
    let xx = idx % p.w;
    let yy = (idx / p.w) % p.h;
    let ci = (idx / (p.w * p.h)) % p.c;
    let ni = idx / (p.w * p.h * p.c);
    let plane = p.oh * p.ow;
    let np = p.n * plane;
    var sum = 0.0;
    for (var ki = 0u; ki < p.kh; ki++) {
        let ty = i32(yy + p.pad) - i32(ki);
        if (ty < 0 || ty % i32(p.stride) != 0) {
            continue;
        }
        let oy = u32(ty) / p.stride;
        if (oy >= p.oh) {
            continue;
        }
        for (var kj = 0u; kj < p.kw; kj++) {
            let tx = i32(xx + p.pad) - i32(kj);
            if (tx < 0 || tx % i32(p.stride) != 0) {
                continue;
            }
            let ox = u32(tx) / p.stride;
            if (ox >= p.ow) {
                continue;
            }
            let r = (ci * p.kh + ki) * p.kw + kj;
            sum += dcol[r * np + ni * plane + oy * p.ow + ox];
        }
    }
    dx[idx] = sum;
}
