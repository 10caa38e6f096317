//! The one helper every GPU path goes through: labelled buffer creation, uploads, recorded dispatches, and one
//! submit that runs dispatches and reads results back.
//!
//! Native and wasm32 differ only in how a read-back completes: natively `device.poll` drives the map callback;
//! in the browser the callback fires from the event loop and we await a oneshot channel.

use wgpu::util::DeviceExt as _;

use super::{GpuContext, GpuError};

/// One recorded compute dispatch: pipeline, bind group (holding its uniform buffer alive) and grid size.
#[derive(Clone, Debug)]
pub(crate) struct Dispatch {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub groups: [u32; 3],
}

fn check_size(ctx: &GpuContext, what: &'static str, bytes: u64) -> Result<(), GpuError> {
    let limit = ctx.limits.max_storage_buffer_binding_size;
    if bytes > limit {
        return Err(GpuError::TooLarge { what, bytes, limit });
    }
    Ok(())
}

/// A zero-initialised storage buffer of at least `bytes` bytes, rounded up to a multiple of 16 (never empty:
/// empty bindings are invalid; and `matmul_blocked.wgsl` binds buffers as arrays of vec4, which would hide a
/// trailing partial vec4).
pub(crate) fn storage(
    ctx: &GpuContext,
    label: &'static str,
    bytes: u64,
) -> Result<wgpu::Buffer, GpuError> {
    // The rounded size is what gets bound, so it is what must fit the binding limit.
    let size = bytes.max(16).next_multiple_of(16);
    check_size(ctx, label, size)?;
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }))
}

/// A storage buffer holding `data`.
pub(crate) fn storage_init(
    ctx: &GpuContext,
    label: &'static str,
    data: &[u8],
) -> Result<wgpu::Buffer, GpuError> {
    let buffer = storage(ctx, label, data.len() as u64)?;
    upload(ctx, &buffer, data);
    Ok(buffer)
}

/// Queues `data` to be written at the start of `buffer` before the next submit.
pub(crate) fn upload(ctx: &GpuContext, buffer: &wgpu::Buffer, data: &[u8]) {
    if !data.is_empty() {
        ctx.queue.write_buffer(buffer, 0, data);
    }
}

/// A uniform buffer holding one `Params` struct.
pub(crate) fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, params: &T) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        })
}

/// A grid of `groups` workgroups spread over x and y so that neither exceeds the per-dimension limit; kernels
/// recover the flat index as `(wid.y * num_workgroups.x + wid.x)`.
pub(crate) fn grid_1d(ctx: &GpuContext, groups: u32) -> [u32; 3] {
    let max_x = ctx.limits.max_compute_workgroups_per_dimension.max(1);
    if groups <= max_x {
        [groups.max(1), 1, 1]
    } else {
        [max_x, groups.div_ceil(max_x), 1]
    }
}

/// A grid of `groups` workgroups per axis, each capped at the per-dimension limit: the kernels that take it walk
/// every axis with a grid-stride loop, so a capped axis still covers its whole range.
pub(crate) fn grid_3d(ctx: &GpuContext, groups: [usize; 3]) -> [u32; 3] {
    let max = ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
    groups.map(|g| g.clamp(1, max) as u32)
}

/// Records `dispatches` in one compute pass (wgpu orders them with barriers), copies each `(buffer, bytes)` of
/// `reads` into one staging buffer, submits, waits and returns the bytes of each read in order.
pub(crate) async fn run(
    ctx: &GpuContext,
    label: &'static str,
    dispatches: &[Dispatch],
    reads: &[(&wgpu::Buffer, u64)],
) -> Result<Vec<Vec<u8>>, GpuError> {
    let limit = ctx.limits.max_compute_workgroups_per_dimension;
    if let Some(&groups) = dispatches
        .iter()
        .flat_map(|d| d.groups.iter())
        .find(|g| **g > limit)
    {
        return Err(GpuError::Grid { groups, limit });
    }
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        for d in dispatches {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
        }
    }
    let total: u64 = reads
        .iter()
        .map(|(_, bytes)| bytes.next_multiple_of(8))
        .sum();
    if total == 0 {
        ctx.queue.submit([encoder.finish()]);
        return Ok(Vec::new());
    }
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read-back staging"),
        size: total,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut offset = 0;
    for (buffer, bytes) in reads {
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, offset, *bytes);
        offset += bytes.next_multiple_of(8);
    }
    ctx.queue.submit([encoder.finish()]);
    map_read(ctx, &staging).await?;
    let mapped = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| GpuError::Map(e.to_string()))?;
    let mut out = Vec::with_capacity(reads.len());
    let mut offset = 0usize;
    for (_, bytes) in reads {
        out.push(mapped[offset..offset + *bytes as usize].to_vec());
        offset += bytes.next_multiple_of(8) as usize;
    }
    drop(mapped);
    staging.unmap();
    Ok(out)
}

/// Submits `dispatches` `times` times in one pass and waits for the GPU to finish: the benchmark's timed body.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn submit_and_wait(
    ctx: &GpuContext,
    dispatches: &[Dispatch],
    times: usize,
) -> Result<(), GpuError> {
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("timed"),
        });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("timed"),
            timestamp_writes: None,
        });
        for _ in 0..times {
            for d in dispatches {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
            }
        }
    }
    ctx.queue.submit([encoder.finish()]);
    wait_idle(ctx)
}

/// Blocks until all submitted work has finished (native only: browsers cannot block).
pub(crate) fn wait_idle(ctx: &GpuContext) -> Result<(), GpuError> {
    #[cfg(not(target_arch = "wasm32"))]
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| GpuError::Poll(e.to_string()))?;
    #[cfg(target_arch = "wasm32")]
    let _ = ctx;
    Ok(())
}

/// Maps `buffer` for reading and waits until the mapping is usable.
async fn map_read(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<(), GpuError> {
    let (tx, rx) = futures_channel::oneshot::channel();
    buffer
        .slice(..)
        .map_async(wgpu::MapMode::Read, move |result| {
            // The receiver only disappears if the caller's future was dropped; nothing is waiting then.
            let _ = tx.send(result);
        });
    // Natively nothing happens until the device is polled; in the browser the callback comes from the event loop.
    wait_idle(ctx)?;
    rx.await
        .map_err(|_| GpuError::Map("the map callback was dropped".into()))?
        .map_err(|e| GpuError::Map(e.to_string()))
}
