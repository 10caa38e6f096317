//! Elastic `local` rounds and bounded staleness (issue 10, items 4 and 5).
//!
//! A round starts with its `ceil(global_batch / micro_batch)` base shards. When a v2 worker is idle and every
//! shard of every job is fully leased, a round below `hyper.round_shards_max` grows one shard (leased R-fold like
//! the others), so a job uses as many workers as it has. Shard `i`'s rows and plan are a pure function of
//! `(seed, round, i)`: the base shards' are the v1 `step_rows` split, an elastic shard's are
//! `step_rows(micro_batch)` under a seed mixed with `i` ([`JobRun::shard_rows`]), so replicas and the coordinator's
//! replay compute the same thing and a restart regenerates them.
//!
//! A round closes ([`JobRun::round_due`]) when its own verified samples (`h × inner_batch` per accepted shard)
//! reach `hyper.round_samples`, or at `hyper.round_deadline_ms` with whatever is verified (at least one delta), or
//! when every shard it can have is settled. Shards still out at the close are **carried** into the next round
//! ([`State::carry`]) when all their replicas are out (or the coordinator is checking them): they keep their base
//! version and plan (`Micro::origin`), get no new leases, and their outstanding leases follow them. A carried
//! shard's verified delta enters the next close it reaches, weighted `1/(1+s)` with `s = v_now − v`
//! ([`part_weights`]); once `s` would exceed `hyper.staleness` it is dropped and its results are `late`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_core::local::LeasePlan;
use starling_core::protocol::{JobId, LeaseId, Outcome as Verdict};
use starling_core::schedule;

use super::State;
use super::effects::{CheckKind, Effects};
use super::job_run::JobRun;
use super::micro::{Micro, Phase};
use crate::examples::Examples;
use crate::job::JobStatus;

/// Largest weight of one part when stale parts are present (weights are rescaled so the largest is this: the
/// aggregate's weights are u32 and sum without overflow for up to `MAX_ROUND_SHARDS` parts).
const WEIGHT_SCALE: f64 = 100_000.0;

impl JobRun {
    /// The base shards of a round: `ceil(global_batch / micro_batch)`.
    pub(super) fn base_shards(&self) -> usize {
        self.hyper.global_batch.div_ceil(self.hyper.micro_batch) as usize
    }

    /// Most shards of its own a round may hold.
    fn shards_max(&self) -> usize {
        self.hyper
            .round_shards_max
            .map_or(self.base_shards(), |m| m as usize)
            .max(self.base_shards())
    }

    /// Shards of the current round (not carried from an earlier one).
    fn own_shards(&self) -> impl Iterator<Item = &Micro> {
        self.micros.iter().filter(|m| m.origin.is_none())
    }

    /// Whether a running `local` round may take one more shard.
    pub(super) fn can_grow(&self) -> bool {
        self.local.is_some()
            && self.status == JobStatus::Running
            && !self.micros.is_empty()
            && self.own_shards().count() < self.shards_max()
    }

    /// Training samples one shard's lease computes.
    fn shard_samples(&self) -> u64 {
        self.hyper.h as u64 * self.hyper.inner_batch as u64
    }

    /// Verified samples at which a round closes.
    pub(super) fn round_target(&self) -> u64 {
        self.hyper
            .round_samples
            .unwrap_or(self.base_shards() as u64 * self.shard_samples())
    }

    /// The rows of shard `index` of round `round` (elastic shards, `index ≥ base_shards`): `micro_batch` rows
    /// drawn as `step_rows` draws a step's, under the job's seed mixed with the index.
    pub(super) fn shard_rows(&self, round: u64, index: u32) -> Vec<u32> {
        let seed = starling_core::rng::SplitMix64::new(
            self.hyper.seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
        .next_u64();
        let (n, batch) = (self.train.rows(), self.hyper.micro_batch as usize);
        match &*self.train {
            Examples::Tokens { .. } => starling_core::tokens::step_windows(n, batch, seed, round),
            Examples::Rows(_) => schedule::step_rows(n, batch, seed, round),
        }
    }

    /// Whether the current `local` round should close now (see the module docs).
    pub(super) fn round_due(&self, now: Instant) -> bool {
        if self.local.is_none() || self.micros.is_empty() {
            return false;
        }
        let own_verified = self
            .own_shards()
            .filter(|m| matches!(m.phase, Phase::Accepted(_)))
            .count() as u64
            * self.shard_samples();
        if own_verified >= self.round_target() {
            return true;
        }
        let any_verified = self
            .micros
            .iter()
            .any(|m| matches!(m.phase, Phase::Accepted(_)));
        if let Some(d) = self.hyper.round_deadline_ms
            && any_verified
            && now >= self.step_started + Duration::from_millis(d)
        {
            return true;
        }
        !self.own_shards().any(Micro::unsettled) && !self.can_grow()
    }

    /// The round and index that name shard `micro`'s plan and base version.
    fn shard_origin(&self, micro: usize) -> (u64, u32) {
        self.micros
            .get(micro)
            .and_then(|m| m.origin)
            .unwrap_or((self.step, micro as u32))
    }

    /// The plan of shard `micro` (a carried shard keeps its round's).
    pub(super) fn shard_plan(&self, micro: usize) -> LeasePlan {
        let (round, shard) = self.shard_origin(micro);
        super::round::plan(&self.hyper, round, shard)
    }

    /// The parameters shard `micro`'s leases start from: θ of its base version (kept for `staleness` rounds).
    pub(super) fn shard_base(&self, micro: usize) -> Arc<Vec<f32>> {
        let (round, _) = self.shard_origin(micro);
        self.local
            .as_ref()
            .and_then(|l| l.base(round))
            .unwrap_or_else(|| self.params.clone())
    }
}

/// The aggregation weight of every accepted shard of the closing round (`None` for the rest): its rows, or,
/// when any accepted shard is stale, `rows / (1 + s)` rescaled to integers (largest [`WEIGHT_SCALE`]).
pub(super) fn part_weights(job: &JobRun) -> Vec<Option<u32>> {
    let stale = |m: &Micro| m.origin.map_or(0, |(v, _)| job.step.saturating_sub(v));
    let accepted = |m: &Micro| matches!(m.phase, Phase::Accepted(_));
    if !job.micros.iter().any(|m| accepted(m) && stale(m) > 0) {
        return job
            .micros
            .iter()
            .map(|m| accepted(m).then_some(m.rows.len() as u32))
            .collect();
    }
    let raw: Vec<Option<f64>> = job
        .micros
        .iter()
        .map(|m| accepted(m).then(|| m.rows.len() as f64 / (1.0 + stale(m) as f64)))
        .collect();
    let top = raw.iter().flatten().copied().fold(0.0f64, f64::max);
    raw.into_iter()
        .map(|w| w.map(|w| ((w / top * WEIGHT_SCALE).round() as u32).max(1)))
        .collect()
}

impl State {
    /// An idle worker found no open shard: grow job `id`'s round by one shard if it may, returning its index.
    pub(super) fn grow_round(&mut self, id: JobId) -> Option<usize> {
        let job = self.jobs.get_mut(&id)?;
        if !job.can_grow() {
            return None;
        }
        let index = job.micros.len();
        let rows = if index < job.base_shards() {
            // Not reached (a round opens with its base shards), but keeps the rows a function of the index.
            job.fresh_micros().swap_remove(index).rows
        } else {
            job.shard_rows(job.step, index as u32)
        };
        job.micros.push(Micro::new(rows, job.hyper.redundancy));
        job.counters.elastic_shards += 1;
        Some(index)
    }

    /// Closes every running `local` round that is due (a deadline passed): called on every tick.
    pub(super) fn close_due_rounds(&mut self, fx: &mut Effects) {
        let now = self.now();
        let due: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running && j.round_due(now))
            .map(|j| j.id)
            .collect();
        for id in due {
            self.maybe_advance(id, fx);
        }
    }

    /// The round of job `job_id` moved on from `old_step` (its fresh shards are in place): the shards of `old`
    /// still out are carried after them, with their leases, while within the staleness bound; the others are
    /// dropped, their leases forgotten and their waiting results answered `late`. A round run again at the same
    /// step (nothing verified) carries nothing.
    pub(super) fn carry(
        &mut self,
        job_id: JobId,
        old_step: u64,
        old: Vec<Micro>,
        fx: &mut Effects,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let (new_step, bound) = (job.step, job.hyper.staleness as u64);
        let mut remap: HashMap<u32, u32> = HashMap::new();
        let mut checks: Vec<(u32, CheckKind)> = Vec::new();
        let mut forget: Vec<LeaseId> = Vec::new();
        let mut late = Vec::new();
        for (i, mut m) in old.into_iter().enumerate() {
            let (base, shard) = m.origin.unwrap_or((old_step, i as u32));
            let out = match m.phase {
                Phase::Open { wanted, .. } => m.replicas() >= wanted && !m.active.is_empty(),
                Phase::Checking { .. } => true,
                Phase::Accepted(_) | Phase::Abandoned => false,
            };
            if new_step > old_step && out && new_step - base <= bound {
                let j = job.micros.len() as u32;
                if let Phase::Checking { kind, .. } = m.phase {
                    checks.push((j, kind));
                }
                m.origin = Some((base, shard));
                remap.insert(i as u32, j);
                job.micros.push(m);
            } else if m.unsettled() {
                job.counters.shards_dropped_stale += 1;
                forget.append(&mut m.active);
                late.extend(m.subs.drain(..).map(|s| (s.conn, s.worker, s.lease)));
            }
        }
        if new_step == old_step {
            // Nothing of the old list survives: every lease of this step pointed into it.
            forget.extend(
                self.leases
                    .iter()
                    .filter(|(_, l)| l.job == job_id && l.step == old_step)
                    .map(|(id, _)| *id),
            );
        }
        for l in self.leases.values_mut() {
            if l.job == job_id
                && l.step == old_step
                && let Some(j) = remap.get(&l.micro)
            {
                l.step = new_step;
                l.micro = *j;
            }
        }
        for id in forget {
            if let Some(l) = self.leases.remove(&id)
                && let Some(c) = self.conns.get_mut(&l.conn)
                && c.lease == Some(id)
            {
                c.lease = None;
            }
        }
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.results_late += late.len() as u64;
        }
        for (conn, worker, lease) in late {
            self.verdict(conn, worker, Some(job_id), lease, Verdict::Late, fx);
        }
        // A carried shard under recomputation is asked again under its new index (the old answer is ignored:
        // it names the old step).
        for (j, kind) in checks {
            self.request_recompute(job_id, j, kind, fx);
        }
    }
}
