//! The coordinator's own recomputation of a micro-batch (or replay of a local lease): asking for it, and judging the
//! replicas against it when it comes back — the arbiter of every disagreement, tie and audit, so no verdict is ever
//! a vote (docs/PROTOCOL.md, Verification).

use std::sync::Arc;

use starling_core::StepOutput;
use starling_core::protocol::JobId;

use super::State;
use super::effects::{CheckKind, Effects, Recompute};
use super::micro::{Outcome, Phase};
use super::round::Trace;
use super::settle::{Judged, judge, mean_outcome};
use crate::verify;

impl State {
    pub(super) fn request_recompute(
        &mut self,
        job_id: JobId,
        micro: u32,
        kind: CheckKind,
        fx: &mut Effects,
    ) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let (x, labels) = job.train.gather(&job.micros[micro as usize].rows);
        let rows = job.micros[micro as usize].rows.len() as u64;
        // A shard carried from an earlier round is replayed from its own base version and plan (`elastic.rs`).
        let local = job.local.as_ref().map(|_| super::effects::LocalReplay {
            plan: job.shard_plan(micro as usize),
            quant: job.hyper.quant,
        });
        let r = Recompute {
            local,
            kind,
            job: job_id,
            step: job.step,
            micro,
            spec: job.spec.clone(),
            params: match job.local {
                Some(_) => job.shard_base(micro as usize),
                None => job.params.clone(),
            },
            x,
            labels,
        };
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.rows_recomputed += rows;
        }
        fx.recompute(r);
    }

    /// The coordinator's recomputation of a micro-batch finished (`None`: it could not run, so the micro-batch
    /// goes back to replication). Every waiting replica is judged against it: those that agree are accepted and
    /// credited (`agreeing` counts the coordinator too); near misses are `late` (never used, not struck; the
    /// [`super::NEAR_MISS_STRIKE`]th in a row is a strike); the rest are rejected. With no agreeing replica but a near
    /// miss, the coordinator's own result is the micro-batch's (nobody is credited); with neither, it is leased
    /// afresh.
    pub fn recomputed(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        reference: Option<StepOutput>,
    ) -> Effects {
        let mut fx = self.effects();
        let reference = reference.map(|out| Reference { out, trace: None });
        self.judge_recomputation(job_id, step, micro, reference, &mut fx);
        self.assign_all(&mut fx);
        fx
    }

    /// The coordinator's replay of a `local` lease finished (its delta already through the job's quantisation,
    /// as a replica's would be): judged like [`State::recomputed`], traces included.
    pub fn replayed(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        replay: Option<starling_core::local::LocalOutput>,
    ) -> Effects {
        let mut fx = self.effects();
        let reference = replay.map(|o| {
            let trace = Trace::from(&o);
            Reference {
                out: StepOutput {
                    loss: trace.mean_loss(),
                    correct: trace.correct.iter().sum(),
                    grad: o.delta,
                },
                trace: Some(Arc::new(trace)),
            }
        });
        self.judge_recomputation(job_id, step, micro, reference, &mut fx);
        self.assign_all(&mut fx);
        fx
    }

    fn judge_recomputation(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        reference: Option<Reference>,
        fx: &mut Effects,
    ) {
        let reference = match self
            .jobs
            .get(&job_id)
            .and_then(|j| j.micros.get(micro as usize))
        {
            Some(m) if m.audit.is_some() => {
                // Audited mode: the unit's audit (the caller's reference is consumed there).
                self.audit_settled(job_id, step, micro, reference, fx);
                return;
            }
            _ => reference,
        };
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if let Some(audit) = job.audits.remove(&(step, micro)) {
            self.audited(job_id, step, micro, audit, reference, fx);
            return;
        }
        if job.step != step || job.status.is_terminal() {
            return;
        }
        let (tolerance, redundancy, scale) = (
            job.hyper.agreement_tolerance(),
            job.hyper.redundancy,
            job.scale.0,
        );
        let Some(m) = job.micros.get_mut(micro as usize) else {
            return;
        };
        let Phase::Checking { kind, fallback } = m.phase else {
            return;
        };
        let Some(reference) = reference else {
            m.reopen(fallback);
            return;
        };
        let Reference {
            out: reference,
            trace: ref_trace,
        } = reference;
        let ours = super::micro::candidate(
            reference.loss,
            reference.correct,
            &reference.grad,
            ref_trace.as_deref(),
        );
        let mut won = Vec::new();
        let mut near = Vec::new();
        let mut lost = Vec::new();
        for s in std::mem::take(&mut m.subs) {
            match judge(
                &s.candidate(),
                s.trace.as_deref(),
                &ours,
                ref_trace.as_deref(),
                tolerance,
                scale,
            ) {
                Judged::Agrees => won.push(s),
                Judged::NearMiss => near.push(s),
                Judged::Disagrees => lost.push(s),
            }
        }
        if kind == CheckKind::Spot && won.is_empty() && near.is_empty() {
            job.counters.spot_check_failures += 1;
        }
        if !won.is_empty() {
            let outcome = mean_outcome(&won, won.len() as u32 + 1, true);
            self.accept(job_id, micro, outcome, &won, fx);
        } else if !near.is_empty() {
            let outcome = Outcome {
                loss: reference.loss,
                correct: reference.correct,
                grad: Arc::new(reference.grad.clone()),
                agreeing: near.len() as u32 + 1,
                verified: true,
                trace: ref_trace.clone(),
            };
            self.accept(job_id, micro, outcome, &[], fx);
        } else {
            tracing::warn!(job = %job_id, step, micro, replicas = lost.len(), "no replica agrees with the coordinator's recomputation");
            m.reopen(redundancy);
        }
        for s in &near {
            tracing::info!(
                worker = %s.worker, job = %job_id, step, micro, distance = verify::distance(&s.grad, &reference.grad, scale),
                "result is a near miss of the coordinator's recomputation: not used, no strike"
            );
            self.near_miss_verdict(job_id, s.into(), fx);
        }
        for s in &lost {
            tracing::warn!(
                worker = %s.worker, job = %job_id, step, micro,
                distance = verify::distance(&s.grad, &reference.grad, scale),
                loss = s.loss, reference_loss = reference.loss, correct = s.correct, reference_correct = reference.correct,
                "result disagrees with the coordinator's recomputation"
            );
            self.reject(
                job_id,
                s.into(),
                "disagrees with the coordinator's recomputation",
                fx,
            );
        }
        self.maybe_advance(job_id, fx);
    }
}

/// The coordinator's own result for a micro-batch: a recomputed step, or a replayed local lease with its trace.
#[derive(Debug)]
pub(super) struct Reference {
    pub out: StepOutput,
    pub trace: Option<Arc<Trace>>,
}
