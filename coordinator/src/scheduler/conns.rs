//! Connections and the leases they hold: admission, readiness, disconnects, expiry, and claiming a lease back
//! for its result.

use std::net::IpAddr;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use starling_core::protocol::{
    Backend, CoordinatorMsg, JobId, LeaseId, Outcome, Platform, WorkerId, WorkerMsg,
};

use super::State;
use super::effects::{ConnId, Effects, Outbound};
use super::trust::WorkerInfo;
use crate::store::now_ms;

/// A connected worker as the scheduler sees it.
#[derive(Debug)]
pub struct Conn {
    pub worker: WorkerId,
    pub addr: IpAddr,
    pub name: Option<String>,
    pub backend: Backend,
    pub adapter: String,
    pub platform: Platform,
    tx: UnboundedSender<Outbound>,
    /// The worker asked for a lease and has none: the ticket of its request (fair scheduling serves the lowest,
    /// i.e. the longest wait, first; a counter rather than a time, so equal clock readings cannot tie).
    pub(super) ready: Option<u64>,
    pub(super) lease: Option<LeaseId>,
    /// Model version whose parameters this connection already has.
    pub(super) model: Option<(JobId, u64)>,
    /// A `waiting` was sent for the current idle period (sent once per period, not per attempt).
    pub(super) waiting_sent: bool,
    /// The protocol version picked in the welcome: only a v2 connection is given `local` jobs' leases.
    pub protocol: u32,
    pub connected_ms: i64,
}

/// One outstanding lease.
#[derive(Debug)]
pub(super) struct Lease {
    pub job: JobId,
    pub step: u64,
    pub micro: u32,
    pub conn: ConnId,
    pub worker: WorkerId,
    pub issued: Instant,
    pub deadline: Instant,
}

/// A lease taken back for its result: what the result is for.
#[derive(Debug)]
pub(super) struct Claim {
    pub worker: WorkerId,
    pub conn: ConnId,
    pub lease: LeaseId,
    pub job: JobId,
    pub micro: u32,
    pub issued: Instant,
}

impl State {
    /// Registers an authenticated connection of `worker` (known to the store as `stored_name`), unless that worker
    /// is refused. Returns the connection and the worker's credits (GFLOP) for its welcome.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        worker: WorkerId,
        stored_name: Option<String>,
        addr: IpAddr,
        name: Option<String>,
        backend: Backend,
        adapter: String,
        platform: Platform,
        tx: UnboundedSender<Outbound>,
    ) -> Option<(ConnId, f64)> {
        let info = self.workers.entry(worker).or_insert_with(|| WorkerInfo {
            name: stored_name,
            ..WorkerInfo::default()
        });
        if info.refused {
            return None;
        }
        let credits = info.credits();
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                worker,
                addr,
                name,
                backend,
                adapter,
                platform,
                tx,
                ready: None,
                lease: None,
                model: None,
                waiting_sent: false,
                protocol: starling_core::protocol::PROTOCOL_VERSION,
                connected_ms: now_ms(),
            },
        );
        Some((id, credits))
    }

    /// Records the protocol version picked for `conn` (before its first `ready`).
    pub fn set_protocol(&mut self, conn: ConnId, protocol: u32) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.protocol = protocol;
        }
    }

    /// Sends a frame directly (the welcome, before any effect exists).
    pub fn send(&self, conn: ConnId, out: Outbound) {
        if let Some(c) = self.conns.get(&conn) {
            // A closed connection's writer is gone; nothing to deliver to.
            let _ = c.tx.send(out);
        }
    }

    /// A connection closed: its leases become available again.
    pub fn disconnect(&mut self, conn: ConnId) -> Effects {
        let mut fx = self.effects();
        self.conns.remove(&conn);
        let gone: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.lose_lease(id);
        }
        self.assign_all(&mut fx);
        fx
    }

    /// Whether `msg` is part of the protocol's paced flow on `conn`: a `result` or `failed` for the lease it holds,
    /// or a `ready` while it holds none and has not already asked. Anything else counts against the rate limit.
    pub fn solicited(&self, conn: ConnId, msg: &WorkerMsg) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        match msg {
            WorkerMsg::Result { lease, .. }
            | WorkerMsg::LocalResult { lease, .. }
            | WorkerMsg::Failed { lease, .. } => c.lease == Some(*lease),
            WorkerMsg::Ready => c.lease.is_none() && c.ready.is_none(),
            WorkerMsg::Hello { .. } | WorkerMsg::DatasetRequest { .. } => false,
        }
    }

    /// The worker asked for work. A `ready` stands until a lease is given (a `waiting` answer does not cancel it).
    pub fn ready(&mut self, conn: ConnId) -> Effects {
        let mut fx = self.effects();
        let ticket = self.ticket();
        if let Some(c) = self.conns.get_mut(&conn)
            && c.ready.is_none()
        {
            c.ready = Some(ticket);
        }
        self.assign_one(conn, &mut fx);
        fx
    }

    /// A worker could not compute its lease: release it without a strike. For a `local` job its model is
    /// forgotten, so its next lease comes with the full model (a v2 worker that lost track of its version fails
    /// its lease).
    pub fn failed(&mut self, conn: ConnId, lease: LeaseId) -> Effects {
        let local = self
            .leases
            .get(&lease)
            .filter(|l| l.conn == conn)
            .and_then(|l| self.jobs.get(&l.job))
            .is_some_and(|j| j.local.is_some());
        if local && let Some(c) = self.conns.get_mut(&conn) {
            c.model = None;
        }
        if self.leases.get(&lease).is_some_and(|l| l.conn == conn)
            && let Some(l) = self.drop_lease(lease)
            && let Some(job) = self.jobs.get_mut(&l.job)
        {
            job.counters.results_failed += 1;
        }
        let mut fx = self.effects();
        self.assign_all(&mut fx);
        fx
    }

    /// Expires overdue leases and hands out work (including speculative replicas) to idle workers.
    pub fn tick(&mut self) -> Effects {
        let now = self.now();
        let overdue: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(l) = self.lose_lease(id) {
                tracing::info!(lease = %id, worker = %l.worker, "lease expired; micro-batch will be reassigned");
                if let Some(job) = self.jobs.get_mut(&l.job) {
                    job.counters.leases_expired += 1;
                }
            }
        }
        let mut fx = self.take_pending();
        self.close_due_rounds(&mut fx);
        self.assign_all(&mut fx);
        fx
    }

    pub(super) fn drop_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        if let Some(job) = self.jobs.get_mut(&lease.job)
            && job.step == lease.step
            && let Some(m) = job.micros.get_mut(lease.micro as usize)
        {
            m.active.retain(|l| *l != id);
        }
        if let Some(c) = self.conns.get_mut(&lease.conn)
            && c.lease == Some(id)
        {
            c.lease = None;
        }
        Some(lease)
    }

    /// A lease lost without a result (its connection closed, or it expired): dropped, and its worker may be leased
    /// that micro-batch again, with a fresh lease (a result for the lost one is late, so the worker still adds at
    /// most one replica). Without this, a micro-batch lost by one of exactly R workers could never find its last
    /// replica (every worker left would be "involved") and the step would wait forever.
    fn lose_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.drop_lease(id)?;
        let leases = &self.leases;
        if let Some(job) = self.jobs.get_mut(&lease.job)
            && job.step == lease.step
            && let Some(m) = job.micros.get_mut(lease.micro as usize)
            && !m.subs.iter().any(|s| s.worker == lease.worker)
            && !m
                .active
                .iter()
                .any(|l| leases.get(l).is_some_and(|o| o.worker == lease.worker))
        {
            m.involved.retain(|(w, _)| *w != lease.worker);
        }
        Some(lease)
    }

    /// Takes `lease_id` back from `conn` for its result. A lease that is unknown, expired, another connection's, or
    /// of a superseded step or finished job is late: no strike, and `None` with the `late` verdict in `fx`.
    pub(super) fn claim(
        &mut self,
        conn: ConnId,
        lease_id: LeaseId,
        fx: &mut Effects,
    ) -> Option<Claim> {
        let worker = self.conns.get(&conn).map(|c| c.worker)?;
        let lease = match self.leases.get(&lease_id) {
            Some(l) if l.conn == conn => self.drop_lease(lease_id),
            _ => None,
        };
        if let Some(c) = self.conns.get_mut(&conn)
            && c.lease == Some(lease_id)
        {
            c.lease = None;
        }
        let Some(lease) = lease else {
            self.verdict(conn, worker, None, lease_id, Outcome::Late, fx);
            return None;
        };
        let job = self.jobs.get_mut(&lease.job)?;
        if job.step != lease.step || job.status.is_terminal() {
            job.counters.results_late += 1;
            self.verdict(conn, worker, Some(lease.job), lease_id, Outcome::Late, fx);
            return None;
        }
        Some(Claim {
            worker,
            conn,
            lease: lease_id,
            job: lease.job,
            micro: lease.micro,
            issued: lease.issued,
        })
    }

    /// Queues a verdict with the worker's current credits.
    pub(super) fn verdict(
        &self,
        conn: ConnId,
        worker: WorkerId,
        job: Option<JobId>,
        lease: LeaseId,
        outcome: Outcome,
        fx: &mut Effects,
    ) {
        let credits = self.workers.get(&worker).map_or(0.0, WorkerInfo::credits);
        fx.send_msg(
            conn,
            job,
            &CoordinatorMsg::Verdict {
                lease,
                outcome,
                credits,
            },
        );
    }
}
