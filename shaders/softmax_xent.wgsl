// Fused, numerically stable softmax-cross-entropy, forward + backward, over logits [rows, classes]:
//   per row r: mx = max_j z[r, j]; lse = mx + log Σ_j exp(z[r, j] - mx); loss_r = lse - z[r, label_r]
//   stats.loss_sum = Σ_r loss_r;  stats.correct = #{r : first arg-max of row r == label_r}  (ties → lowest j)
//   if write_grad: dlogits[r, j] = (exp(z[r, j] - lse) - [j == label_r]) / rows   (gradient of the MEAN loss)
//
// Layout: logits and dlogits are [rows, classes] row-major from element 0; labels holds rows u32 class indices
// (validated on the host to be < classes); stats is { loss_sum: f32, correct: u32 }.
//
// Bindings (group 0):
//   0  uniform              Params (mirrored by `SoftmaxParams` in web-worker/src/gpu/kernels.rs)
//   1  storage, read        logits: array<f32>
//   2  storage, read        labels: array<u32>
//   3  storage, read_write  dlogits: array<f32>  (untouched when write_grad = 0)
//   4  storage, read_write  stats: Stats
//
// Dispatch: exactly ONE workgroup of 256 invocations, grid (1, 1, 1). Invocation t handles rows t, t + 256, …
// (each walking its row's classes three times), then a workgroup tree reduction sums the per-invocation loss and
// correct counts and invocation 0 writes stats. Any rows and classes work.

struct Params {
    rows: u32,
    classes: u32,
    // 1 = write dlogits, 0 = forward only (evaluation).
    write_grad: u32,
    _pad0: u32,
}

struct Stats {
    loss_sum: f32,
    correct: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: Stats;

const WG: u32 = 256u;

var<workgroup> loss_part: array<f32, WG>;
var<workgroup> correct_part: array<u32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) t: u32) {
    var loss = 0.0;
    var correct = 0u;
    let inv_rows = 1.0 / f32(p.rows);
    for (var r = t; r < p.rows; r += WG) {
        let base = r * p.classes;
        var mx = logits[base];
        var best = 0u;
        for (var j = 1u; j < p.classes; j++) {
            let v = logits[base + j];
            if (v > mx) {
                mx = v;
                best = j;
            }
        }
        var sum = 0.0;
        for (var j = 0u; j < p.classes; j++) {
            sum += exp(logits[base + j] - mx);
        }
        let lse = mx + log(sum);
        let label = labels[r];
        loss += lse - logits[base + label];
        correct += select(0u, 1u, best == label);
        if (p.write_grad != 0u) {
            for (var j = 0u; j < p.classes; j++) {
                let y = select(0.0, 1.0, j == label);
                dlogits[base + j] = (exp(logits[base + j] - lse) - y) * inv_rows;
            }
        }
    }
    loss_part[t] = loss;
    correct_part[t] = correct;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (t < half) {
            loss_part[t] += loss_part[t + half];
            correct_part[t] += correct_part[t + half];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        stats.loss_sum = loss_part[0];
        stats.correct = correct_part[0];
    }
}
