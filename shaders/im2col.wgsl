// im2col for conv2d: unfolds the input's receptive fields into the columns of one matrix, so the convolution of
// the whole batch is one matmul (W [OC, CK] · col [CK, N·P], see conv2d in web-worker/src/gpu/kernels/conv.rs):
//   col[r, j] = x[n, c, oy·stride + ki − pad, ox·stride + kj − pad]   (0 where that falls in the padding)
//   with r = (c·KH + ki)·KW + kj  (r < CK = C·KH·KW, the order of the weight's [OC, C, KH, KW] layout)
//   and  j = n·P + oy·OW + ox     (j < N·P, P = OH·OW)
//
// Layout: x is NCHW, [N, C, H, W] row-major from element `x_off`; col is [CK, N·P] row-major from element 0.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ConvParams` in web-worker/src/gpu/kernels/conv.rs)
//   1  storage, read        x: array<f32>
//   2  storage, read_write  col: array<f32>
//
// Dispatch: workgroup_size(64, 1, 1) over a 3-D grid (ceil(P / 64), CK, N), each axis capped at the adapter's
// per-dimension limit and walked with grid-stride loops, so any size works: invocation (q, r, n) writes
// col[r, n·P + q]. The grid carries the row r and the sample n, so an invocation divides only once (q by OW):
// integer division is what CPU emulations (lavapipe, SwiftShader) pay most for. Neighbouring invocations take
// neighbouring output pixels (reads `stride` words apart).

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
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> col: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let plane = p.oh * p.ow;
    let np = p.n * plane;
    let ck = p.c * p.kh * p.kw;
    for (var ni = gid.z; ni < p.n; ni += groups.z) {
        for (var r = gid.y; r < ck; r += groups.y) {
            let ci = r / (p.kh * p.kw);
            let ki = (r / p.kw) % p.kh;
            let kj = r % p.kw;
            let src = p.x_off + (ni * p.c + ci) * p.h * p.w;
            for (var q = gid.x; q < plane; q += groups.x * 64u) {
                let oy = q / p.ow;
                let ox = q - oy * p.ow;
                let iy = i32(oy * p.stride + ki) - i32(p.pad);
                let ix = i32(ox * p.stride + kj) - i32(p.pad);
                var v = 0.0;
                if (iy >= 0 && iy < i32(p.h) && ix >= 0 && ix < i32(p.w)) {
                    v = x[src + u32(iy) * p.w + u32(ix)];
                }
                col[r * np + ni * plane + q] = v;
            }
        }
    }
}
