//! The owner's command-line client (`starling job ...`): job files, submission, live progress, control, download.
//! It lives in the binary, not in the coordinator library: the server need not know what its clients look like.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::client::Client;
use crate::config::{JobArgs, JobCommand};

/// A job file (`job.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    /// Dataset file (safetensors or raw SDS1; docs/API.md), relative to the job file.
    pub dataset: String,
    /// Rows to hold out for evaluation when the dataset has no test tensors.
    pub test_fraction: Option<f32>,
    pub spec: toml::Value,
    pub hyper: Option<toml::Value>,
}

/// Runs a `starling job` command, printing to stdout.
pub fn run(args: JobArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.coordinator, args.token.clone())?;
    let need_token = || {
        if args.token.is_none() {
            bail!(
                "this needs an owner token: --token or STARLING_TOKEN (create one with `starling token create`)"
            )
        } else {
            Ok(())
        }
    };
    // Sampling a local checkpoint needs no coordinator, so it is answered before the token check.
    if let JobCommand::Sample(s) = &args.command {
        return crate::sample::run(&client, args.token.is_some(), s);
    }
    need_token()?;
    match args.command {
        JobCommand::Submit { file } => submit(&client, &file),
        JobCommand::Status { id, json } => {
            let job = get_job(&client, id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                println!("{}", progress_line(&job, None));
            }
            Ok(())
        }
        JobCommand::Watch { id } => watch(&client, id),
        JobCommand::Sample(s) => crate::sample::run(&client, true, &s),
        JobCommand::Pause { id } => control(&client, id, "pause"),
        JobCommand::Resume { id } => control(&client, id, "resume"),
        JobCommand::Cancel { id } => control(&client, id, "cancel"),
        JobCommand::Download { id, output, which } => {
            // Written under a temporary name and renamed, so a failed download never leaves a truncated file.
            let partial = output.with_extension("partial");
            let mut file = std::fs::File::create(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            let got = client.download(
                &format!("/api/v1/jobs/{id}/checkpoint?which={which}"),
                &mut file,
            );
            drop(file);
            let bytes = match got {
                Ok(Ok(n)) => n,
                Ok(Err(r)) => {
                    let _ = std::fs::remove_file(&partial);
                    bail!("download failed: {}", r.error_message());
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            };
            std::fs::rename(&partial, &output)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({bytes} bytes)", output.display());
            Ok(())
        }
    }
}

fn get_job(client: &Client, id: u64) -> anyhow::Result<serde_json::Value> {
    let r = client.get(&format!("/api/v1/jobs/{id}"))?;
    if r.status != 200 {
        bail!("job {id}: {}", r.error_message());
    }
    Ok(r.json())
}

fn control(client: &Client, id: u64, action: &str) -> anyhow::Result<()> {
    let r = client.post(
        &format!("/api/v1/jobs/{id}/{action}"),
        "application/json",
        b"",
    )?;
    if r.status != 200 {
        bail!("{action} job {id}: {}", r.error_message());
    }
    println!("job {id}: {}", r.json()["status"].as_str().unwrap_or("?"));
    Ok(())
}

fn submit(client: &Client, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let job: JobFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let data_path = file.parent().unwrap_or(Path::new(".")).join(&job.dataset);
    let data = std::fs::read(&data_path)
        .with_context(|| format!("reading dataset {}", data_path.display()))?;
    let mut query = vec![("name", job.name.clone())];
    if let Some(f) = job.test_fraction {
        query.push(("test_fraction", f.to_string()));
    }
    let up = client.post_with_query(
        "/api/v1/datasets",
        &query,
        "application/octet-stream",
        &data,
    )?;
    if up.status != 201 {
        bail!("dataset upload: {}", up.error_message());
    }
    let ds = up.json();
    eprintln!(
        "uploaded {}: {} train / {} test rows of {} features",
        data_path.display(),
        ds["train_rows"],
        ds["test_rows"],
        ds["dim"]
    );
    let body = serde_json::json!({
        "name": job.name,
        "spec": serde_json::to_value(&job.spec)?,
        "dataset": ds["id"],
        "hyper": job.hyper.map(serde_json::to_value).transpose()?,
    });
    let r = client.post(
        "/api/v1/jobs",
        "application/json",
        &serde_json::to_vec(&body)?,
    )?;
    if r.status != 201 {
        bail!("job creation: {}", r.error_message());
    }
    let id = r.json()["id"].as_u64().context("no job id in the answer")?;
    println!("{id}");
    eprintln!(
        "job {id} created; dashboard: {}/dashboard.html#job={id}",
        client.base
    );
    Ok(())
}

/// One line of progress: step, loss, accuracy, workers, rate, ETA.
pub fn progress_line(job: &serde_json::Value, eta: Option<Duration>) -> String {
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("—".to_string(), |a| format!("{:.2}%", 100.0 * a))
    };
    let loss = job["last_train"]["loss"]
        .as_f64()
        .map_or("—".to_string(), |l| format!("{l:.4}"));
    let eta = eta.map_or(String::new(), |d| format!("  eta {}s", d.as_secs()));
    format!(
        "job {} [{}] step {}/{}  loss {}  test acc {} (best {})  workers {}  accepted {} rejected {}{}",
        job["id"],
        job["status"].as_str().unwrap_or("?"),
        job["step"],
        job["steps"],
        loss,
        pct(&job["last_eval"]["accuracy"]),
        pct(&job["best_test_accuracy"]),
        job["workers"].as_array().map_or(0, Vec::len),
        job["counters"]["results_accepted"],
        job["counters"]["results_rejected"],
        eta
    )
}

fn watch(client: &Client, id: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let first = get_job(client, id)?;
    let step0 = first["step"].as_u64().unwrap_or(0);
    loop {
        let job = get_job(client, id)?;
        let (step, steps) = (
            job["step"].as_u64().unwrap_or(0),
            job["steps"].as_u64().unwrap_or(0),
        );
        let rate = (step - step0.min(step)) as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta =
            (rate > 0.0).then(|| Duration::from_secs_f64(steps.saturating_sub(step) as f64 / rate));
        let status = job["status"].as_str().unwrap_or("");
        println!("{}", progress_line(&job, eta));
        if matches!(status, "completed" | "cancelled") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
