//! Workers' standing: credits, strikes and refusal, near misses, and the per-backend trust record that adaptive
//! replication reads.

use starling_core::protocol::{ErrorCode, WorkerId};

use super::State;
use super::effects::{Effects, Outbound, StoreOp};
use crate::store::Credit;

/// A worker's standing (cached from the database, kept in step with it through [`StoreOp`]s).
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub name: Option<String>,
    pub credits_flops: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub strikes: u32,
    pub refused: bool,
    /// Near misses in a row (see `verify::near_miss`): rare and isolated for honest devices, constant for a worker
    /// adding small noise, which is struck at [`NEAR_MISS_STRIKE`] in a row.
    pub near_misses: u32,
}

/// Consecutive near misses that count as one strike.
pub const NEAR_MISS_STRIKE: u32 = 3;

impl WorkerInfo {
    /// Credits in GFLOP, the unit shown to volunteers.
    pub fn credits(&self) -> f64 {
        self.credits_flops as f64 / 1e9
    }
}

/// What a strike led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Struck {
    Strike,
    /// This strike reached the limit: the worker is refused from now on.
    Refused,
}

impl State {
    /// Grants `flops` of credit for an accepted result (in memory; the caller persists the returned entry) and
    /// extends the worker's trust record on its current backend.
    pub(super) fn credit(&mut self, worker: WorkerId, flops: u64) -> Credit {
        let w = self.workers.entry(worker).or_default();
        w.credits_flops += flops;
        w.accepted += 1;
        w.near_misses = 0;
        if let Some(backend) = self
            .conns
            .values()
            .find(|c| c.worker == worker)
            .map(|c| c.backend)
        {
            *self.trust.entry((worker, backend)).or_default() += 1;
        }
        Credit { worker, flops }
    }

    /// A strike (persisted in `fx`); any strike resets every trust record of the worker.
    pub(super) fn strike(&mut self, worker: WorkerId, fx: &mut Effects) -> Struck {
        self.trust.retain(|(w, _), _| *w != worker);
        let limit = self.config.strike_limit;
        let w = self.workers.entry(worker).or_default();
        w.rejected += 1;
        w.strikes += 1;
        w.near_misses = 0;
        let refuse = w.strikes >= limit && !w.refused;
        if refuse {
            w.refused = true;
            tracing::warn!(%worker, strikes = w.strikes, "worker refused further work after repeated losing results");
        }
        fx.persist(StoreOp::Rejection {
            worker,
            refused: refuse,
        });
        if refuse {
            Struck::Refused
        } else {
            Struck::Strike
        }
    }

    /// Takes back a credit granted for a result a failed audit showed wrong (in memory; persisted in `fx` as a
    /// compensating ledger entry).
    pub(super) fn claw_back(
        &mut self,
        job: starling_core::protocol::JobId,
        step: u64,
        micro: u32,
        credit: Credit,
        fx: &mut Effects,
    ) {
        let w = self.workers.entry(credit.worker).or_default();
        w.credits_flops = w.credits_flops.saturating_sub(credit.flops);
        w.accepted = w.accepted.saturating_sub(1);
        fx.persist(StoreOp::Clawback {
            job,
            step,
            micro,
            credit,
        });
    }

    /// Refuses `worker` at once (a failed audit is proof, not a near miss): persisted, then every connection of it
    /// is closed with `error refused`.
    pub(super) fn refuse(&mut self, worker: WorkerId, fx: &mut Effects) {
        self.trust.retain(|(w, _), _| *w != worker);
        let w = self.workers.entry(worker).or_default();
        if w.refused {
            return;
        }
        w.refused = true;
        w.rejected += 1;
        w.strikes += 1;
        tracing::warn!(%worker, "worker refused: a result it vouched for failed an audit");
        fx.persist(StoreOp::Rejection {
            worker,
            refused: true,
        });
        self.close_refused(worker, fx);
    }

    /// Closes every connection of a refused worker (after its last verdict went out).
    pub(super) fn close_refused(&self, worker: WorkerId, fx: &mut Effects) {
        let limit = self.config.strike_limit;
        for (id, c) in &self.conns {
            if c.worker == worker {
                fx.send(
                    *id,
                    None,
                    Outbound::Close(
                        ErrorCode::Refused,
                        format!("refused after {limit} rejected results"),
                    ),
                );
            }
        }
    }

    /// Counts a near miss; `true` when it is the [`NEAR_MISS_STRIKE`]th in a row (the caller rejects it).
    pub(super) fn near_miss(&mut self, worker: WorkerId) -> bool {
        let w = self.workers.entry(worker).or_default();
        w.near_misses += 1;
        w.near_misses >= NEAR_MISS_STRIKE
    }

    /// Consecutive agreed results of `worker` on the backend of `conn`.
    pub(super) fn trust_record(&self, conn: super::ConnId, worker: WorkerId) -> u32 {
        self.conns
            .get(&conn)
            .and_then(|c| self.trust.get(&(worker, c.backend)))
            .copied()
            .unwrap_or(0)
    }
}
