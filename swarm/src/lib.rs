//! The swarm benchmark's parts; `main.rs` documents how to run it and what it reports.

pub mod coordinator;
pub mod fleet;
pub mod idle;
pub mod link;
pub mod scenario;
pub mod volunteer;
