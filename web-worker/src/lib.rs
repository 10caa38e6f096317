//! The Starling volunteer worker: one engine and one protocol session for native and wasm32 builds.
#![forbid(unsafe_code)]

pub mod engine; // Backend choice (auto | gpu | cpu) and the one engine interface over GPU and CPU.
pub mod gpu; // WGSL kernels on wgpu: device setup, one struct per kernel, the resident-model engine.
#[cfg(not(target_arch = "wasm32"))]
pub mod native; // The native WebSocket runner (`starling worker`).
pub mod session; // The protocol state machine, shared by the native runner and the browser.
#[cfg(target_arch = "wasm32")]
pub mod wasm; // The browser runner: the session over a browser WebSocket inside a Web Worker (wasm-bindgen).
