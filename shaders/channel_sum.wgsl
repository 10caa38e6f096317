// Per-channel sums of an NCHW tensor, the conv bias gradient: out[out_off + c] = Σ_n Σ_q dy[(n·C + c)·P + q].
//
// Layout: dy is [N, C, P] row-major from element 0 (P = H·W); the C sums are written to consecutive floats from
// element `out_off` of the gradient buffer (the layer's bias slot; an element offset, as layer offsets inside the
// flat buffer are not 256-byte aligned).
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `ChannelSumParams` in web-worker/src/gpu/kernels/conv.rs)
//   1  storage, read        dy: array<f32>
//   2  storage, read_write  out: array<f32>  (the flat gradient buffer)
//
// Dispatch: one workgroup of 256 invocations per channel, grid (C, 1, 1) (C ≤ 65535, checked by the host). Each
// invocation sums the elements t, t + 256, … of every sample's plane of the channel (neighbours read neighbouring
// words; no index is divided), then a tree reduction in 1 KiB of workgroup memory adds the 256 partial sums. Any
// N, C, P work.

struct Params {
    n: u32,
    c: u32,
    plane: u32,
    out_off: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = wid.x;
    var sum = 0.0;
    if (ch < p.c) {
        for (var ni = 0u; ni < p.n; ni++) {
            let base = (ni * p.c + ch) * p.plane;
            for (var q = lid; q < p.plane; q += WG) {
                sum += dy[base + q];
            }
        }
    }
    partial[lid] = sum;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    if (lid == 0u && ch < p.c) {
        out[p.out_off + ch] = partial[0];
    }
}
