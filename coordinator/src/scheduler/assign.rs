//! Who gets which lease. Fair among workers: idle workers are served longest-waiting first, so when a step has
//! fewer open leases than idle workers the same fast connections cannot win them every time. Fair among jobs:
//! stride scheduling by `hyper.weight` (like BOINC's resource share): each lease advances its job's pass by
//! `1 / weight`, and the running job with the lowest pass that has work for this worker goes first. Replica
//! placement: never two replicas of a micro-batch to one worker nor to one placement group (`--placement`, see
//! `placement.rs`), preferably not from one address; speculative replicas of stragglers only once no fresh work is
//! left; adaptive replication rolls and audited mode's solo units, audit leases and newcomer groups here.

use std::time::{Duration, Instant};

use axum::extract::ws::Message;

use starling_core::protocol::{CoordinatorMsg, JobId, LeaseId, WorkerId, lease_payload};

use super::conns::Lease;
use super::effects::{ConnId, Effects, Outbound};
use super::job_run::JobRun;
use super::micro::{Micro, Phase};
use super::{SPOT_P_MIN, State};
use crate::job::JobStatus;

/// Why an idle worker has no lease (sent once per idle period as `waiting`).
fn waiting_reason(running: usize, position: usize, idle: usize) -> String {
    if running == 0 {
        "no job is running".into()
    } else {
        format!(
            "every open micro-batch is leased; you are {} of {idle} idle workers in line (longest-waiting first)",
            position + 1
        )
    }
}

impl State {
    /// Hands out leases to every idle worker that can get one, longest-waiting first; the rest are told why not.
    pub(super) fn assign_all(&mut self, fx: &mut Effects) {
        self.audit_fallbacks(fx);
        let now = self.now();
        let work = self.jobs.values().any(|j| {
            j.status == JobStatus::Running
                && (j.micros.iter().any(Micro::unsettled) || j.can_grow())
        });
        let mut idle: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match (c.ready, c.lease) {
                (Some(since), None) => Some((since, *id)),
                _ => None,
            })
            .collect();
        idle.sort_unstable();
        let mut left: Vec<ConnId> = Vec::new();
        for &(_, conn) in &idle {
            if !work || !self.assign(conn, now, false, fx) {
                left.push(conn);
            }
        }
        // Speculative replicas of stragglers only after every fresh micro-batch found a worker.
        let mut still: Vec<ConnId> = Vec::new();
        for conn in left {
            if !work || !self.assign(conn, now, true, fx) {
                still.push(conn);
            }
        }
        let running = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
            .count();
        let waiting = still.len();
        for (position, conn) in still.into_iter().enumerate() {
            if let Some(c) = self.conns.get_mut(&conn)
                && !c.waiting_sent
            {
                c.waiting_sent = true;
                let reason = waiting_reason(running, position, waiting);
                fx.send_msg(conn, None, &CoordinatorMsg::Waiting { reason });
            }
        }
    }

    /// Serves one worker that just asked: everyone idle longer was already offered all there is (every handler
    /// ends by serving the idle), so only this worker needs a look.
    pub(super) fn assign_one(&mut self, conn: ConnId, fx: &mut Effects) {
        let now = self.now();
        if self.assign(conn, now, false, fx) || self.assign(conn, now, true, fx) {
            return;
        }
        let running = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
            .count();
        let idle = self
            .conns
            .values()
            .filter(|c| c.ready.is_some() && c.lease.is_none())
            .count();
        if let Some(c) = self.conns.get_mut(&conn)
            && c.ready.is_some()
            && !c.waiting_sent
        {
            c.waiting_sent = true;
            let reason = waiting_reason(running, idle.saturating_sub(1), idle);
            fx.send_msg(conn, None, &CoordinatorMsg::Waiting { reason });
        }
    }

    /// Gives `conn` a lease (a speculative replica when `speculative`) if a running job has one it may take.
    fn assign(
        &mut self,
        conn_id: ConnId,
        now: Instant,
        speculative: bool,
        fx: &mut Effects,
    ) -> bool {
        let Some(conn) = self.conns.get(&conn_id) else {
            return false;
        };
        if conn.ready.is_none() || conn.lease.is_some() {
            return false;
        }
        let (worker, addr, v2) = (
            conn.worker,
            conn.addr,
            conn.protocol >= starling_core::protocol::PROTOCOL_V2,
        );
        if self.workers.get(&worker).is_some_and(|w| w.refused) {
            return false;
        }
        let mut order: Vec<(f64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Running && (v2 || !j.hyper.is_local()))
            .map(|j| (j.pass, j.id))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let speculate_after = self.config.speculate_after;
        let salt = self.rng.next_u64();
        let seat = Seat {
            worker,
            addr,
            placement: self.config.placement,
            trusted: self.trust_record(conn_id, worker) >= self.config.trust_threshold,
            max_params: self.config.spot_check_max_params,
        };
        let choice = order.iter().find_map(|&(_, id)| {
            let job = &self.jobs[&id];
            if speculative {
                return pick_straggler(job, &seat, now, speculate_after, &self.leases)
                    .map(|m| (id, m, false));
            }
            // Audits first: the step waits for them.
            if seat.trusted
                && super::audit::audited_mode(job, seat.max_params)
                && let Some(m) = self.pick_audit(job, worker, addr, salt)
            {
                return Some((id, m, true));
            }
            pick_fresh(self, job, &seat, salt).map(|m| (id, m, false))
        });
        // Elastic `local` rounds: with no open shard anywhere, the first job in order that may grow its round
        // takes one more shard for this worker (`elastic.rs`).
        let choice = choice.or_else(|| {
            (!speculative)
                .then(|| {
                    order
                        .iter()
                        .find_map(|&(_, id)| self.grow_round(id).map(|m| (id, m, false)))
                })
                .flatten()
        });
        let Some((job_id, micro, audit)) = choice else {
            return false;
        };
        self.lease(conn_id, job_id, micro, speculative, audit, now, fx);
        true
    }

    /// Issues a lease of `micro` of `job_id` to `conn_id` (the model first if the connection lacks this version);
    /// an `audit` lease (audited mode) is the same lease to the worker, recorded as the unit's audit.
    #[allow(clippy::too_many_arguments)]
    fn lease(
        &mut self,
        conn_id: ConnId,
        job_id: JobId,
        micro: usize,
        speculative: bool,
        audit: bool,
        now: Instant,
        fx: &mut Effects,
    ) {
        let lease_id = LeaseId(self.next_lease);
        self.next_lease += 1;
        let Some(worker) = self.conns.get(&conn_id).map(|c| c.worker) else {
            return;
        };
        let addr = self.conns[&conn_id].addr;
        let record = self.trust_record(conn_id, worker);
        let others: Vec<WorkerId> = self
            .jobs
            .get(&job_id)
            .map(|j| j.micros[micro].involved.iter().map(|(w, _)| *w).collect())
            .unwrap_or_default();
        self.met(worker, &others);
        let roll = self.rng.next_f64();
        let (threshold, max_params) = (
            self.config.trust_threshold,
            self.config.spot_check_max_params,
        );
        let new_r = self
            .jobs
            .get(&job_id)
            .map_or(2, |j| self.new_worker_replicas(j.hyper.redundancy));
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.pass += 1.0 / job.hyper.weight as f64;
        let deadline = now + Duration::from_millis(job.hyper.lease_timeout_ms);
        let adaptive = job.hyper.adaptive && job.spec.param_count() <= max_params;
        let audited = super::audit::audited_mode(job, max_params);
        if audit {
            job.counters.audit_leases += 1;
        }
        let m = &mut job.micros[micro];
        if audit {
            // Not one of the unit's replicas (`active`): its result goes to `audit_result`.
            if let Some(a) = m.audit.as_mut() {
                a.lease = Some(lease_id);
            }
        } else if audited && !speculative && m.involved.is_empty() {
            // Audited mode: a trusted worker computes a fresh unit alone (audits check it); one without a record
            // gets it with R = 3, one of them trusted.
            m.phase = if record >= threshold {
                Phase::Open {
                    wanted: 1,
                    solo: true,
                }
            } else {
                Phase::Open {
                    wanted: new_r,
                    solo: false,
                }
            };
        } else if !audited
            && adaptive
            && !speculative
            && m.involved.is_empty()
            && record >= threshold
            && roll >= SPOT_P_MIN.max(1.0 / record as f64)
        {
            m.phase = Phase::Open {
                wanted: 1,
                solo: true,
            };
        }
        if !audit {
            m.active.push(lease_id);
        }
        m.involved.push((worker, addr));
        let rows = m.rows.len() as u32;
        job.counters.leases_issued += 1;
        if speculative {
            job.counters.speculative_leases += 1;
        }
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if let Some(local) = &job.local {
            // v2: the model as int8 deltas from the version the connection holds (or in full), then the lease.
            for frame in local.model_frames(job, conn.model) {
                fx.send_lease(
                    conn_id,
                    job.id,
                    lease_id,
                    Outbound::Frame(Message::Binary(frame)),
                );
            }
            conn.model = Some((job.id, job.step));
            let msg = local.lease_msg(job, lease_id, micro as u32, rows);
            // With the dataset fetched once, a lease carries only its row indices.
            let payload = match job.dataset {
                Some(_) => starling_core::protocol::u32_bytes(&job.micros[micro].rows),
                None => {
                    let (x, labels) = job.train.gather(&job.micros[micro].rows);
                    lease_payload(&x, &labels)
                }
            };
            fx.send_lease(conn_id, job.id, lease_id, Outbound::msg(&msg, &payload));
        } else {
            if conn.model != Some((job.id, job.step)) {
                fx.send_lease(
                    conn_id,
                    job.id,
                    lease_id,
                    Outbound::Frame(Message::Binary(job.model_frame.clone())),
                );
                conn.model = Some((job.id, job.step));
            }
            let (x, labels) = job.train.gather(&job.micros[micro].rows);
            let msg = CoordinatorMsg::Lease {
                lease: lease_id,
                job: job.id,
                version: job.step,
                step: job.step,
                micro_batch: micro as u32,
                rows: job.micros[micro].rows.len() as u32,
                deadline_ms: job.hyper.lease_timeout_ms,
            };
            fx.send_lease(
                conn_id,
                job.id,
                lease_id,
                Outbound::msg(&msg, &lease_payload(&x, &labels)),
            );
        }
        conn.ready = None;
        conn.lease = Some(lease_id);
        conn.waiting_sent = false;
        self.leases.insert(
            lease_id,
            Lease {
                job: job.id,
                step: job.step,
                micro: micro as u32,
                conn: conn_id,
                worker,
                issued: now,
                deadline,
            },
        );
    }
}

/// Whether `worker` may take a replica of `m` at all.
fn open_to(m: &Micro, worker: WorkerId) -> bool {
    matches!(m.phase, Phase::Open { .. })
        && m.origin.is_none()
        && !m.involved.iter().any(|(w, _)| *w == worker)
}

/// Who asks for a lease, for the pickers.
struct Seat {
    worker: WorkerId,
    addr: std::net::IpAddr,
    placement: super::Placement,
    /// The worker has a record on its connection's backend (audited mode: solo units, audits).
    trusted: bool,
    max_params: usize,
}

/// A micro-batch of `job` still short of its wanted replicas that the worker has not touched and whose other
/// replicas are apart from it (`--placement`), preferring, in audited mode, for a trusted worker a unit that
/// waits for its trusted replica, then those none of whose replicas came from the same address, then the least
/// replicated, then those held by none of its recent partners (`placement::RECENT_PARTNERS`), then a random one (salted per call, so colluders cannot choose to meet). In audited mode a worker
/// without a record never takes the last replica of a unit that has no trusted one while a trusted worker is
/// online.
fn pick_fresh(st: &State, job: &JobRun, seat: &Seat, salt: u64) -> Option<usize> {
    let audited = super::audit::audited_mode(job, seat.max_params);
    let reserve = audited && !seat.trusted && st.trusted_online();
    let mut best: Option<(bool, bool, u32, bool, u64, usize)> = None;
    for (i, m) in job.micros.iter().enumerate() {
        let Some(wanted) = m.wanted() else {
            continue;
        };
        if !open_to(m, seat.worker)
            || m.replicas() >= wanted
            || !seat
                .placement
                .apart(seat.addr, m.involved.iter().map(|(_, a)| *a))
        {
            continue;
        }
        let needs_trusted =
            audited && !m.involved.is_empty() && !m.involved.iter().any(|(w, _)| st.is_trusted(*w));
        if reserve && needs_trusted && m.replicas() + 1 >= wanted {
            continue;
        }
        let key = (
            !(seat.trusted && needs_trusted),
            m.involved.iter().any(|(_, a)| *a == seat.addr),
            m.replicas(),
            m.involved
                .iter()
                .any(|(w, _)| st.met_lately(seat.worker, *w)),
            starling_core::rng::SplitMix64::new(salt ^ i as u64).next_u64(),
            i,
        );
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    best.map(|(_, _, _, _, _, i)| i)
}

/// A speculative extra replica of a micro-batch of `job` whose lease has been out for a while (at least
/// `speculate_after`, and three times the job's typical result latency).
fn pick_straggler(
    job: &JobRun,
    seat: &Seat,
    now: Instant,
    speculate_after: Duration,
    leases: &std::collections::HashMap<LeaseId, Lease>,
) -> Option<usize> {
    let threshold = speculate_after.max(Duration::from_secs_f64(3.0 * job.result_ms / 1000.0));
    job.micros.iter().enumerate().find_map(|(i, m)| {
        let straggling = m.active.iter().any(|l| {
            leases
                .get(l)
                .is_some_and(|l| now.duration_since(l.issued) >= threshold)
        });
        let room = m.wanted().is_some_and(|w| m.replicas() < w + 1);
        let apart = seat
            .placement
            .apart(seat.addr, m.involved.iter().map(|(_, a)| *a));
        (open_to(m, seat.worker) && straggling && room && apart).then_some(i)
    })
}
