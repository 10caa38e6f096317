//! Audited mode (`hyper.verification = "audited"`, docs/PROTOCOL.md, Verification, "Audited mode"): a trusted
//! worker's result is accepted alone; a seeded share `hyper.audit` of accepted units, drawn after acceptance, is
//! recomputed by an auditor — a randomly chosen trusted worker outside the unit's placement group, sent an ordinary
//! lease — or, when no such worker is connected, by the coordinator. The step waits for its audits, so a unit that
//! fails one never reaches the model. A disagreeing auditor is no proof: the coordinator's own recomputation settles
//! it, and only then is anyone struck — every voucher refused, their credits clawed back, their unapplied results
//! elsewhere struck out — or, when the vouchers were right, the auditor rejected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use starling_core::protocol::{JobId, LeaseId, WorkerId};

use super::State;
use super::conns::Lease;
use super::effects::{CheckKind, Effects};
use super::job_run::JobRun;
use super::micro::{Micro, Outcome, Phase, Submission};
use super::recompute::Reference;
use super::settle::{Author, Judged, judge};
use crate::job::{JobStatus, Verification};
use crate::verify;

/// An accepted unit's audit in progress.
#[derive(Debug)]
pub(super) struct PendingAudit {
    /// When it was drawn: an audit no auditor took within `speculate_after` goes to the coordinator.
    pub since: std::time::Instant,
    /// The auditor's lease once one was issued (stale once that lease is gone: a new auditor is picked).
    pub lease: Option<LeaseId>,
    /// An auditor's result that disagrees with the accepted one, waiting for the coordinator's recomputation.
    pub auditor: Option<Submission>,
    /// The coordinator recomputes the unit (no auditor was available, or an auditor disagreed).
    pub coordinator: bool,
}

impl PendingAudit {
    pub fn new(now: std::time::Instant) -> Self {
        Self {
            since: now,
            lease: None,
            auditor: None,
            coordinator: false,
        }
    }

    fn wants_auditor(&self, leases: &HashMap<LeaseId, Lease>) -> bool {
        !self.coordinator
            && self.auditor.is_none()
            && self.lease.is_none_or(|l| !leases.contains_key(&l))
    }
}

/// Whether `job` runs in audited mode: asked for, and its model small enough for the coordinator to settle a
/// disputed audit (larger models are replicated).
pub(super) fn audited_mode(job: &JobRun, max_params: usize) -> bool {
    job.hyper.verification == Verification::Audited && job.spec.param_count() <= max_params
}

/// Whether a worker at `addr` may audit `m`: it holds no part of the unit and shares no placement group with its
/// workers.
fn may_audit(
    m: &Micro,
    worker: WorkerId,
    addr: IpAddr,
    placement: super::Placement,
    leases: &HashMap<LeaseId, Lease>,
) -> bool {
    m.audit.as_ref().is_some_and(|a| a.wants_auditor(leases))
        && !m.involved.iter().any(|(w, _)| *w == worker)
        && placement.apart(addr, m.involved.iter().map(|(_, a)| *a))
}

impl State {
    /// Whether `worker` has a record (at least the trust threshold of agreed results on some backend).
    pub(super) fn is_trusted(&self, worker: WorkerId) -> bool {
        let threshold = self.config.trust_threshold;
        self.trust
            .iter()
            .any(|((w, _), r)| *w == worker && *r >= threshold)
    }

    /// Whether a connected, unrefused worker with a record on its connection's backend is online.
    pub(super) fn trusted_online(&self) -> bool {
        self.conns.iter().any(|(id, c)| {
            !self.workers.get(&c.worker).is_some_and(|w| w.refused)
                && self.trust_record(*id, c.worker) >= self.config.trust_threshold
        })
    }

    /// Replicas of a unit first leased to a worker without a record, in audited mode: three (one of them
    /// trusted, see `assign::pick_fresh`) when three workers are online, never fewer than R.
    pub(super) fn new_worker_replicas(&self, redundancy: u32) -> u32 {
        let online: std::collections::HashSet<WorkerId> = self
            .conns
            .values()
            .map(|c| c.worker)
            .filter(|w| !self.workers.get(w).is_some_and(|i| i.refused))
            .collect();
        redundancy.max((online.len() as u32).min(3))
    }

    /// A unit of `job` whose audit waits for an auditor that trusted `worker` at `addr` may be (a random one of
    /// them, salted per call).
    pub(super) fn pick_audit(
        &self,
        job: &JobRun,
        worker: WorkerId,
        addr: IpAddr,
        salt: u64,
    ) -> Option<usize> {
        let placement = self.config.placement;
        job.micros
            .iter()
            .enumerate()
            .filter(|(_, m)| may_audit(m, worker, addr, placement, &self.leases))
            .min_by_key(|(i, _)| starling_core::rng::SplitMix64::new(salt ^ *i as u64).next_u64())
            .map(|(i, _)| i)
    }

    /// Sends every audit that waits for an auditor no connected worker can be, or that none took within
    /// `speculate_after` (the step waits for it), to the coordinator's CPU.
    pub(super) fn audit_fallbacks(&mut self, fx: &mut Effects) {
        let now = self.now();
        let patience = self.config.speculate_after;
        let placement = self.config.placement;
        let threshold = self.config.trust_threshold;
        let mut orphans = Vec::new();
        for job in self.jobs.values() {
            if job.status != JobStatus::Running {
                continue;
            }
            for (i, m) in job.micros.iter().enumerate() {
                let Some(audit) = m.audit.as_ref().filter(|a| a.wants_auditor(&self.leases)) else {
                    continue;
                };
                if now.duration_since(audit.since) >= patience {
                    orphans.push((job.id, i as u32));
                    continue;
                }
                let auditor = self.conns.iter().any(|(id, c)| {
                    !self.workers.get(&c.worker).is_some_and(|w| w.refused)
                        && self.trust_record(*id, c.worker) >= threshold
                        && may_audit(m, c.worker, c.addr, placement, &self.leases)
                });
                if !auditor {
                    orphans.push((job.id, i as u32));
                }
            }
        }
        for (job_id, micro) in orphans {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if let Some(a) = job.micros[micro as usize].audit.as_mut() {
                a.coordinator = true;
            }
            job.counters.audits_by_coordinator += 1;
            tracing::info!(job = %job_id, step = job.step, micro, "no trusted auditor on another subnet is online; the coordinator audits the unit");
            self.request_recompute(job_id, micro, CheckKind::Audit, fx);
        }
    }

    /// An auditor's result came back: agreeing (or a near miss) passes the audit; a disagreement is settled by the
    /// coordinator's recomputation, never by counting the two results.
    pub(super) fn audit_result(
        &mut self,
        job_id: JobId,
        micro: u32,
        sub: Submission,
        fx: &mut Effects,
    ) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let (tolerance, scale) = (job.hyper.agreement_tolerance(), job.scale.0);
        let m = &mut job.micros[micro as usize];
        let Phase::Accepted(o) = &m.phase else {
            return;
        };
        let judged = judge(
            &sub.candidate(),
            sub.trace.as_deref(),
            &o.candidate(),
            o.trace.as_deref(),
            tolerance,
            scale,
        );
        let author = Author::from(&sub);
        match judged {
            Judged::Agrees | Judged::NearMiss => {
                m.audit = None;
                if let (Judged::Agrees, Phase::Accepted(o)) = (judged, &mut m.phase) {
                    // The auditor's computation stands behind the result too (the step's `min_agreeing`).
                    o.agreeing += 1;
                }
                job.counters.audits_passed += 1;
                if judged == Judged::Agrees {
                    self.credit_extra(job_id, micro, author, fx);
                } else {
                    self.near_miss_verdict(job_id, author, fx);
                }
                self.maybe_advance(job_id, fx);
            }
            Judged::Disagrees => {
                job.counters.audit_disputes += 1;
                if let Some(a) = m.audit.as_mut() {
                    a.auditor = Some(sub);
                    a.coordinator = true;
                }
                tracing::info!(job = %job_id, step = job.step, micro, auditor = %author.worker, "an auditor disagrees with an accepted result; the coordinator recomputes the unit to settle it");
                self.request_recompute(job_id, micro, CheckKind::Audit, fx);
            }
        }
    }

    /// The coordinator's recomputation of an audited unit came back (`None`: it could not run). Returns `false`
    /// when the unit has no audit waiting for it (the caller judges the recomputation as usual).
    pub(super) fn audit_settled(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        reference: Option<Reference>,
        fx: &mut Effects,
    ) -> bool {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        if job.step != step || job.status.is_terminal() {
            return false;
        }
        let redundancy = job.hyper.redundancy;
        let (tolerance, scale) = (job.hyper.agreement_tolerance(), job.scale.0);
        let Some(m) = job.micros.get_mut(micro as usize) else {
            return false;
        };
        if !m.audit.as_ref().is_some_and(|a| a.coordinator) {
            return false;
        }
        let Some(pending) = m.audit.take() else {
            return false;
        };
        let Phase::Accepted(accepted) = &m.phase else {
            return true;
        };
        let Some(Reference {
            out: reference,
            trace: ref_trace,
        }) = reference
        else {
            if let Some(a) = pending.auditor {
                // An unresolved dispute: nobody is struck, the unit is computed afresh by replicas.
                tracing::warn!(job = %job_id, step, micro, "the recomputation settling an audit dispute could not run; the unit is replicated afresh");
                m.phase = Phase::Open {
                    wanted: redundancy,
                    solo: false,
                };
                m.vouchers.clear();
                job.counters.micro_batches_accepted =
                    job.counters.micro_batches_accepted.saturating_sub(1);
                job.counters.rows_accepted = job
                    .counters
                    .rows_accepted
                    .saturating_sub(m.rows.len() as u64);
                self.late(job_id, Author::from(&a), fx);
            }
            self.maybe_advance(job_id, fx);
            return true;
        };
        let ours = super::micro::candidate(
            reference.loss,
            reference.correct,
            &reference.grad,
            ref_trace.as_deref(),
        );
        let failed = judge(
            &accepted.candidate(),
            accepted.trace.as_deref(),
            &ours,
            ref_trace.as_deref(),
            tolerance,
            scale,
        ) == Judged::Disagrees;
        let distance = verify::distance(&accepted.grad, &reference.grad, scale);
        let auditor = pending.auditor.map(|a| {
            let j = judge(
                &a.candidate(),
                a.trace.as_deref(),
                &ours,
                ref_trace.as_deref(),
                tolerance,
                scale,
            );
            (Author::from(&a), j)
        });
        let vouchers = std::mem::take(&mut m.vouchers);
        if failed {
            job.counters.audit_failures += 1;
            job.counters.micro_batches_by_coordinator += 1;
            job.last_bad_step = Some(step);
            // The step waited for this audit: the wrong result never reaches the model; ours takes its place.
            m.phase = Phase::Accepted(Outcome {
                loss: reference.loss,
                correct: reference.correct,
                grad: Arc::new(reference.grad),
                agreeing: 1 + u32::from(auditor.is_some_and(|(_, j)| j == Judged::Agrees)),
                verified: true,
                trace: ref_trace,
            });
            tracing::warn!(
                job = %job_id, step, micro, distance,
                vouchers = ?vouchers.iter().map(|c| c.worker).collect::<Vec<_>>(),
                "audit failed: refusing the unit's vouchers, clawing back their credits and striking out their unapplied results"
            );
        } else {
            job.counters.audits_passed += 1;
            m.vouchers = vouchers.clone();
        }
        match auditor {
            Some((a, Judged::Agrees)) => self.credit_extra(job_id, micro, a, fx),
            Some((a, Judged::NearMiss)) => self.near_miss_verdict(job_id, a, fx),
            Some((a, Judged::Disagrees)) => self.reject(
                job_id,
                a,
                "audit result disagrees with the coordinator's recomputation",
                fx,
            ),
            None => {}
        }
        if failed {
            let refused: Vec<WorkerId> = vouchers.iter().map(|c| c.worker).collect();
            for c in vouchers {
                self.claw_back(job_id, step, micro, c, fx);
                self.refuse(c.worker, fx);
            }
            self.strike_out(&refused, fx);
            fx.notify(job_id);
        }
        self.maybe_advance(job_id, fx);
        true
    }

    /// Workers a failed audit refused: their results not yet applied — waiting in any job's current step, or
    /// accepted on their word (no recomputation agreed with them) in a step not yet applied — are struck out,
    /// their credits for them clawed back, and those units computed afresh.
    fn strike_out(&mut self, refused: &[WorkerId], fx: &mut Effects) {
        let mut clawed = Vec::new();
        let leases = &self.leases;
        for job in self.jobs.values_mut() {
            if job.status.is_terminal() {
                continue;
            }
            let redundancy = job.hyper.redundancy;
            for (i, m) in job.micros.iter_mut().enumerate() {
                m.subs.retain(|s| !refused.contains(&s.worker));
                let unverified = matches!(&m.phase, Phase::Accepted(o) if !o.verified);
                if !unverified || !m.vouchers.iter().any(|c| refused.contains(&c.worker)) {
                    continue;
                }
                for c in m.vouchers.drain(..) {
                    if refused.contains(&c.worker) {
                        clawed.push((job.id, job.step, i as u32, c));
                    }
                }
                // Computed afresh like a new unit: an auditor's outstanding lease becomes one of its replicas (the
                // refused workers stay involved: they get no more leases).
                let auditor = m
                    .audit
                    .take()
                    .and_then(|a| a.lease)
                    .and_then(|l| leases.get(&l).map(|lease| (l, lease.worker)));
                m.involved
                    .retain(|(w, _)| refused.contains(w) || auditor.is_some_and(|(_, a)| a == *w));
                if let Some((l, _)) = auditor {
                    m.active.push(l);
                }
                m.phase = Phase::Open {
                    wanted: redundancy,
                    solo: false,
                };
                job.counters.results_struck_out += 1;
                job.counters.micro_batches_accepted =
                    job.counters.micro_batches_accepted.saturating_sub(1);
                job.counters.rows_accepted = job
                    .counters
                    .rows_accepted
                    .saturating_sub(m.rows.len() as u64);
                tracing::warn!(job = %job.id, step = job.step, micro = i, "an unapplied result of a refused worker is struck out; the unit is computed afresh");
            }
        }
        for (job, step, micro, c) in clawed {
            self.claw_back(job, step, micro, c, fx);
        }
    }
}
