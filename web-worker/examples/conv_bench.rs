//! The CNN's conv layers on this machine's adapter, without burn: forward and backward milliseconds of each conv
//! layer of the demo CNNs at batch 64, with every dispatch timed alone, so the slowest part is visible. Prints a
//! table and one JSON line. Run: `cargo run --release -p starling-worker --example conv_bench`.

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use serde_json::json;
    use starling_worker::gpu::{ConvLayer, ConvShape, GpuContext, Kernels, ops};

    let ctx = pollster::block_on(GpuContext::new()).context("no WebGPU adapter")?;
    println!("adapter: {}", ctx.summary().label());
    let kernels = Kernels::new(&ctx);
    let batch = 64;
    let mut rows = Vec::new();
    // (label, in channels, side, out channels), 5×5 kernels with "same" padding: both demo CNNs' conv layers.
    for (label, c, side, oc) in [
        ("1->16 28x28", 1, 28, 16),
        ("16->32 14x14", 16, 14, 32),
        ("1->32 28x28", 1, 28, 32),
        ("32->64 14x14", 32, 14, 64),
    ] {
        let layer = ConvLayer {
            shape: ConvShape {
                n: batch,
                c,
                h: side,
                w: side,
                kh: 5,
                kw: 5,
                stride: 1,
                pad: 2,
            },
            out_channels: oc,
            weight: 0,
            bias: oc * c * 25,
        };
        let t = ops::time_conv2d(&kernels, &layer, 5)?;
        let macs = (layer.out_len() * layer.shape.ck()) as f64;
        println!(
            "conv {label} batch {batch}: forward {:.2} ms ({:.1} GFLOP/s), backward {:.2} ms ({:.1} GFLOP/s)",
            t.forward_ms,
            2.0 * macs / t.forward_ms / 1e6,
            t.backward_ms,
            4.0 * macs / t.backward_ms / 1e6
        );
        for (part, ms) in &t.parts {
            println!("    {part:<22} {ms:>8.2} ms");
        }
        rows.push(json!({"layer": label, "batch": batch, "forward_ms": t.forward_ms, "backward_ms": t.backward_ms,
            "parts": t.parts.iter().map(|(p, ms)| json!({"part": p, "ms": ms})).collect::<Vec<_>>()}));
    }
    println!(
        "{}",
        json!({"adapter": ctx.summary().label(), "conv": rows})
    );
    Ok(())
}

#[cfg(target_arch = "wasm32")]
fn main() {}
