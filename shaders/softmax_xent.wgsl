// Fused, numerically stable softmax-cross-entropy, forward + backward, over logits [rows, classes]:
//   per row r: mx = max_j z[r, j]; lse = mx + log Σ_j exp(z[r, j] - mx); loss_r = lse - z[r, label_r]
//   stats.loss_sum = Σ_r loss_r;  stats.correct = #{r : first arg-max of row r == label_r}  (ties → lowest j)
//   if write_grad: dlogits[r, j] = (exp(z[r, j] - lse) - [j == label_r]) / rows   (gradient of the MEAN loss)
// Computed without cancellation: with others_r = Σ_{j≠label} exp(z[r, j] - mx), loss_r = log1p(others_r) when the
// label holds the max and the label's gradient is -others_r / Σ_j exp(z[r, j] - mx), so confidently right rows
// keep full relative precision (honest devices must agree to 1e-3 even when the loss is near zero).
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

// log(1 + x) for x ≥ 0. WGSL's `log` is only accurate to an absolute 2^-21 near 1, so small x use the series
// x − x²/2 + … − x¹⁰/10 (truncation below 1e-11 relative for x < 0.1).
fn log1p_small(x: f32) -> f32 {
    if (x >= 0.1) {
        return log(1.0 + x);
    }
    var term = x;
    var acc = 0.0;
    for (var k = 1u; k <= 10u; k++) {
        acc += select(-term, term, (k & 1u) == 1u) / f32(k);
        term *= x;
    }
    return acc;
}

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
        let label = labels[r];
        // sum = Σ_j e^(z_j − mx); others = the same without the label's term. Keeping `others` apart avoids the
        // cancellation in p_y − 1 and in (mx + log(sum)) − z_y once a row is confidently right, where the gradient
        // and loss are tiny and would otherwise be mostly rounding (and differ between honest devices).
        var sum = 0.0;
        var others = 0.0;
        for (var j = 0u; j < p.classes; j++) {
            let e = exp(logits[base + j] - mx);
            sum += e;
            others += select(e, 0.0, j == label);
        }
        let z_y = logits[base + label];
        if (z_y >= mx) {
            // The label holds the max: loss = log(1 + others), by a series where log near 1 is inaccurate.
            loss += log1p_small(others);
        } else {
            loss += (mx - z_y) + log(sum);
        }
        correct += select(0u, 1u, best == label);
        if (p.write_grad != 0u) {
            let inv_sum = 1.0 / sum;
            for (var j = 0u; j < p.classes; j++) {
                let pj = exp(logits[base + j] - mx) * inv_sum;
                // p_y − 1 = −others / sum exactly, without subtracting two numbers close to 1.
                dlogits[base + j] = select(pj, -others * inv_sum, j == label) * inv_rows;
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
