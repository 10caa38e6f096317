// Register-blocked matmul (the variant for hardware GPUs): C[m, n] = op(A)[m, k] · op(B)[k, n].
//
// The classic 2D block-tiling SGEMM (siboehm's kernels 5–6, gpu.cpp's WebGPU port): a workgroup owns a BM × BN
// tile of C, walks k in steps of BK through two workgroup-memory tiles, and each invocation keeps an RM × RN block
// of C in vec4 registers, fed by vec4 reads of workgroup memory (RM + RN values per RM · RN fmas).
//
// Layout: every operand is a flat row-major f32 array addressed through element offsets and strides, so one kernel
// covers the three forms backprop needs (A·B, Aᵀ·B, A·Bᵀ) and operands at any offset inside one big parameter or
// gradient buffer:
//   op(A)[i, p] = a[a_off + i * a_rs + p * a_cs]
//   op(B)[p, j] = b[b_off + p * b_rs + j * b_cs]
//   C[i, j]     = c[c_off + i * n + j]            (overwritten, not accumulated)
// The buffers are bound as arrays of vec4 so that aligned groups of 4 consecutive elements are one 16-byte load
// or store; any other element is read or written alone as component `e & 3` of vec4 `e >> 2`. Every buffer's size
// must therefore be a multiple of 16 bytes (`transfer::storage` rounds up).
//
// Bindings (group 0), the same slots as matmul_tiled.wgsl:
//   0  uniform              Params (mirrored by `MatmulParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read        a: array<vec4<f32>>
//   2  storage, read        b: array<vec4<f32>>
//   3  storage, read_write  c: array<vec4<f32>>  (must not alias a or b)
//
// Dispatch: workgroup_size(WG_X, WG_Y); BM = WG_Y * RM rows and BN = WG_X * RN columns per workgroup; invocation
// (x, y) owns rows y*RM .. y*RM+RM and columns x*RN .. x*RN+RN of the tile. Grid: (ceil(n / BN), ceil(m / BM), 1).
// All five sizes are pipeline overrides: RM and RN must be 4 or 8, BK a multiple of 4. Workgroup memory is
// (BM + BN) * BK * 4 bytes: the defaults (16 × 16 invocations, 8 × 8 per invocation, BK = 16: a 128 × 128 tile)
// use exactly the 16 KiB every WebGPU adapter offers and the 256 invocations SwiftShader allows.
//
// Global loads: each operand tile is loaded in groups of 4 consecutive elements along that operand's unit-stride
// axis (k for A in A·B and A·Bᵀ, m for A in Aᵀ·B; n for B in A·B and Aᵀ·B, k for B in A·Bᵀ). A group that is
// 16-byte aligned and wholly inside the matrix is one vec4 load; any other group (unaligned offsets or row
// lengths, tile edges) falls back to four bounds-checked scalar loads, where elements outside the matrix read 0.
// Stores outside C are skipped, so any m, n ≥ 1 and k ≥ 0 work. No split-K: every C element is one fma chain in
// k order, so results do not depend on scheduling.

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
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> c: array<vec4<f32>>;

// Invocations along n and along m.
override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
// Each invocation's register block: RM rows × RN columns of C (4 or 8 each).
override RM: u32 = 8u;
override RN: u32 = 8u;
// k-depth of one workgroup tile (a multiple of 4).
override BK: u32 = 16u;

// op(A) tile, k-major: element (i, p) of the tile is component i % 4 of a_s[(p * BM + i) / 4].
var<workgroup> a_s: array<vec4<f32>, BK * WG_Y * RM / 4u>;
// op(B) tile, k-major: element (p, j) of the tile is component j % 4 of b_s[(p * BN + j) / 4].
var<workgroup> b_s: array<vec4<f32>, BK * WG_X * RN / 4u>;

fn read_a(e: u32) -> f32 {
    return a[e >> 2u][e & 3u];
}

fn read_b(e: u32) -> f32 {
    return b[e >> 2u][e & 3u];
}

// Loads the BM × BK tile of op(A) at (row0, k0) into a_s, one group of 4 per iteration.
fn load_a(row0: u32, k0: u32, li: u32) {
    let bm = WG_Y * RM;
    // Unit stride along m only in Aᵀ·B (with m > 1); every other case walks along k.
    let along_m = params.a_rs == 1u && params.a_cs != 1u;
    let step = select(params.a_cs, params.a_rs, along_m);
    let groups = bm * BK / 4u;
    for (var g = li; g < groups; g += WG_X * WG_Y) {
        var il: u32;
        var pl: u32;
        if (along_m) {
            pl = g / (bm / 4u);
            il = (g % (bm / 4u)) * 4u;
        } else {
            il = g / (BK / 4u);
            pl = (g % (BK / 4u)) * 4u;
        }
        let i = row0 + il;
        let p = k0 + pl;
        let base = params.a_off + i * params.a_rs + p * params.a_cs;
        let last_i = select(i, i + 3u, along_m);
        let last_p = select(p + 3u, p, along_m);
        var v = vec4<f32>(0.0);
        if (last_i < params.m && last_p < params.k && step == 1u && (base & 3u) == 0u) {
            v = a[base >> 2u];
        } else {
            for (var t = 0u; t < 4u; t++) {
                let ti = select(i, i + t, along_m);
                let tp = select(p + t, p, along_m);
                if (ti < params.m && tp < params.k) {
                    v[t] = read_a(base + t * step);
                }
            }
        }
        if (along_m) {
            a_s[(pl * bm + il) / 4u] = v;
        } else {
            for (var t = 0u; t < 4u; t++) {
                a_s[((pl + t) * bm + il) / 4u][il & 3u] = v[t];
            }
        }
    }
}

// Loads the BK × BN tile of op(B) at (k0, col0) into b_s, one group of 4 per iteration.
fn load_b(k0: u32, col0: u32, li: u32) {
    let bn = WG_X * RN;
    // Unit stride along k only in A·Bᵀ (with n > 1); every other case walks along n.
    let along_k = params.b_rs == 1u && params.b_cs != 1u;
    let step = select(params.b_cs, params.b_rs, along_k);
    let groups = bn * BK / 4u;
    for (var g = li; g < groups; g += WG_X * WG_Y) {
        var pl: u32;
        var jl: u32;
        if (along_k) {
            jl = g / (BK / 4u);
            pl = (g % (BK / 4u)) * 4u;
        } else {
            pl = g / (bn / 4u);
            jl = (g % (bn / 4u)) * 4u;
        }
        let p = k0 + pl;
        let j = col0 + jl;
        let base = params.b_off + p * params.b_rs + j * params.b_cs;
        let last_p = select(p, p + 3u, along_k);
        let last_j = select(j + 3u, j, along_k);
        var v = vec4<f32>(0.0);
        if (last_p < params.k && last_j < params.n && step == 1u && (base & 3u) == 0u) {
            v = b[base >> 2u];
        } else {
            for (var t = 0u; t < 4u; t++) {
                let tp = select(p, p + t, along_k);
                let tj = select(j + t, j, along_k);
                if (tp < params.k && tj < params.n) {
                    v[t] = read_b(base + t * step);
                }
            }
        }
        if (along_k) {
            for (var t = 0u; t < 4u; t++) {
                b_s[((pl + t) * bn + jl) / 4u][jl & 3u] = v[t];
            }
        } else {
            b_s[(pl * bn + jl) / 4u] = v;
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let bm = WG_Y * RM;
    let bn = WG_X * RN;
    let row0 = wid.y * bm;
    let col0 = wid.x * bn;
    let rv = RM / 4u; // vec4s of A per k step
    let cv = RN / 4u; // vec4s of B (and of C per row) per k step

    // acc[r * 2 + q] holds columns 4q .. 4q+3 of row r of this invocation's block.
    var acc: array<vec4<f32>, 16>;
    var av: array<vec4<f32>, 2>;
    var bv: array<vec4<f32>, 2>;
    for (var k0 = 0u; k0 < params.k; k0 += BK) {
        load_a(row0, k0, li);
        load_b(k0, col0, li);
        workgroupBarrier();
        for (var p = 0u; p < BK; p++) {
            for (var q = 0u; q < rv; q++) {
                av[q] = a_s[p * (bm / 4u) + lid.y * rv + q];
            }
            for (var q = 0u; q < cv; q++) {
                bv[q] = b_s[p * (bn / 4u) + lid.x * cv + q];
            }
            for (var r = 0u; r < RM; r++) {
                let s = vec4<f32>(av[r / 4u][r & 3u]);
                for (var q = 0u; q < cv; q++) {
                    acc[r * 2u + q] = fma(s, bv[q], acc[r * 2u + q]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < RM; r++) {
        let i = row0 + lid.y * RM + r;
        if (i >= params.m) {
            break;
        }
        for (var q = 0u; q < cv; q++) {
            let j = col0 + lid.x * RN + q * 4u;
            let e = params.c_off + i * params.n + j;
            let v = acc[r * 2u + q];
            if (j + 3u < params.n && (e & 3u) == 0u) {
                c[e >> 2u] = v;
            } else {
                for (var t = 0u; t < 4u; t++) {
                    if (j + t < params.n) {
                        c[(e + t) >> 2u][(e + t) & 3u] = v[t];
                    }
                }
            }
        }
    }
}
