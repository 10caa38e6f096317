//! Persistence: the only module that writes SQL. One store interface over two engines through sqlx's `Any`
//! driver: SQLite (the embedded default, one file, one node) and PostgreSQL (`--db postgres://…`, several nodes).
//! Every query is one SQL text both engines accept (`$n` placeholders, `ON CONFLICT`, `IS NOT DISTINCT FROM`,
//! columns read as `i64`/`f64`/`String`/`Vec<u8>`); where the engines differ the difference lives in [`Engine`]'s
//! methods in this file, nowhere else. Each engine has its own versioned migrations (`migrations/` for SQLite,
//! `migrations/postgres/` for PostgreSQL), numbered alike.
//!
//! Durability rules the scheduler relies on: an accepted micro-batch result and the credits it grants are written
//! in one transaction *before* the verdict is sent; a checkpoint (parameters + optimizer state) is written for
//! every applied step and replaces the previous one only if it is newer. On PostgreSQL every write of a job is
//! fenced by the job's `leader_epoch` in the same transaction ([`Fence`]): a node that lost the job's leadership
//! (paused past its lease, then continued) cannot write for it any more.
//!
//! Split by what is stored: `jobs` (datasets, jobs, checkpoints, accepted results, metrics), `accounts` (workers and
//! owners), `credits` (the hash-chained ledger: grants, clawbacks, verification), `cluster` (nodes, leadership
//! locks and epochs; PostgreSQL only); this module opens the database and applies the versioned migrations.

mod accounts;
mod cluster;
mod credits;
mod jobs;

pub use accounts::OwnerRow;
pub use cluster::{LeaderRow, Leadership, NodeRow};
pub use jobs::BestCheckpoint;

use std::path::Path;
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::ConnectOptions as _;
use sqlx::Executor as _;
use sqlx::Row as _;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool};

use starling_core::protocol::{JobId, WorkerId};

/// A storage failure; logged once, reported to clients as an internal error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The write was for a job this node no longer leads: its `leader_epoch` moved past the writer's.
    #[error("job {job} is led at epoch {current}, not {epoch}: this node lost its leadership")]
    Fenced {
        job: JobId,
        epoch: u64,
        current: u64,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database engine a store runs on; the one place where SQL differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One embedded file; one coordinator process, always the leader of every job.
    Sqlite,
    /// A server shared by several coordinator nodes; leadership per job through advisory locks.
    Postgres,
}

impl Engine {
    /// The migrations of this engine, applied in order by sqlx's migrator.
    fn migrations(self) -> &'static [(i64, &'static str, &'static str)] {
        match self {
            Self::Sqlite => SQLITE_MIGRATIONS,
            Self::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    /// Serialises appends to the ledger's hash chain inside the caller's transaction. SQLite's single pool
    /// connection already serialises writers; on PostgreSQL several nodes append at once, so the transaction
    /// takes a transaction-scoped advisory lock (released at commit or rollback) before reading the chain head.
    async fn lock_ledger(self, tx: &mut AnyConnection) -> Result<()> {
        if self == Self::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(LEDGER_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Checks inside the caller's transaction that `fence` is still the job's leadership; on PostgreSQL the job
    /// row is locked `FOR SHARE` until commit, so a takeover (which bumps the epoch with an `UPDATE` of that row)
    /// waits for this transaction, and this transaction, if it comes second, sees the new epoch and fails. SQLite
    /// has one node, always the leader: nothing to check.
    async fn check_fence(self, tx: &mut AnyConnection, fence: Fence) -> Result<()> {
        if self == Self::Sqlite {
            return Ok(());
        }
        let row = sqlx::query("SELECT leader_epoch FROM jobs WHERE id = $1 FOR SHARE")
            .bind(fence.job.0 as i64)
            .fetch_optional(&mut *tx)
            .await?;
        let current = row.map_or(0, |r| r.get::<i64, _>(0) as u64);
        if current != fence.epoch {
            return Err(StoreError::Fenced {
                job: fence.job,
                epoch: fence.epoch,
                current,
            });
        }
        Ok(())
    }
}

/// Key of the advisory lock that serialises ledger appends on PostgreSQL (any constant unused elsewhere).
const LEDGER_LOCK: i64 = 0x5354_4c47; // "STLG"

/// The right to write for one job: its id and the leadership epoch this node holds it at (always 0 on SQLite).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub job: JobId,
    pub epoch: u64,
}

/// The versioned schema: `migrations/NNNN_description.sql` (SQLite) and `migrations/postgres/NNNN_description.sql`
/// (PostgreSQL), embedded in the binary and applied in order by sqlx's migrator, which records each in
/// `_sqlx_migrations` (with a checksum) and runs only the new ones (on PostgreSQL under its advisory lock, so nodes
/// starting together migrate once). Listed here by hand rather than with `sqlx::migrate!`: that macro needs sqlx's
/// `macros` feature, whose proc-macro brings sqlx-macros-core and, as its own dependencies, sqlx-sqlite and the
/// bundled SQLite C library again (`cargo tree -e normal,build --features sqlx/macros`); a list of `include_str!`s
/// costs nothing. Refinery has no sqlx driver (it would add rusqlite, a second SQLite binding).
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "best_loss",
        include_str!("../../migrations/0002_best_loss.sql"),
    ),
];

/// PostgreSQL's migrations, numbered like SQLite's (a file here for each file there, in PostgreSQL's types).
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "best_loss",
        include_str!("../../migrations/postgres/0002_best_loss.sql"),
    ),
];

/// The embedded migrations of one engine as sqlx's migrator takes them.
#[derive(Debug)]
struct Embedded(Engine);

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, std::result::Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .migrations()
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        description.into(),
                        MigrationType::Simple,
                        sql.into(),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: JobId,
    pub owner: Option<i64>,
    pub name: String,
    pub spec: String,
    pub hyper: String,
    pub dataset_id: i64,
    pub status: String,
    pub created_ms: i64,
}

/// A worker as stored.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: WorkerId,
    pub name: Option<String>,
    pub credits_flops: i64,
    pub accepted: i64,
    pub rejected: i64,
    pub strikes: i64,
    pub refused: bool,
}

/// An accepted micro-batch result of the step in progress.
#[derive(Debug, Clone)]
pub struct AcceptedRow {
    pub micro: u32,
    pub rows: u32,
    pub loss: f32,
    pub correct: u32,
    pub agreeing: u32,
    pub grad: Vec<f32>,
}

/// A dataset as its owner lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatasetRow {
    pub id: i64,
    pub name: String,
    /// Features per row (a token dataset's context length).
    pub dim: usize,
    /// `rows` (a classifier's features and labels) or `tokens` (an `STK1` stream; rows are its windows).
    pub kind: &'static str,
    pub train_rows: usize,
    pub test_rows: usize,
    pub created_ms: i64,
}

/// A metric point.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricRow {
    pub step: u64,
    /// `train` (mean over the step's verified micro-batches) or `eval` (held-out test set).
    pub kind: String,
    pub loss: f32,
    pub accuracy: f32,
    /// Fewest agreeing workers behind any micro-batch of this step (train rows only).
    pub min_agreeing: u32,
    pub at_ms: i64,
}

/// A checkpoint: parameters and optimizer state after `step` steps.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: u64,
    pub params: Vec<f32>,
    pub optim: Vec<u8>,
}

/// Credit granted to one worker for one accepted micro-batch.
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    pub worker: WorkerId,
    pub flops: u64,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    engine: Engine,
    /// The PostgreSQL URL, for the dedicated leadership connection (`None` on SQLite).
    url: Option<String>,
}

/// Whether `db` names a PostgreSQL server (`postgres://…` or `postgresql://…`) rather than a SQLite file.
pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

impl Store {
    /// Opens `db`: a PostgreSQL URL, or else a SQLite file (created if needed); applies the schema.
    pub async fn connect(db: &str) -> Result<Self> {
        if is_postgres_url(db) {
            Self::open_postgres(db, Duration::from_secs(5)).await
        } else {
            Self::open(Path::new(db)).await
        }
    }

    /// Opens (creating if needed) a SQLite database file and applies the schema.
    pub async fn open(path: &Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .to_url_lossy();
        let options = AnyConnectOptions::from_url(&url)?;
        // One connection: SQLite serialises writers anyway, and this keeps writes in submission order.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL with synchronous NORMAL survives a process crash (kill -9); only an OS crash may lose
                    // the last commits.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Migrator::new(Embedded(Engine::Sqlite))
            .await?
            .run(&pool)
            .await?;
        let store = Self {
            pool,
            engine: Engine::Sqlite,
            url: None,
        };
        store.migrate_ledger().await?;
        Ok(store)
    }

    /// Connects to PostgreSQL and applies its schema. `lease` bounds how long a paused node can keep anything
    /// locked: a transaction left idle longer than that is ended by the server (`idle_in_transaction_session_timeout`),
    /// so a node stopped mid-transaction cannot hold a job row against its successor.
    pub async fn open_postgres(url: &str, lease: Duration) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let options = AnyConnectOptions::from_url(&url.parse().map_err(|e| {
            StoreError::Db(sqlx::Error::Configuration(
                format!("bad PostgreSQL URL: {e}").into(),
            ))
        })?)?;
        let idle_ms = lease.as_millis().max(100);
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    conn.execute(
                        format!("SET idle_in_transaction_session_timeout = {idle_ms}").as_str(),
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Migrator::new(Embedded(Engine::Postgres))
            .await?
            .run(&pool)
            .await?;
        Ok(Self {
            pool,
            engine: Engine::Postgres,
            url: Some(url.to_string()),
        })
    }

    /// The PostgreSQL URL this store was opened with (`None` on SQLite).
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The engine this store runs on.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Closes every pooled connection (tests and shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Databases from before the hash-chained ledger lack its columns: add them and chain the existing entries in
    /// id order, so `ledger verify` covers them from now on. Rust, not a migration file: chaining needs SHA-256,
    /// which SQLite does not have, and such databases predate the migrations table, so it is decided by the columns.
    async fn migrate_ledger(&self) -> Result<()> {
        if self.engine != Engine::Sqlite {
            return Ok(());
        }
        let cols: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info('credits')")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if cols.iter().any(|c| c == "hash") {
            // Already chained; never re-chain here, or blanking a hash would launder an edited entry.
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for col in ["prev_hash", "hash"] {
            sqlx::query(&format!(
                "ALTER TABLE credits ADD COLUMN {col} TEXT NOT NULL DEFAULT ''"
            ))
            .execute(&mut *tx)
            .await?;
        }
        let unchained = sqlx::query("SELECT id, worker_id, job_id, step, micro, flops, at_ms FROM credits WHERE hash = '' ORDER BY id").fetch_all(&mut *tx).await?;
        for r in unchained {
            let id: i64 = r.get(0);
            let prev: Option<String> =
                sqlx::query("SELECT hash FROM credits WHERE id < $1 ORDER BY id DESC LIMIT 1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|p| p.get(0));
            let prev = prev.unwrap_or_else(|| crate::ledger::GENESIS.to_string());
            let hash = crate::ledger::entry_hash(
                &prev,
                id,
                r.get::<i64, _>(1) as u64,
                r.get::<i64, _>(2) as u64,
                r.get::<i64, _>(3) as u64,
                r.get::<i64, _>(4) as u32,
                r.get::<i64, _>(5),
                r.get(6),
            );
            sqlx::query("UPDATE credits SET prev_hash = $1, hash = $2 WHERE id = $3")
                .bind(&prev)
                .bind(&hash)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
