//! The credit ledger: grants and clawbacks appended to the hash chain, entries, and verification.

use sqlx::Row as _;

use starling_core::protocol::{JobId, WorkerId};

use super::*;

impl Store {
    /// Credits a worker whose result agreed with an already accepted one (a speculative or late replica).
    pub async fn save_credit(
        &self,
        fence: Fence,
        step: u64,
        micro: u32,
        credit: Credit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.engine.check_fence(&mut tx, fence).await?;
        grant(self.engine, &mut tx, fence.job, step, micro, credit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes back `credit` (granted for micro-batch `micro` of `step`) with a compensating ledger entry of
    /// `-credit.flops` whose micro is `micro | ledger::CLAWBACK`, and lowers the worker's cached balance and
    /// accepted count to match; nothing when there is no such credit or it was already taken back.
    pub async fn claw_back(
        &self,
        fence: Fence,
        step: u64,
        micro: u32,
        credit: Credit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job = fence.job;
        self.engine.check_fence(&mut tx, fence).await?;
        let granted = sqlx::query(
            "SELECT flops FROM credits WHERE worker_id = $1 AND job_id = $2 AND step = $3 AND micro = $4 AND flops > 0",
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
            self.engine,
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

    /// Sum of all credit entries per worker and the total, for consistency checks.
    pub async fn credit_entries(&self) -> Result<Vec<(WorkerId, i64, i64)>> {
        let rows = sqlx::query("SELECT worker_id, COUNT(*), CAST(SUM(flops) AS BIGINT) FROM credits GROUP BY worker_id ORDER BY worker_id").fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|r| (WorkerId(r.get::<i64, _>(0) as u64), r.get(1), r.get(2)))
            .collect())
    }

    /// Ledger entries in chain order; only `worker`'s when given.
    pub async fn ledger(&self, worker: Option<WorkerId>) -> Result<Vec<crate::ledger::Entry>> {
        let sql =
            "SELECT id, worker_id, job_id, step, micro, flops, at_ms, prev_hash, hash FROM credits";
        let rows = match worker {
            Some(w) => {
                sqlx::query(&format!("{sql} WHERE worker_id = $1 ORDER BY id"))
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

/// Appends one ledger entry (unless this worker was already credited for this micro-batch) and updates the
/// worker's cached balance, inside the caller's transaction. Reading the chain head and appending cannot interleave
/// with another append: SQLite's single pool connection serialises writers, and on PostgreSQL `append_entry` takes
/// the ledger's transaction-scoped advisory lock first ([`Engine::lock_ledger`]).
pub(super) async fn grant(
    engine: Engine,
    tx: &mut AnyConnection,
    job: JobId,
    step: u64,
    micro: u32,
    c: Credit,
) -> Result<()> {
    let exists = sqlx::query(
        "SELECT 1 FROM credits WHERE worker_id = $1 AND job_id = $2 AND step = $3 AND micro = $4",
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
    append_entry(engine, tx, job, step, micro, c, c.flops as i64).await
}

/// Appends one entry of `flops` (negative for a clawback) to the hash chain and moves the worker's cached balance
/// and accepted count with it (unless an entry for this worker and `micro` exists), inside the caller's
/// transaction.
async fn append_entry(
    engine: Engine,
    tx: &mut AnyConnection,
    job: JobId,
    step: u64,
    micro: u32,
    c: Credit,
    flops: i64,
) -> Result<()> {
    engine.lock_ledger(tx).await?;
    let head = sqlx::query("SELECT id, hash FROM credits ORDER BY id DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    let (id, prev) = head.map_or((1, crate::ledger::GENESIS.to_string()), |r| {
        (r.get::<i64, _>(0) + 1, r.get(1))
    });
    let at = now_ms();
    let hash = crate::ledger::entry_hash(&prev, id, c.worker.0, job.0, step, micro, flops, at);
    let inserted = sqlx::query("INSERT INTO credits (id, worker_id, job_id, step, micro, flops, at_ms, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING")
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
        sqlx::query("UPDATE workers SET credits_flops = credits_flops + $1, accepted = accepted + $2 WHERE id = $3")
            .bind(flops)
            .bind(flops.signum())
            .bind(c.worker.0 as i64)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}
