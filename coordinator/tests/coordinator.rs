//! The coordinator library against real SQLite files and a real server on 127.0.0.1:0: databases made before
//! versioned migrations open and upgrade; `/metrics` serves every scheduler counter and every metric docs/API.md
//! names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use starling_coordinator::config::ServeConfig;
use starling_coordinator::job::Hyper;
use starling_coordinator::ledger::{GENESIS, entry_hash};
use starling_coordinator::scheduler::JobCounters;
use starling_coordinator::store::Store;
use starling_core::data::{Dataset, encode_raw};
use starling_core::{Activation, ModelSpec};

/// The schema statements `Store::open` ran before migrations existed (coordinator/src/store.rs, `SCHEMA`), verbatim:
/// every database made by that code looks like this.
const SCHEMA_BEFORE_MIGRATIONS: &str = r#"
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    dim INTEGER NOT NULL,
    train BLOB NOT NULL,
    test BLOB NOT NULL,
    owner_id INTEGER,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    hyper TEXT NOT NULL,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id),
    owner_id INTEGER,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    step INTEGER NOT NULL,
    params BLOB NOT NULL,
    optim BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    micro INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    loss REAL NOT NULL,
    correct INTEGER NOT NULL,
    agreeing INTEGER NOT NULL,
    grad BLOB NOT NULL,
    PRIMARY KEY (job_id, step, micro)
);
CREATE TABLE IF NOT EXISTS workers (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    name TEXT,
    credits_flops INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    strikes INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS credits (
    id INTEGER PRIMARY KEY,
    worker_id INTEGER NOT NULL REFERENCES workers(id),
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    micro INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    -- Hash chain (ledger.rs): hash = sha256(prev_hash | id | worker | job | step | micro | flops | at_ms).
    prev_hash TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT '',
    UNIQUE (worker_id, job_id, step, micro)
);
CREATE TABLE IF NOT EXISTS owners (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS best_checkpoints (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    step INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    params BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    loss REAL NOT NULL,
    accuracy REAL NOT NULL,
    min_agreeing INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, step, kind)
);
"#;

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("starling-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny() -> Dataset {
    Dataset::new(vec![0.0, 1.0, 1.0, 0.0, 0.5, 0.5], vec![0, 1, 2], 2).expect("valid dataset")
}

fn tiny_spec() -> ModelSpec {
    ModelSpec::dense(2, &[(3, Activation::None)])
}

/// Writes a database the way the code before migrations did: its schema, an owner, a dataset, a job, a worker and
/// three chained credits.
async fn old_database(db: &Path) -> anyhow::Result<()> {
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    sqlx::raw_sql(SCHEMA_BEFORE_MIGRATIONS)
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO owners (id, name, token_hash, created_ms) VALUES (1, 'ada', 'h-ada', 1)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("INSERT INTO datasets (id, name, dim, train, test, owner_id, created_ms) VALUES (1, 'tiny', 2, ?, ?, 1, 1)")
        .bind(encode_raw(&tiny()))
        .bind(encode_raw(&tiny()))
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO jobs (id, name, spec, hyper, dataset_id, owner_id, status, created_ms) VALUES (1, 'old', ?, ?, 1, 1, 'paused', 1)")
        .bind(serde_json::to_string(&tiny_spec())?)
        .bind(serde_json::to_string(&Hyper::default())?)
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO workers (id, token_hash, name, credits_flops, accepted, created_ms) VALUES (1, 'h-w', 'w', 300, 3, 1)")
        .execute(&pool)
        .await?;
    let mut prev = GENESIS.to_string();
    for id in 1..=3i64 {
        let hash = entry_hash(&prev, id, 1, 1, id as u64, 0, 100, id);
        sqlx::query("INSERT INTO credits (id, worker_id, job_id, step, micro, flops, at_ms, prev_hash, hash) VALUES (?, 1, 1, ?, 0, 100, ?, ?, ?)")
            .bind(id)
            .bind(id)
            .bind(id)
            .bind(&prev)
            .bind(&hash)
            .execute(&pool)
            .await?;
        prev = hash;
    }
    pool.close().await;
    Ok(())
}

#[tokio::test]
async fn a_database_from_before_migrations_opens_and_upgrades() -> anyhow::Result<()> {
    let dir = TempDir::new("migrate");
    let db = dir.0.join("old.db");
    old_database(&db).await?;

    let store = Store::open(&db).await?;
    let jobs = store.jobs().await?;
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        (jobs[0].name.as_str(), jobs[0].status.as_str()),
        ("old", "paused")
    );
    let (train, test) = store.load_dataset(jobs[0].dataset_id).await?;
    assert_eq!((train, test), (tiny(), tiny()));
    assert_eq!(store.owner_name(1).await?.as_deref(), Some("ada"));
    let report = store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((report.entries, report.total_flops), (3, 300));
    drop(store);

    // The database now records the migration it adopted; opening it again applies nothing and still works.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await?;
    // It adopted migration 1 (what it already had) and applied every later one.
    let shipped = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations"))?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "sql"))
        .count() as i64;
    assert!(shipped >= 1);
    assert_eq!(
        applied,
        (1..=shipped).map(|v| (v, true)).collect::<Vec<_>>()
    );
    pool.close().await;
    let store = Store::open(&db).await?;
    assert_eq!(store.jobs().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_fresh_database_gets_every_migration() -> anyhow::Result<()> {
    let dir = TempDir::new("fresh");
    let db = dir.0.join("new.db");
    let store = Store::open(&db).await?;
    assert!(store.jobs().await?.is_empty());
    let owner = store.create_owner("ada", "h").await?;
    assert_eq!(store.owner_name(owner.id).await?.as_deref(), Some("ada"));
    drop(store);
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await?;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await?;
    assert!(n >= 1);
    Ok(())
}

/// `GET url` with ureq, off the async threads (the server runs on this runtime).
async fn get_text(url: String) -> anyhow::Result<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let mut r = ureq::get(&url).call()?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_serve_every_scheduler_counter_and_every_documented_metric() -> anyhow::Result<()> {
    let dir = TempDir::new("metrics");
    let db = dir.0.join("starling.db");
    {
        let store = Store::open(&db).await?;
        let ds = store.insert_dataset("tiny", &tiny(), &tiny(), None).await?;
        store
            .insert_job(
                "tiny",
                &serde_json::to_string(&tiny_spec())?,
                &serde_json::to_string(&Hyper::default())?,
                ds,
                None,
            )
            .await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(starling_coordinator::run(
        listener,
        ServeConfig::for_tests(db),
        async {
            let _ = stopped.await;
        },
    ));
    let (status, text) = get_text(format!("http://{addr}/metrics")).await?;
    assert_eq!(status, 200, "{text}");

    // Every field of the scheduler's counters, by its serialised name: a new counter cannot be forgotten.
    let fields = match serde_json::to_value(JobCounters::default())? {
        serde_json::Value::Object(m) => m.keys().cloned().collect::<Vec<_>>(),
        other => anyhow::bail!("JobCounters serialises to {other}"),
    };
    assert!(fields.len() >= 13, "{fields:?}");
    for field in &fields {
        let sample = format!("{field}_total{{job=\"1\"}} 0");
        assert!(
            text.lines()
                .any(|l| l.starts_with("starling_") && l.ends_with(&sample)),
            "no counter for JobCounters.{field} in\n{text}"
        );
    }
    // Every metric docs/API.md lists under `/metrics`.
    let api =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/API.md"))?;
    let section = api
        .split("## `/metrics`")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .ok_or_else(|| anyhow::anyhow!("docs/API.md has no /metrics section"))?;
    let documented: Vec<&str> = section
        .split('`')
        .filter_map(|w| w.split('{').next())
        .filter(|w| w.starts_with("starling_"))
        .collect();
    assert!(documented.len() >= 10, "{documented:?}");
    for name in documented {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} "))),
            "docs/API.md lists {name}, /metrics lacks it:\n{text}"
        );
    }
    assert!(
        text.contains("starling_workers_connected{backend=\"cpu\"} 0"),
        "{text}"
    );
    assert!(text.contains("starling_job_step{job=\"1\"} 0"), "{text}");
    assert!(
        text.contains("starling_step_duration_seconds_bucket{le=\"+Inf\"} 0"),
        "{text}"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), server).await???;
    Ok(())
}
