//! The Starling volunteer worker: one engine and one protocol session for native and wasm32 builds.
#![forbid(unsafe_code)]

pub mod gpu; // WGSL kernels on wgpu: device setup, one struct per kernel, the resident-model engine.
