// Tiled matmul on workgroup memory (the variant for real GPUs): C[m, n] = op(A)[m, k] · op(B)[k, n].
//
// Layout: every operand is a flat row-major f32 array addressed through element offsets and strides, so one kernel
// covers the three forms backprop needs (A·B, Aᵀ·B, A·Bᵀ) and operands that live inside one big parameter or
// gradient buffer at unaligned offsets:
//   op(A)[i, p] = a[a_off + i * a_rs + p * a_cs]
//   op(B)[p, j] = b[b_off + p * b_rs + j * b_cs]
//   C[i, j]     = c[c_off + i * n + j]            (overwritten, not accumulated)
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `MatmulParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read        a: array<f32>
//   2  storage, read        b: array<f32>
//   3  storage, read_write  c: array<f32>  (must not alias a or b)
//
// Dispatch: workgroup_size(WG_X, WG_Y); each invocation accumulates an RM × RN block of C in registers, so one
// workgroup owns a TM × TN tile (TM = WG_Y * RM rows, TN = WG_X * RN columns) and walks k in steps of TK through
// two workgroup-memory tiles. Grid: (ceil(n / TN), ceil(m / TM), 1). WG_X, WG_Y and TK are pipeline overrides;
// the defaults (16 × 16 threads, TK = 16) use 256 invocations and 8 KiB of workgroup memory, inside the browser's
// SwiftShader limits. Loads outside the matrices read 0 and stores outside C are skipped, so any m, k, n works.

struct Params {
    m: u32,
    k: u32,
    n: u32,
    a_off: u32,
    a_rs: u32,
    a_cs: u32,
    b_off: u32,
    b_rs: u32,
    b_cs: u32,
    c_off: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// Invocations along n and along m, and the k-depth of one tile.
override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override TK: u32 = 16u;
// Each invocation's register block; fixed because private arrays need a constant size.
const RM: u32 = 4u;
const RN: u32 = 4u;

// op(A) tile, [TM][TK] row-major.
var<workgroup> a_tile: array<f32, WG_Y * RM * TK>;
// op(B) tile, [TK][TN] row-major.
var<workgroup> b_tile: array<f32, TK * WG_X * RN>;

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tm = WG_Y * RM;
    let tn = WG_X * RN;
    let threads = WG_X * WG_Y;
    let row0 = wid.y * tm;
    let col0 = wid.x * tn;

    var acc: array<f32, 16>; // RM * RN, zero-initialised
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        // Cooperative, bounds-guarded loads of both tiles.
        for (var e = li; e < tm * TK; e += threads) {
            let i = row0 + e / TK;
            let p = k0 + e % TK;
            var v = 0.0;
            if (i < params.m && p < params.k) {
                v = a[params.a_off + i * params.a_rs + p * params.a_cs];
            }
            a_tile[e] = v;
        }
        for (var e = li; e < TK * tn; e += threads) {
            let p = k0 + e / tn;
            let j = col0 + e % tn;
            var v = 0.0;
            if (p < params.k && j < params.n) {
                v = b[params.b_off + p * params.b_rs + j * params.b_cs];
            }
            b_tile[e] = v;
        }
        workgroupBarrier();
        // Rows lid.y + r * WG_Y and columns lid.x + c * WG_X: strided so neighbours touch neighbouring words.
        for (var p = 0u; p < TK; p++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < RM; r++) {
                av[r] = a_tile[(lid.y + r * WG_Y) * TK + p];
            }
            for (var q = 0u; q < RN; q++) {
                bv[q] = b_tile[p * tn + lid.x + q * WG_X];
            }
            for (var r = 0u; r < RM; r++) {
                for (var q = 0u; q < RN; q++) {
                    acc[r * RN + q] = fma(av[r], bv[q], acc[r * RN + q]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < RM; r++) {
        let i = row0 + lid.y + r * WG_Y;
        for (var q = 0u; q < RN; q++) {
            let j = col0 + lid.x + q * WG_X;
            if (i < params.m && j < params.n) {
                c[params.c_off + i * params.n + j] = acc[r * RN + q];
            }
        }
    }
}
