//! Our two causal attention kernels side by side on this machine's adapter: the per-row kernels and the
//! workgroup-tiled ones (`AttnVariant`), forward and backward, at the demo LM's shape (batch 12 × 4 heads × context
//! 64 × head width 32) and two others. `cargo xtask bench kernels` has the same rows next to burn-wgpu's; this one
//! needs no burn build. Prints a table of per-row/tiled ratios, then one JSON line.
//! Run: `cargo run --release -p starling-worker --example attention_bench [-- REPS]` (default 10).

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use serde_json::json;
    use starling_core::transformer::AttnDims;
    use starling_worker::gpu::{AttnVariant, GpuContext, Kernels, ops};

    let reps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().context("REPS must be a number")?,
        None => 10,
    };
    let ctx = pollster::block_on(GpuContext::new()).context("no WebGPU adapter")?;
    println!("adapter: {}", ctx.summary().label());
    let kernels = Kernels::new(&ctx);
    println!(
        "{:>24} {:>11} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "B × H × T × D", "per-row fwd", "per-row bwd", "tiled fwd", "tiled bwd", "fwd ×", "bwd ×"
    );
    let mut rows = Vec::new();
    for (batch, heads, seq, width) in [(12, 4, 64, 128), (4, 4, 128, 128), (12, 3, 17, 24)] {
        let dims = AttnDims {
            batch,
            seq,
            width,
            heads,
        };
        // Interleaved, so a change in the machine's load hits both kernels alike.
        let a = ops::time_attention_with(&kernels, (dims, AttnVariant::PerRow), reps)?;
        let b = ops::time_attention_with(&kernels, (dims, AttnVariant::Tiled), reps)?;
        let a2 = ops::time_attention_with(&kernels, (dims, AttnVariant::PerRow), reps)?;
        let b2 = ops::time_attention_with(&kernels, (dims, AttnVariant::Tiled), reps)?;
        let mean = |x: f64, y: f64| (x + y) / 2.0;
        let (pf, pb) = (
            mean(a.forward_ms, a2.forward_ms),
            mean(a.backward_ms, a2.backward_ms),
        );
        let (tf, tb) = (
            mean(b.forward_ms, b2.forward_ms),
            mean(b.backward_ms, b2.backward_ms),
        );
        println!(
            "{:>24} {pf:>11.2} {pb:>11.2} {tf:>9.2} {tb:>9.2} {:>9.2} {:>9.2}",
            format!("{batch} × {heads} × {seq} × {}", dims.head_width()),
            pf / tf,
            pb / tb
        );
        rows.push(
            json!({"batch": batch, "heads": heads, "seq": seq, "width": width,
            "per_row_fwd_ms": pf, "per_row_bwd_ms": pb, "tiled_fwd_ms": tf, "tiled_bwd_ms": tb}),
        );
    }
    println!(
        "{}",
        json!({"adapter": ctx.summary().label(), "attention": rows})
    );
    Ok(())
}

#[cfg(target_arch = "wasm32")]
fn main() {}
