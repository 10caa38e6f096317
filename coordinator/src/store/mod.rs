//! Persistence: the only module that writes SQL. SQLite through sqlx (one file, `--db`), written so that a
//! PostgreSQL backend can follow (plain SQL, no SQLite-only types beyond BLOB).
//!
//! Durability rules the scheduler relies on: an accepted micro-batch result and the credits it grants are written
//! in one transaction *before* the verdict is sent; a checkpoint (parameters + optimizer state) is written for
//! every applied step and replaces the previous one only if it is newer.
//!
//! Split by what is stored: `jobs` (datasets, jobs, checkpoints, accepted results, metrics), `accounts` (workers and
//! owners), `credits` (the hash-chained ledger: grants, clawbacks, verification); this module opens the database
//! and applies the versioned migrations.

mod accounts;
mod credits;
mod jobs;

pub use accounts::OwnerRow;

use std::path::Path;

use futures_util::future::BoxFuture;
use sqlx::Row as _;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

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
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The versioned schema: `migrations/NNNN_description.sql`, embedded in the binary and applied in order by sqlx's
/// migrator, which records each in `_sqlx_migrations` (with a checksum) and runs only the new ones. Listed here by
/// hand rather than with `sqlx::migrate!`: that macro needs sqlx's `macros` feature, whose proc-macro brings
/// sqlx-macros-core and, as its own dependencies, sqlx-sqlite and the bundled SQLite C library again (`cargo tree
/// -e normal,build --features sqlx/macros`); a list of `include_str!`s costs nothing. Refinery has no sqlx driver
/// (it would add rusqlite, a second SQLite binding).
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/0001_initial.sql"),
)];

/// The embedded migrations as sqlx's migrator takes them.
#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, std::result::Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            Ok(MIGRATIONS
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
    /// Features per row.
    pub dim: usize,
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
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database file and applies the schema.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a process crash (kill -9); only an OS crash may lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        // One connection: SQLite serialises writers anyway, and this keeps writes in submission order.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        Migrator::new(Embedded).await?.run(&pool).await?;
        let store = Self { pool };
        store.migrate_ledger().await?;
        Ok(store)
    }

    /// Databases from before the hash-chained ledger lack its columns: add them and chain the existing entries in
    /// id order, so `ledger verify` covers them from now on. Rust, not a migration file: chaining needs SHA-256,
    /// which SQLite does not have, and such databases predate the migrations table, so it is decided by the columns.
    async fn migrate_ledger(&self) -> Result<()> {
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
                sqlx::query("SELECT hash FROM credits WHERE id < ? ORDER BY id DESC LIMIT 1")
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
            sqlx::query("UPDATE credits SET prev_hash = ?, hash = ? WHERE id = ?")
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
