//! Datasets, jobs, checkpoints (latest and best), the accepted results of the step in progress, and metrics.

use sqlx::Row as _;

use starling_core::data::Dataset;
use starling_core::protocol::{JobId, f32_bytes, f32s};

use super::credits::grant;
use super::*;
use crate::examples::{Examples, token_header};

impl Store {
    pub async fn insert_dataset(
        &self,
        name: &str,
        train: &Dataset,
        test: &Dataset,
        owner: Option<i64>,
    ) -> Result<i64> {
        self.insert_examples(
            name,
            &Examples::Rows(train.clone()),
            &Examples::Rows(test.clone()),
            owner,
        )
        .await
    }

    /// Stores a dataset of either kind: rows as raw `SDS1`, token streams as `STK1` (`dim` is then the context).
    pub async fn insert_examples(
        &self,
        name: &str,
        train: &Examples,
        test: &Examples,
        owner: Option<i64>,
    ) -> Result<i64> {
        let dim = match train {
            Examples::Rows(d) => d.dim,
            Examples::Tokens { stream, .. } => stream.context,
        };
        let encode = |e: &Examples| e.encode().map_err(|e| StoreError::Corrupt(e.to_string()));
        let row = sqlx::query("INSERT INTO datasets (name, dim, train, test, owner_id, created_ms) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id")
            .bind(name)
            .bind(dim as i64)
            .bind(encode(train)?)
            .bind(encode(test)?)
            .bind(owner)
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// `(dim, train rows, test rows)` of a dataset visible to `owner` (its uploader; ownerless datasets are shared).
    /// A token dataset's rows are its windows and its `dim` the context.
    pub async fn dataset_exists(
        &self,
        id: i64,
        owner: Option<i64>,
    ) -> Result<Option<(usize, usize, usize)>> {
        let row = sqlx::query("SELECT dim, length(train), length(test), substr(train, 1, 36), substr(test, 1, 36) FROM datasets WHERE id = $1 AND (owner_id IS NULL OR owner_id IS NOT DISTINCT FROM $2)")
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| {
            let dim: i64 = r.get(0);
            let rows = |bytes: i64, head: Vec<u8>| stored_rows(dim as usize, bytes, &head);
            (
                dim as usize,
                rows(r.get(1), r.get(3)),
                rows(r.get(2), r.get(4)),
            )
        }))
    }

    /// The datasets `owner` uploaded, oldest first (`GET /api/v1/datasets`); row counts come from the stored lengths
    /// (a token stream's from its header).
    pub async fn owner_datasets(&self, owner: i64) -> Result<Vec<DatasetRow>> {
        let rows = sqlx::query("SELECT id, name, dim, length(train), length(test), created_ms, substr(train, 1, 36), substr(test, 1, 36) FROM datasets WHERE owner_id = $1 ORDER BY id")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let dim: i64 = r.get(2);
                let head: Vec<u8> = r.get(6);
                let kind = if token_header(&head).is_some() {
                    "tokens"
                } else {
                    "rows"
                };
                DatasetRow {
                    id: r.get(0),
                    name: r.get(1),
                    dim: dim as usize,
                    kind,
                    train_rows: stored_rows(dim as usize, r.get(3), &head),
                    test_rows: stored_rows(dim as usize, r.get(4), &r.get::<Vec<u8>, _>(7)),
                    created_ms: r.get(5),
                }
            })
            .collect())
    }

    /// A row dataset's two sides (a token dataset is refused: read it with [`Store::load_examples`]).
    pub async fn load_dataset(&self, id: i64) -> Result<(Dataset, Dataset)> {
        match self.load_examples(id).await? {
            (Examples::Rows(train), Examples::Rows(test)) => Ok((train, test)),
            _ => Err(StoreError::Corrupt(format!(
                "dataset {id} is a token dataset, not rows"
            ))),
        }
    }

    /// A dataset's training and held-out sides, rows or token streams.
    pub async fn load_examples(&self, id: i64) -> Result<(Examples, Examples)> {
        let row = sqlx::query("SELECT train, test FROM datasets WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let parse = |b: Vec<u8>| {
            Examples::decode(&b).map_err(|e| StoreError::Corrupt(format!("dataset {id}: {e}")))
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
            "INSERT INTO jobs (name, spec, hyper, dataset_id, owner_id, status, created_ms) VALUES ($1, $2, $3, $4, $5, 'running', $6) RETURNING id",
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

    /// Sets a job's status (fenced: only its leader writes it).
    pub async fn set_job_status(&self, fence: Fence, status: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.engine.check_fence(&mut tx, fence).await?;
        sqlx::query("UPDATE jobs SET status = $1 WHERE id = $2")
            .bind(status)
            .bind(fence.job.0 as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes the checkpoint after `step` steps (replacing an older one, never a newer one), records the step's
    /// training metric and drops the accepted results of finished steps, in one transaction.
    pub async fn save_checkpoint(
        &self,
        fence: Fence,
        ckpt: &Checkpoint,
        train: &MetricRow,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job = fence.job;
        self.engine.check_fence(&mut tx, fence).await?;
        sqlx::query(
            "INSERT INTO checkpoints (job_id, step, params, optim, updated_ms) VALUES ($1, $2, $3, $4, $5)
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
        sqlx::query("DELETE FROM accepted WHERE job_id = $1 AND step < $2")
            .bind(job.0 as i64)
            .bind(ckpt.step as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_checkpoint(&self, job: JobId) -> Result<Option<Checkpoint>> {
        let row = sqlx::query("SELECT step, params, optim FROM checkpoints WHERE job_id = $1")
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
        fence: Fence,
        step: u64,
        a: &AcceptedRow,
        credits: &[Credit],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job = fence.job;
        self.engine.check_fence(&mut tx, fence).await?;
        let inserted = sqlx::query(
            "INSERT INTO accepted (job_id, step, micro, rows, loss, correct, agreeing, grad) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(job.0 as i64)
        .bind(step as i64)
        .bind(a.micro as i64)
        .bind(a.rows as i64)
        .bind(a.loss as f64)
        .bind(a.correct as i64)
        .bind(a.agreeing as i64)
        .bind(f32_bytes(&a.grad))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            for c in credits {
                grant(self.engine, &mut tx, job, step, a.micro, *c).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_accepted(&self, job: JobId, step: u64) -> Result<Vec<AcceptedRow>> {
        let rows = sqlx::query("SELECT micro, rows, loss, correct, agreeing, grad FROM accepted WHERE job_id = $1 AND step = $2 ORDER BY micro")
            .bind(job.0 as i64)
            .bind(step as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| AcceptedRow {
                micro: r.get::<i64, _>(0) as u32,
                rows: r.get::<i64, _>(1) as u32,
                loss: r.get::<f64, _>(2) as f32,
                correct: r.get::<i64, _>(3) as u32,
                agreeing: r.get::<i64, _>(4) as u32,
                grad: f32s(&r.get::<Vec<u8>, _>(5)),
            })
            .collect())
    }

    pub async fn insert_eval(&self, fence: Fence, m: &MetricRow) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job = fence.job;
        self.engine.check_fence(&mut tx, fence).await?;
        insert_metric(&mut tx, job, m).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn metrics(&self, job: JobId) -> Result<Vec<MetricRow>> {
        let rows = sqlx::query("SELECT step, kind, loss, accuracy, min_agreeing, at_ms FROM metrics WHERE job_id = $1 ORDER BY step, kind")
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

    /// Keeps the parameters of the best evaluated version, only if it beats the stored one: by the lowest held-out
    /// `loss` when one is given (a language model, whose accuracy is a poor guide), else by the highest
    /// `accuracy`.
    pub async fn save_best(
        &self,
        fence: Fence,
        step: u64,
        (accuracy, loss): (f32, Option<f32>),
        params: &[f32],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job = fence.job;
        self.engine.check_fence(&mut tx, fence).await?;
        let better = match loss {
            Some(_) => {
                "WHERE best_checkpoints.loss IS NULL OR excluded.loss < best_checkpoints.loss"
            }
            None => "WHERE excluded.accuracy > best_checkpoints.accuracy",
        };
        let sql = format!(
            "INSERT INTO best_checkpoints (job_id, step, accuracy, params, updated_ms, loss) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (job_id) DO UPDATE SET step = excluded.step, accuracy = excluded.accuracy,
               params = excluded.params, updated_ms = excluded.updated_ms, loss = excluded.loss
             {better}"
        );
        sqlx::query(&sql)
            .bind(job.0 as i64)
            .bind(step as i64)
            .bind(accuracy as f64)
            .bind(f32_bytes(params))
            .bind(now_ms())
            .bind(loss.map(|l| l as f64))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The best evaluated version: `(step, accuracy, held-out loss when it was chosen by loss, params)`.
    pub async fn load_best(&self, job: JobId) -> Result<Option<BestCheckpoint>> {
        let row = sqlx::query(
            "SELECT step, accuracy, loss, params FROM best_checkpoints WHERE job_id = $1",
        )
        .bind(job.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| BestCheckpoint {
            step: r.get::<i64, _>(0) as u64,
            accuracy: r.get::<f64, _>(1) as f32,
            loss: r.get::<Option<f64>, _>(2).map(|l| l as f32),
            params: f32s(&r.get::<Vec<u8>, _>(3)),
        }))
    }
}

/// The kept best version of a job (`Store::load_best`).
#[derive(Debug, Clone, PartialEq)]
pub struct BestCheckpoint {
    pub step: u64,
    pub accuracy: f32,
    /// Held-out loss, for a version chosen by loss (a language model).
    pub loss: Option<f32>,
    pub params: Vec<f32>,
}

async fn insert_metric(tx: &mut AnyConnection, job: JobId, m: &MetricRow) -> Result<()> {
    sqlx::query("INSERT INTO metrics (job_id, step, kind, loss, accuracy, min_agreeing, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (job_id, step, kind) DO UPDATE SET loss = excluded.loss, accuracy = excluded.accuracy,
           min_agreeing = excluded.min_agreeing, at_ms = excluded.at_ms")
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

/// Rows of a stored side: `SDS1` rows from its byte length, or a token stream's windows (tokens − context) from
/// its header.
fn stored_rows(dim: usize, bytes: i64, head: &[u8]) -> usize {
    match token_header(head) {
        Some((n, context)) => (n as usize).saturating_sub(context as usize),
        None => ((bytes as usize).saturating_sub(12)) / (4 * (dim + 1)),
    }
}
