//! WGSL engine on wgpu (being written).
