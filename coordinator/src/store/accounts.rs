//! Workers (token hashes, standing) and project owners.

use sqlx::Row as _;

use starling_core::protocol::WorkerId;

use super::*;

/// A project owner (holder of an API token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerRow {
    pub id: i64,
    pub name: String,
}

impl Store {
    pub async fn worker_by_token_hash(&self, hash: &str) -> Result<Option<WorkerRow>> {
        let row = sqlx::query(&format!("{WORKER_SELECT} WHERE token_hash = $1"))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(worker_row))
    }

    pub async fn create_worker(&self, hash: &str, name: Option<&str>) -> Result<WorkerRow> {
        let row = sqlx::query(
            "INSERT INTO workers (token_hash, name, created_ms) VALUES ($1, $2, $3) RETURNING id",
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
        sqlx::query("UPDATE workers SET rejected = rejected + 1, strikes = strikes + 1, refused = CASE WHEN $1 <> 0 THEN 1 ELSE refused END WHERE id = $2")
            .bind(refused as i64)
            .bind(worker.0 as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Creates an owner with the given token hash; fails if the name is taken.
    pub async fn create_owner(&self, name: &str, token_hash: &str) -> Result<OwnerRow> {
        let row = sqlx::query(
            "INSERT INTO owners (name, token_hash, created_ms) VALUES ($1, $2, $3) RETURNING id",
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
        let row = sqlx::query("SELECT id, name FROM owners WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| OwnerRow {
            id: r.get(0),
            name: r.get(1),
        }))
    }

    pub async fn owner_name(&self, id: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM owners WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn owner_by_name(&self, name: &str) -> Result<Option<OwnerRow>> {
        let row = sqlx::query("SELECT id, name FROM owners WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| OwnerRow {
            id: r.get(0),
            name: r.get(1),
        }))
    }
}

pub(super) const WORKER_SELECT: &str =
    "SELECT id, name, credits_flops, accepted, rejected, strikes, refused FROM workers";

pub(super) fn worker_row(r: sqlx::any::AnyRow) -> WorkerRow {
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
