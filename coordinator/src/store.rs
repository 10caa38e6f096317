//! Persistence: the only module that writes SQL. SQLite through sqlx (one file, `--db`), written so that a
//! PostgreSQL backend can follow (plain SQL, no SQLite-only types beyond BLOB).
//!
//! Durability rules the scheduler relies on: an accepted micro-batch result and the credits it grants are written
//! in one transaction *before* the verdict is sent; a checkpoint (parameters + optimizer state) is written for
//! every applied step and replaces the previous one only if it is newer.

use std::path::Path;

use futures_util::future::BoxFuture;
use sqlx::Row as _;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use starling_core::data::{Dataset, encode_raw, parse_upload};
use starling_core::protocol::{JobId, WorkerId, f32_bytes, f32s};

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
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "initial", include_str!("../migrations/0001_initial.sql"))];

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

    pub async fn insert_dataset(
        &self,
        name: &str,
        train: &Dataset,
        test: &Dataset,
        owner: Option<i64>,
    ) -> Result<i64> {
        let row = sqlx::query("INSERT INTO datasets (name, dim, train, test, owner_id, created_ms) VALUES (?, ?, ?, ?, ?, ?) RETURNING id")
            .bind(name)
            .bind(train.dim as i64)
            .bind(encode_raw(train))
            .bind(encode_raw(test))
            .bind(owner)
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// `(dim, train rows, test rows)` of a dataset visible to `owner` (its uploader; ownerless datasets are shared).
    pub async fn dataset_exists(
        &self,
        id: i64,
        owner: Option<i64>,
    ) -> Result<Option<(usize, usize, usize)>> {
        let row = sqlx::query("SELECT dim, length(train), length(test) FROM datasets WHERE id = ? AND (owner_id IS NULL OR owner_id IS ?)")
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| {
            let dim: i64 = r.get(0);
            let rows =
                |bytes: i64| ((bytes as usize).saturating_sub(12)) / (4 * (dim as usize + 1));
            (dim as usize, rows(r.get(1)), rows(r.get(2)))
        }))
    }

    /// The datasets `owner` uploaded, oldest first (`GET /api/v1/datasets`); row counts come from the stored lengths.
    pub async fn owner_datasets(&self, owner: i64) -> Result<Vec<DatasetRow>> {
        let rows = sqlx::query("SELECT id, name, dim, length(train), length(test), created_ms FROM datasets WHERE owner_id = ? ORDER BY id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let dim: i64 = r.get(2);
                let rows =
                    |bytes: i64| ((bytes as usize).saturating_sub(12)) / (4 * (dim as usize + 1));
                DatasetRow {
                    id: r.get(0),
                    name: r.get(1),
                    dim: dim as usize,
                    train_rows: rows(r.get(3)),
                    test_rows: rows(r.get(4)),
                    created_ms: r.get(5),
                }
            })
            .collect())
    }

    pub async fn load_dataset(&self, id: i64) -> Result<(Dataset, Dataset)> {
        let row = sqlx::query("SELECT train, test FROM datasets WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let parse = |b: Vec<u8>| {
            parse_upload(&b)
                .map(|u| u.train)
                .map_err(|e| StoreError::Corrupt(format!("dataset {id}: {e}")))
        };
        Ok((parse(row.get(0))?, parse(row.get(1))?))
    }

    pub async fn insert_job(
        &self,
        name: &str,
        spec: &str,
        hyper: &str,
        dataset_id: i64,
        owner: Option<i64>,
    ) -> Result<JobId> {
        let row = sqlx::query(
            "INSERT INTO jobs (name, spec, hyper, dataset_id, owner_id, status, created_ms) VALUES (?, ?, ?, ?, ?, 'running', ?) RETURNING id",
        )
        .bind(name)
        .bind(spec)
        .bind(hyper)
        .bind(dataset_id)
        .bind(owner)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(JobId(row.get::<i64, _>(0) as u64))
    }

    pub async fn jobs(&self) -> Result<Vec<JobRow>> {
        let rows = sqlx::query("SELECT id, name, spec, hyper, dataset_id, status, created_ms, owner_id FROM jobs ORDER BY id").fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| JobRow {
                id: JobId(r.get::<i64, _>(0) as u64),
                name: r.get(1),
                spec: r.get(2),
                hyper: r.get(3),
                dataset_id: r.get(4),
                status: r.get(5),
                created_ms: r.get(6),
                owner: r.get(7),
            })
            .collect())
    }

    pub async fn set_job_status(&self, job: JobId, status: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET status = ? WHERE id = ?")
            .bind(status)
            .bind(job.0 as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes the checkpoint after `step` steps (replacing an older one, never a newer one), records the step's
    /// training metric and drops the accepted results of finished steps, in one transaction.
    pub async fn save_checkpoint(
        &self,
        job: JobId,
        ckpt: &Checkpoint,
        train: &MetricRow,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO checkpoints (job_id, step, params, optim, updated_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, params = excluded.params,
               optim = excluded.optim, updated_ms = excluded.updated_ms
             WHERE excluded.step > checkpoints.step",
        )
        .bind(job.0 as i64)
        .bind(ckpt.step as i64)
        .bind(f32_bytes(&ckpt.params))
        .bind(&ckpt.optim)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        insert_metric(&mut tx, job, train).await?;
        sqlx::query("DELETE FROM accepted WHERE job_id = ? AND step < ?")
            .bind(job.0 as i64)
            .bind(ckpt.step as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_checkpoint(&self, job: JobId) -> Result<Option<Checkpoint>> {
        let row = sqlx::query("SELECT step, params, optim FROM checkpoints WHERE job_id = ?")
            .bind(job.0 as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Checkpoint {
            step: r.get::<i64, _>(0) as u64,
            params: f32s(&r.get::<Vec<u8>, _>(1)),
            optim: r.get(2),
        }))
    }

    /// Records an accepted micro-batch result and credits every agreeing worker, atomically. Idempotent: a second
    /// call for the same (job, step, micro) changes nothing, so no credit is ever doubled.
    pub async fn save_accepted(
        &self,
        job: JobId,
        step: u64,
        a: &AcceptedRow,
        credits: &[Credit],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO accepted (job_id, step, micro, rows, loss, correct, agreeing, grad) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job.0 as i64)
        .bind(step as i64)
        .bind(a.micro as i64)
        .bind(a.rows as i64)
        .bind(a.loss)
        .bind(a.correct as i64)
        .bind(a.agreeing as i64)
        .bind(f32_bytes(&a.grad))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            for c in credits {
                grant(&mut tx, job, step, a.micro, *c).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Credits a worker whose result agreed with an already accepted one (a speculative or late replica).
    pub async fn save_credit(
        &self,
        job: JobId,
        step: u64,
        micro: u32,
        credit: Credit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        grant(&mut tx, job, step, micro, credit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes back `credit` (granted for micro-batch `micro` of `step`) with a compensating ledger entry of
    /// `-credit.flops` whose micro is `micro | ledger::CLAWBACK`, and lowers the worker's cached balance and
    /// accepted count to match; nothing when there is no such credit or it was already taken back.
    pub async fn claw_back(&self, job: JobId, step: u64, micro: u32, credit: Credit) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let granted = sqlx::query(
            "SELECT flops FROM credits WHERE worker_id = ? AND job_id = ? AND step = ? AND micro = ? AND flops > 0",
        )
        .bind(credit.worker.0 as i64)
        .bind(job.0 as i64)
        .bind(step as i64)
        .bind(micro as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(granted) = granted.map(|r| r.get::<i64, _>(0)) else {
            return Ok(());
        };
        let back = Credit {
            worker: credit.worker,
            flops: granted as u64,
        };
        append_entry(
            &mut tx,
            job,
            step,
            micro | crate::ledger::CLAWBACK,
            back,
            -granted,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_accepted(&self, job: JobId, step: u64) -> Result<Vec<AcceptedRow>> {
        let rows = sqlx::query("SELECT micro, rows, loss, correct, agreeing, grad FROM accepted WHERE job_id = ? AND step = ? ORDER BY micro")
            .bind(job.0 as i64)
            .bind(step as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| AcceptedRow {
                micro: r.get::<i64, _>(0) as u32,
                rows: r.get::<i64, _>(1) as u32,
                loss: r.get(2),
                correct: r.get::<i64, _>(3) as u32,
                agreeing: r.get::<i64, _>(4) as u32,
                grad: f32s(&r.get::<Vec<u8>, _>(5)),
            })
            .collect())
    }

    pub async fn insert_eval(&self, job: JobId, m: &MetricRow) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_metric(&mut tx, job, m).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn metrics(&self, job: JobId) -> Result<Vec<MetricRow>> {
        let rows = sqlx::query("SELECT step, kind, loss, accuracy, min_agreeing, at_ms FROM metrics WHERE job_id = ? ORDER BY step, kind")
            .bind(job.0 as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| MetricRow {
                step: r.get::<i64, _>(0) as u64,
                kind: r.get(1),
                loss: r.get::<f64, _>(2) as f32,
                accuracy: r.get::<f64, _>(3) as f32,
                min_agreeing: r.get::<i64, _>(4) as u32,
                at_ms: r.get(5),
            })
            .collect())
    }

    pub async fn worker_by_token_hash(&self, hash: &str) -> Result<Option<WorkerRow>> {
        let row = sqlx::query(&format!("{WORKER_SELECT} WHERE token_hash = ?"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(worker_row))
    }

    pub async fn create_worker(&self, hash: &str, name: Option<&str>) -> Result<WorkerRow> {
        let row = sqlx::query(
            "INSERT INTO workers (token_hash, name, created_ms) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(hash)
        .bind(name)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        let id: i64 = row.get(0);
        Ok(WorkerRow {
            id: WorkerId(id as u64),
            name: name.map(str::to_string),
            credits_flops: 0,
            accepted: 0,
            rejected: 0,
            strikes: 0,
            refused: false,
        })
    }

    pub async fn workers(&self) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query(&format!("{WORKER_SELECT} ORDER BY credits_flops DESC, id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(worker_row).collect())
    }

    /// Records a rejected result: one strike, and refusal once `refused` is decided by the scheduler.
    pub async fn record_rejection(&self, worker: WorkerId, refused: bool) -> Result<()> {
        sqlx::query("UPDATE workers SET rejected = rejected + 1, strikes = strikes + 1, refused = MAX(refused, ?) WHERE id = ?")
            .bind(refused as i64)
            .bind(worker.0 as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sum of all credit entries per worker and the total, for consistency checks.
    pub async fn credit_entries(&self) -> Result<Vec<(WorkerId, i64, i64)>> {
        let rows = sqlx::query("SELECT worker_id, COUNT(*), SUM(flops) FROM credits GROUP BY worker_id ORDER BY worker_id").fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| (WorkerId(r.get::<i64, _>(0) as u64), r.get(1), r.get(2)))
            .collect())
    }
}

/// A project owner (holder of an API token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRow {
    pub id: i64,
    pub name: String,
}

impl Store {
    /// Creates an owner with the given token hash; fails if the name is taken.
    pub async fn create_owner(&self, name: &str, token_hash: &str) -> Result<OwnerRow> {
        let row = sqlx::query(
            "INSERT INTO owners (name, token_hash, created_ms) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(token_hash)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(OwnerRow {
            id: row.get(0),
            name: name.to_string(),
        })
    }

    pub async fn owner_by_token_hash(&self, hash: &str) -> Result<Option<OwnerRow>> {
        let row = sqlx::query("SELECT id, name FROM owners WHERE token_hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| OwnerRow {
            id: r.get(0),
            name: r.get(1),
        }))
    }

    pub async fn owner_name(&self, id: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM owners WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn owner_by_name(&self, name: &str) -> Result<Option<OwnerRow>> {
        let row = sqlx::query("SELECT id, name FROM owners WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| OwnerRow {
            id: r.get(0),
            name: r.get(1),
        }))
    }

    /// Keeps the parameters of the best evaluated version (only if `accuracy` beats the stored one).
    pub async fn save_best(
        &self,
        job: JobId,
        step: u64,
        accuracy: f32,
        params: &[f32],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO best_checkpoints (job_id, step, accuracy, params, updated_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, accuracy = excluded.accuracy,
               params = excluded.params, updated_ms = excluded.updated_ms
             WHERE excluded.accuracy > best_checkpoints.accuracy",
        )
        .bind(job.0 as i64)
        .bind(step as i64)
        .bind(accuracy as f64)
        .bind(f32_bytes(params))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The best evaluated version: `(step, accuracy, params)`.
    pub async fn load_best(&self, job: JobId) -> Result<Option<(u64, f32, Vec<f32>)>> {
        let row =
            sqlx::query("SELECT step, accuracy, params FROM best_checkpoints WHERE job_id = ?")
                .bind(job.0 as i64)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| {
            (
                r.get::<i64, _>(0) as u64,
                r.get::<f64, _>(1) as f32,
                f32s(&r.get::<Vec<u8>, _>(2)),
            )
        }))
    }
}

impl Store {
    /// Ledger entries in chain order; only `worker`'s when given.
    pub async fn ledger(&self, worker: Option<WorkerId>) -> Result<Vec<crate::ledger::Entry>> {
        let sql =
            "SELECT id, worker_id, job_id, step, micro, flops, at_ms, prev_hash, hash FROM credits";
        let rows = match worker {
            Some(w) => {
                sqlx::query(&format!("{sql} WHERE worker_id = ? ORDER BY id"))
                    .bind(w.0 as i64)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{sql} ORDER BY id"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| crate::ledger::Entry {
                id: r.get(0),
                worker: r.get::<i64, _>(1) as u64,
                job: r.get::<i64, _>(2) as u64,
                step: r.get::<i64, _>(3) as u64,
                micro: r.get::<i64, _>(4) as u32,
                flops: r.get(5),
                at_ms: r.get(6),
                prev_hash: r.get(7),
                hash: r.get(8),
            })
            .collect())
    }

    /// Hash of the newest ledger entry (the genesis hash when there is none).
    pub async fn ledger_head(&self) -> Result<String> {
        let row = sqlx::query("SELECT hash FROM credits ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map_or_else(|| crate::ledger::GENESIS.to_string(), |r| r.get(0)))
    }

    /// Checks the whole ledger against itself and against every worker's cached balance (`starling ledger verify`).
    pub async fn verify_ledger(
        &self,
    ) -> Result<std::result::Result<crate::ledger::Report, crate::ledger::LedgerError>> {
        let entries = self.ledger(None).await?;
        let balances: Vec<crate::ledger::Balance> = self
            .workers()
            .await?
            .iter()
            .map(|w| crate::ledger::balance(w.id, w.credits_flops, w.accepted))
            .collect();
        Ok(crate::ledger::verify(&entries, &balances))
    }
}

const WORKER_SELECT: &str =
    "SELECT id, name, credits_flops, accepted, rejected, strikes, refused FROM workers";

fn worker_row(r: sqlx::sqlite::SqliteRow) -> WorkerRow {
    WorkerRow {
        id: WorkerId(r.get::<i64, _>(0) as u64),
        name: r.get(1),
        credits_flops: r.get(2),
        accepted: r.get(3),
        rejected: r.get(4),
        strikes: r.get(5),
        refused: r.get::<i64, _>(6) != 0,
    }
}

/// Appends one ledger entry (unless this worker was already credited for this micro-batch) and updates the
/// worker's cached balance, inside the caller's transaction. The single pool connection serialises writers, so
/// reading the chain head and appending cannot interleave with another append.
async fn grant(
    tx: &mut sqlx::SqliteConnection,
    job: JobId,
    step: u64,
    micro: u32,
    c: Credit,
) -> Result<()> {
    let exists = sqlx::query(
        "SELECT 1 FROM credits WHERE worker_id = ? AND job_id = ? AND step = ? AND micro = ?",
    )
    .bind(c.worker.0 as i64)
    .bind(job.0 as i64)
    .bind(step as i64)
    .bind(micro as i64)
    .fetch_optional(&mut *tx)
    .await?;
    if exists.is_some() {
        return Ok(());
    }
    append_entry(tx, job, step, micro, c, c.flops as i64).await
}

/// Appends one entry of `flops` (negative for a clawback) to the hash chain and moves the worker's cached balance
/// and accepted count with it (unless an entry for this worker and `micro` exists), inside the caller's
/// transaction.
async fn append_entry(
    tx: &mut sqlx::SqliteConnection,
    job: JobId,
    step: u64,
    micro: u32,
    c: Credit,
    flops: i64,
) -> Result<()> {
    let head = sqlx::query("SELECT id, hash FROM credits ORDER BY id DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    let (id, prev) = head.map_or((1, crate::ledger::GENESIS.to_string()), |r| {
        (r.get::<i64, _>(0) + 1, r.get(1))
    });
    let at = now_ms();
    let hash = crate::ledger::entry_hash(&prev, id, c.worker.0, job.0, step, micro, flops, at);
    let inserted = sqlx::query("INSERT OR IGNORE INTO credits (id, worker_id, job_id, step, micro, flops, at_ms, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(id)
        .bind(c.worker.0 as i64)
        .bind(job.0 as i64)
        .bind(step as i64)
        .bind(micro as i64)
        .bind(flops)
        .bind(at)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if inserted == 1 {
        sqlx::query("UPDATE workers SET credits_flops = credits_flops + ?, accepted = accepted + ? WHERE id = ?")
            .bind(flops)
            .bind(flops.signum())
            .bind(c.worker.0 as i64)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

async fn insert_metric(tx: &mut sqlx::SqliteConnection, job: JobId, m: &MetricRow) -> Result<()> {
    sqlx::query("INSERT OR REPLACE INTO metrics (job_id, step, kind, loss, accuracy, min_agreeing, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .bind(job.0 as i64)
        .bind(m.step as i64)
        .bind(&m.kind)
        .bind(m.loss as f64)
        .bind(m.accuracy as f64)
        .bind(m.min_agreeing as i64)
        .bind(m.at_ms)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
