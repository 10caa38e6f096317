//! A throwaway PostgreSQL server for tests: Debian's `postgresql` package (`initdb` + `pg_ctl`), a data directory
//! under the temp dir, listening on 127.0.0.1 on a free port only, stopped and removed when dropped. Run as the
//! `postgres` user when the tests run as root (initdb refuses root). Shared by the store suite
//! (`coordinator/tests/store.rs`) and the failover test (`cli/tests/failover.rs`).
//!
//! Without PostgreSQL installed, [`PgServer::start`] says so loudly and returns `None` (the caller skips the
//! PostgreSQL half) — except under `CI=true`, where a missing PostgreSQL is a failure (`cargo xtask test` installs
//! it first).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running throwaway server; stopped (immediately) and deleted on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// Where Debian puts the server binaries (the newest installed major version), or `pg_config --bindir`.
fn bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    bin.join("initdb").exists().then_some(bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl PgServer {
    /// Starts a fresh server, or `None` when PostgreSQL is not installed (a failure under `CI=true`).
    pub fn start(tag: &str) -> Option<Self> {
        let Some(bin) = bindir() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "PostgreSQL is not installed (CI=true: `cargo xtask test` installs it with apt-get)"
            );
            eprintln!(
                "\n*** PostgreSQL is not installed: SKIPPING the PostgreSQL half of {tag} \
                 (apt-get install postgresql, or run `cargo xtask test`) ***\n"
            );
            return None;
        };
        match Self::start_with(&bin, tag) {
            Ok(s) => Some(s),
            Err(e) => panic!(
                "starting a throwaway PostgreSQL from {}: {e}",
                bin.display()
            ),
        }
    }

    fn start_with(bin: &Path, tag: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("starling-pg-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        let server = Self {
            bin: bin.to_path_buf(),
            dir: dir.clone(),
            port: free_port()?,
            as_postgres,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?
                .success();
            anyhow::ensure!(ok, "chown of {} to postgres failed", dir.display());
        }
        let data = dir.join("data");
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "starling", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Durability is not what these tests measure: no fsync makes the server fast on a busy machine.
        let opts = format!(
            "-p {} -h 127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            server.port,
            dir.display()
        );
        let out = server
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start failed: {} (log: {})",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        Ok(server)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// URL of database `db` (created by [`PgServer::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://starling@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database named `db` (each test its own) and returns its URL.
    pub fn create_db(&self, db: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "starling",
                ])
                .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc"])
                .arg(format!("CREATE DATABASE {db}"))
                .output()?;
            if out.status.success() {
                return Ok(self.url(db));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CREATE DATABASE {db}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
