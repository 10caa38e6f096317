//! The integration tests, one binary: every suite runs a real coordinator on 127.0.0.1:0 with real WebSocket
//! workers and real engines. `cargo test -p starling-tests -- --test-threads=1` runs them one at a time (each
//! trains a model and the machine has two cores); name a suite to run it alone, e.g. `-- conformance::`.

mod attacks; // Lying, stale, replaying, copying and colluding workers; churn.
mod cnn; // A spec v2 CNN job: owner API, native workers, per-layer export.
mod conformance; // docs/PROTOCOL.md and docs/API.md as a contract: every limit, error and outcome, raw frames.
mod e2e; // Training end to end, restarts, stragglers, bad frames, storage failures, fairness, the demo schedule.
mod lm; // A transformer LM job on a token dataset: native workers, a liar, samples, export; `serve --demo-lm`.
mod local; // `local` jobs (protocol v2): H-step leases, int8 deltas, lies, restarts, v1 workers beside them.
mod owners; // Owner accounts, job control, live events, metrics and export.
mod trust; // The ledger, limits and adaptive replication.
