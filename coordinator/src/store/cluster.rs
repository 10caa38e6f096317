//! Several coordinator nodes on one PostgreSQL database: the node registry (heartbeats, public URLs), job
//! leadership (advisory locks held on a dedicated connection) and the leader epoch every write of a job is fenced by.
//! On SQLite there is one node, the leader of every job: these calls answer accordingly and write nothing.

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::Executor as _;
use sqlx::Row as _;

use starling_core::protocol::JobId;

use super::*;

/// A coordinator node as the registry has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    /// Base URL workers and owners reach it at (`--public-url`).
    pub public_url: String,
    pub heartbeat_ms: i64,
}

/// A job's leadership as stored: who took it last, at which epoch, and the job's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRow {
    pub job: JobId,
    pub status: String,
    pub epoch: u64,
    pub node: Option<String>,
}

/// Upper half of every job's advisory-lock key (the lower half is the job id), so the keys cannot meet another
/// application's locks or the ledger's.
const JOB_LOCK_CLASS: i64 = 0x5354_4a42; // "STJB"

fn job_key(job: JobId) -> i64 {
    (JOB_LOCK_CLASS << 32) | (job.0 as i64 & 0xffff_ffff)
}

fn postgres_only() -> StoreError {
    StoreError::Db(sqlx::Error::Configuration(
        "job leadership needs PostgreSQL (SQLite has one node, the leader of every job)".into(),
    ))
}

impl Store {
    /// Records that `node` is alive and reachable at `public_url` (PostgreSQL; nothing on SQLite).
    pub async fn heartbeat(&self, node: &str, public_url: &str) -> Result<()> {
        if self.engine == Engine::Sqlite {
            return Ok(());
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO nodes (node_id, public_url, heartbeat_ms, started_ms) VALUES ($1, $2, $3, $3)
             ON CONFLICT (node_id) DO UPDATE SET public_url = excluded.public_url, heartbeat_ms = excluded.heartbeat_ms",
        )
        .bind(node)
        .bind(public_url)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Nodes whose last heartbeat is at most `within` old, by id (none on SQLite).
    pub async fn live_nodes(&self, within: Duration) -> Result<Vec<NodeRow>> {
        if self.engine == Engine::Sqlite {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT node_id, public_url, heartbeat_ms FROM nodes WHERE heartbeat_ms >= $1 ORDER BY node_id",
        )
        .bind(now_ms() - within.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| NodeRow {
                node_id: r.get(0),
                public_url: r.get(1),
                heartbeat_ms: r.get(2),
            })
            .collect())
    }

    /// Every job's status and last leadership, by id (SQLite: epoch 0, no node).
    pub async fn leaders(&self) -> Result<Vec<LeaderRow>> {
        let sql = match self.engine {
            Engine::Sqlite => "SELECT id, status, 0, NULL FROM jobs ORDER BY id",
            Engine::Postgres => {
                "SELECT id, status, leader_epoch, leader_node FROM jobs ORDER BY id"
            }
        };
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| LeaderRow {
                job: JobId(r.get::<i64, _>(0) as u64),
                status: r.get(1),
                epoch: r.get::<i64, _>(2) as u64,
                node: r.get(3),
            })
            .collect())
    }

    /// Takes job `job`'s leadership for `node`: bumps its epoch and returns the new one, which fences every
    /// earlier leader's writes from now on. Call only while holding the job's lock ([`Leadership::try_lock`]).
    /// The `UPDATE` waits for a transaction of the previous leader that holds the job row (see
    /// [`Engine::check_fence`]), so whatever that leader committed is visible to the load that follows.
    pub async fn claim_job(&self, job: JobId, node: &str) -> Result<u64> {
        if self.engine == Engine::Sqlite {
            return Ok(0);
        }
        let row = sqlx::query(
            "UPDATE jobs SET leader_epoch = leader_epoch + 1, leader_node = $1 WHERE id = $2 RETURNING leader_epoch",
        )
        .bind(node)
        .bind(job.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.get::<i64, _>(0) as u64)
            .ok_or_else(|| StoreError::Corrupt(format!("job {job} vanished while it was claimed")))
    }

    /// Opens this node's dedicated leadership connection (PostgreSQL only). Its session holds the advisory lock of
    /// every job the node leads; the server ends the session once it has been idle for `lease`
    /// (`idle_session_timeout`), which releases them all, so a node that stops pinging (crashed, paused, cut off)
    /// loses its jobs within one lease.
    pub async fn leadership(&self, lease: Duration) -> Result<Leadership> {
        let url = self.url.as_deref().ok_or_else(postgres_only)?;
        let mut conn = sqlx::AnyConnection::connect(url).await?;
        conn.execute(format!("SET idle_session_timeout = {}", lease.as_millis().max(100)).as_str())
            .await?;
        Ok(Leadership { conn })
    }
}

/// The dedicated connection whose session holds this node's job locks. Every lock lives exactly as long as this
/// session: dropping it, the server ending it, or the process dying releases them.
#[derive(Debug)]
pub struct Leadership {
    conn: sqlx::AnyConnection,
}

impl Leadership {
    /// Takes job `job`'s lock unless another session holds it. Re-entrant in PostgreSQL, so a node asks only for
    /// jobs it does not lead yet.
    pub async fn try_lock(&mut self, job: JobId) -> Result<bool> {
        let row = sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(job_key(job))
            .fetch_one(&mut self.conn)
            .await?;
        Ok(row.get::<bool, _>(0))
    }

    /// Gives job `job`'s lock back (its leadership ends; a node that finished it, or has too many).
    pub async fn unlock(&mut self, job: JobId) -> Result<()> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(job_key(job))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Keeps the session (and its locks) alive; fails once the server has ended it.
    pub async fn ping(&mut self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&mut self.conn).await?;
        Ok(())
    }
}
