//! From results to verdicts: validation, quorum, disagreement, accepting and auditing, and extra replicas of
//! accepted micro-batches; the coordinator's own recomputation (asked for, and judged against) is `recompute.rs`.
//! There is one accept path ([`State::accept`]) and one reject path ([`State::reject`]); `late` ([`State::late`])
//! answers results that are neither (including near misses, which are never used).

use std::sync::Arc;

use starling_core::protocol::{JobId, LeaseId, Outcome as Verdict};

use super::State;
use super::conns::Claim;
use super::effects::{CheckKind, ConnId, Effects, StoreOp};
use super::micro::{Outcome, Phase, Submission};
use super::recompute::Reference;
use super::round::{Trace, traces_agree};
use crate::job::MAX_REPLICAS;
use crate::store::AcceptedRow;
use crate::verify::{self, Candidate, Settle};

/// How one result compares with a reference (an accepted result or the coordinator's recomputation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judged {
    Agrees,
    /// Loss and correct count agree, the gradient is within [`verify::NEAR_MISS`] but outside the tolerance.
    NearMiss,
    Disagrees,
}

/// Compares a result with a reference; for `local` results the inner traces must agree as well (when both sides
/// have one).
pub(super) fn judge(
    sub: &Candidate<'_>,
    sub_trace: Option<&Trace>,
    reference: &Candidate<'_>,
    ref_trace: Option<&Trace>,
    tolerance: f32,
    scale: f64,
) -> Judged {
    let traces = match (sub_trace, ref_trace) {
        (Some(a), Some(b)) => traces_agree(a, b, tolerance),
        // A local result judged against a reference without one (reloaded after a restart) or vice versa.
        _ => true,
    };
    if traces && verify::agree(sub, reference, tolerance, scale) {
        Judged::Agrees
    } else if traces && verify::near_miss(sub, reference, tolerance, scale) {
        Judged::NearMiss
    } else {
        Judged::Disagrees
    }
}

/// An audit under way: the accepted outcome of a micro-batch and the credits granted to those who vouched for it.
#[derive(Debug, Clone)]
pub(super) struct Audit {
    pub outcome: Outcome,
    pub credits: Vec<crate::store::Credit>,
}

/// Who submitted a result, for its verdict.
#[derive(Debug, Clone, Copy)]
pub(super) struct Author {
    pub worker: starling_core::protocol::WorkerId,
    pub conn: ConnId,
    pub lease: LeaseId,
}

impl From<&Submission> for Author {
    fn from(s: &Submission) -> Self {
        Self {
            worker: s.worker,
            conn: s.conn,
            lease: s.lease,
        }
    }
}

impl State {
    /// A result arrived for `lease_id` on `conn`.
    pub fn result(
        &mut self,
        conn: ConnId,
        lease_id: LeaseId,
        loss: f32,
        correct: u32,
        grad: Vec<f32>,
    ) -> Effects {
        let mut fx = self.effects();
        if let Some(claim) = self.claim(conn, lease_id, &mut fx) {
            if self.jobs.get(&claim.job).is_some_and(|j| j.local.is_some()) {
                let author = Author {
                    worker: claim.worker,
                    conn: claim.conn,
                    lease: claim.lease,
                };
                self.reject(
                    claim.job,
                    author,
                    "a local lease is answered by local_result",
                    &mut fx,
                );
            } else {
                self.submit_with(claim, loss, correct, grad, None, &mut fx);
            }
        }
        self.assign_all(&mut fx);
        fx
    }

    /// A result arrived whose payload does not match the `commit` it was sent with: rejected like any invalid
    /// result (or `late` when the lease is no longer this connection's).
    pub fn result_mismatch(&mut self, conn: ConnId, lease_id: LeaseId) -> Effects {
        let mut fx = self.effects();
        if let Some(c) = self.claim(conn, lease_id, &mut fx) {
            let author = Author {
                worker: c.worker,
                conn: c.conn,
                lease: c.lease,
            };
            self.reject(c.job, author, "payload does not match its commit", &mut fx);
        }
        self.assign_all(&mut fx);
        fx
    }

    /// Validates a result and files it with its micro-batch (`trace`: a `local` lease's inner steps).
    pub(super) fn submit_with(
        &mut self,
        c: Claim,
        loss: f32,
        correct: u32,
        grad: Vec<f32>,
        trace: Option<Arc<Trace>>,
        fx: &mut Effects,
    ) {
        let now = self.now();
        let max_params = self.config.spot_check_max_params;
        let Some(job) = self.jobs.get_mut(&c.job) else {
            return;
        };
        let elapsed = now.duration_since(c.issued).as_secs_f64() * 1000.0;
        job.result_ms = if job.result_ms == 0.0 {
            elapsed
        } else {
            0.9 * job.result_ms + 0.1 * elapsed
        };
        let author = Author {
            worker: c.worker,
            conn: c.conn,
            lease: c.lease,
        };
        // A local lease's counts sum over its inner steps, which may revisit rows (and a language model's count
        // positions: `labels_per_row` per row).
        let rows = match trace {
            Some(_) => job.hyper.h * job.hyper.inner_batch * job.spec.labels_per_row() as u32,
            // A language model predicts every position of a row: `labels_per_row` counts per row.
            None => (job.micros[c.micro as usize].rows.len() * job.spec.labels_per_row()) as u32,
        };
        if let Err(why) = verify::validate(loss, correct, rows, &grad, job.spec.param_count()) {
            self.reject(c.job, author, &why.to_string(), fx);
            return;
        }
        let sub = Submission {
            worker: c.worker,
            conn: c.conn,
            lease: c.lease,
            loss,
            correct,
            grad,
            trace,
        };
        job.counters.rows_computed += job.micros[c.micro as usize].rows.len() as u64;
        if job.micros[c.micro as usize]
            .audit
            .as_ref()
            .is_some_and(|a| a.lease == Some(c.lease))
        {
            self.audit_result(c.job, c.micro, sub, fx);
            return;
        }
        let audited = super::audit::audited_mode(job, max_params);
        let (tolerance, quorum, redundancy, scale) = (
            job.hyper.agreement_tolerance(),
            job.hyper.quorum() as usize,
            job.hyper.redundancy,
            job.scale.0,
        );
        let recomputable = job.spec.param_count() <= max_params;
        let m = &mut job.micros[c.micro as usize];
        match &m.phase {
            Phase::Accepted(o) => {
                // An extra (speculative or late) replica of a micro-batch already accepted: credited if it agrees.
                match judge(
                    &sub.candidate(),
                    sub.trace.as_deref(),
                    &o.candidate(),
                    o.trace.as_deref(),
                    tolerance,
                    scale,
                ) {
                    Judged::Agrees => self.credit_extra(c.job, c.micro, author, fx),
                    Judged::NearMiss => self.near_miss_verdict(c.job, author, fx),
                    Judged::Disagrees if o.verified => self.reject(
                        c.job,
                        author,
                        "disagrees with the coordinator-verified result",
                        fx,
                    ),
                    Judged::Disagrees => {
                        // Only replicas vouch for the accepted result, and replicas can be colluders: a
                        // disagreeing later replica is no proof either way, so it is not struck.
                        job.counters.disagreements += 1;
                        tracing::info!(job = %c.job, step = job.step, micro = c.micro, worker = %c.worker, "a later replica disagrees with a result only replicas vouch for: late, not struck by vote");
                        self.late(c.job, author, fx)
                    }
                }
            }
            Phase::Abandoned => self.late(c.job, author, fx),
            Phase::Checking { .. } => m.subs.push(sub),
            Phase::Open { wanted, solo } => {
                let (wanted, solo) = (*wanted, *solo);
                m.subs.push(sub);
                if solo && audited {
                    // Audited mode: a trusted worker's result is used alone; `accept` rolls its audit.
                    let won = std::mem::take(&mut m.subs);
                    let outcome = mean_outcome(&won, 1, false);
                    self.accept(c.job, c.micro, outcome, &won, fx);
                    return;
                }
                if solo {
                    // A trusted worker's unreplicated result reaches the model only if the coordinator's own
                    // recomputation agrees.
                    m.check(CheckKind::Spot, redundancy);
                    job.counters.spot_checks += 1;
                    self.request_recompute(c.job, c.micro, CheckKind::Spot, fx);
                    return;
                }
                let settled = {
                    let candidates: Vec<Candidate<'_>> =
                        m.subs.iter().map(Submission::candidate).collect();
                    let subs = &m.subs;
                    // Replicas alone settle a micro-batch only when every one leased agrees: with R ≥ 3 a
                    // quorum that outran the rest could be a colluding pair.
                    verify::settle_by(candidates.len(), wanted as usize, |i, j| {
                        judge(
                            &candidates[i],
                            subs[i].trace.as_deref(),
                            &candidates[j],
                            subs[j].trace.as_deref(),
                            tolerance,
                            scale,
                        ) == Judged::Agrees
                    })
                };
                match settled {
                    Settle::Agreed => {
                        let won = std::mem::take(&mut m.subs);
                        let outcome = mean_outcome(&won, won.len() as u32, false);
                        self.accept(c.job, c.micro, outcome, &won, fx);
                    }
                    Settle::Waiting => {}
                    Settle::Disagree(clusters) => {
                        if recomputable {
                            job.counters.disagreements += 1;
                            // Settle it with our own recomputation, never by counting votes: two colluders agree
                            // with each other as well as two honest workers do.
                            m.check(CheckKind::Arbitrate, (wanted + 1).min(MAX_REPLICAS));
                            job.counters.arbitrations += 1;
                            tracing::info!(job = %c.job, step = job.step, micro = c.micro, "results disagree; the coordinator recomputes the micro-batch to settle it");
                            self.request_recompute(c.job, c.micro, CheckKind::Arbitrate, fx);
                        } else if clusters[0].len() >= quorum {
                            job.counters.disagreements += 1;
                            // Too large to recompute: the step needs the micro-batch, so a quorum's result is used,
                            // but nobody is struck by vote — the others are late.
                            let subs = std::mem::take(&mut m.subs);
                            let (won, lost) = pick(subs, &clusters[0]);
                            let outcome = mean_outcome(&won, won.len() as u32, false);
                            self.accept(c.job, c.micro, outcome, &won, fx);
                            for l in &lost {
                                tracing::info!(worker = %l.worker, job = %c.job, micro = c.micro, "result disagrees with a quorum of replicas; late, not struck by vote");
                                self.late(c.job, l.into(), fx);
                            }
                        } else if m.subs.len() as u32 >= wanted {
                            job.counters.disagreements += 1;
                            if wanted >= MAX_REPLICAS {
                                tracing::warn!(job = %c.job, step = job.step, micro = c.micro, "no quorum after {MAX_REPLICAS} replicas; micro-batch abandoned for this step");
                                job.counters.micro_batches_abandoned += 1;
                                let subs = std::mem::take(&mut m.subs);
                                m.abandon();
                                for l in &subs {
                                    self.late(c.job, l.into(), fx);
                                }
                                self.maybe_advance(c.job, fx);
                            } else {
                                m.reopen(wanted + 1);
                                tracing::info!(job = %c.job, step = job.step, micro = c.micro, replicas = wanted + 1, "results disagree; leasing a tie-breaker");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The one accept path: `outcome` becomes micro-batch `micro`'s result; the `credited` replicas are credited,
    /// persisted with it in one write, and told `accepted` once that write is durable.
    pub(super) fn accept(
        &mut self,
        job_id: JobId,
        micro: u32,
        outcome: Outcome,
        credited: &[Submission],
        fx: &mut Effects,
    ) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let (step, rows) = (job.step, job.micros[micro as usize].rows.len() as u32);
        let flops = job.spec.train_flops(rows as u64);
        let now = self.now();
        // Audit a replica-only acceptance with probability `hyper.audit`, drawn after acceptance so no worker can
        // know in advance which of its results will be recomputed.
        let audited_mode = super::audit::audited_mode(job, self.config.spot_check_max_params);
        let auditable = !outcome.verified
            && !credited.is_empty()
            && job.spec.param_count() <= self.config.spot_check_max_params
            && job.hyper.audit > 0.0;
        let audit = auditable && self.rng.next_f64() < job.hyper.audit as f64;
        let credits: Vec<crate::store::Credit> = credited
            .iter()
            .map(|s| self.credit(s.worker, flops))
            .collect();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.scale.observe(verify::l2_norm(&outcome.grad));
        job.counters.results_accepted += credited.len() as u64;
        job.counters.micro_batches_accepted += 1;
        job.counters.rows_accepted += rows as u64;
        if credited.is_empty() {
            job.counters.micro_batches_by_coordinator += 1;
        }
        fx.persist(StoreOp::Accepted {
            job: job_id,
            step,
            row: AcceptedRow {
                micro,
                rows,
                loss: outcome.loss,
                correct: outcome.correct,
                agreeing: outcome.agreeing,
                grad: outcome.grad.to_vec(),
            },
            credits: credits.clone(),
        });
        let credits_kept = credits.clone();
        if audit && audited_mode {
            // The step waits for this audit (an auditor's lease, or the coordinator: `audit_fallbacks`).
            job.counters.audits += 1;
        } else if audit {
            job.counters.audits += 1;
            job.audits.insert(
                (step, micro),
                Audit {
                    outcome: outcome.clone(),
                    credits,
                },
            );
        }
        let m = &mut job.micros[micro as usize];
        m.accept(outcome);
        m.vouchers = credits_kept;
        if audit && audited_mode {
            m.audit = Some(super::audit::PendingAudit::new(now));
        } else if audit {
            self.request_recompute(job_id, micro, CheckKind::Audit, fx);
        }
        for s in credited {
            self.verdict(
                s.conn,
                s.worker,
                Some(job_id),
                s.lease,
                Verdict::Accepted,
                fx,
            );
        }
        self.maybe_advance(job_id, fx);
    }

    /// An audit's recomputation came back: a result that is neither in agreement nor a near miss refuses every
    /// worker that vouched for it and claws back their credits for it; the step that included it is recorded.
    pub(super) fn audited(
        &mut self,
        job_id: JobId,
        step: u64,
        micro: u32,
        audit: Audit,
        reference: Option<Reference>,
        fx: &mut Effects,
    ) {
        let Some(Reference {
            out: reference,
            trace: ref_trace,
        }) = reference
        else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let ours = super::micro::candidate(
            reference.loss,
            reference.correct,
            &reference.grad,
            ref_trace.as_deref(),
        );
        if judge(
            &audit.outcome.candidate(),
            audit.outcome.trace.as_deref(),
            &ours,
            ref_trace.as_deref(),
            job.hyper.agreement_tolerance(),
            job.scale.0,
        ) != Judged::Disagrees
        {
            return;
        }
        job.counters.audit_failures += 1;
        job.last_bad_step = Some(step);
        tracing::warn!(
            job = %job_id, step, micro, applied = job.step > step,
            distance = verify::distance(&audit.outcome.grad, &reference.grad, job.scale.0),
            vouchers = ?audit.credits.iter().map(|c| c.worker).collect::<Vec<_>>(),
            "audit failed: step {step} included a wrong micro-batch; refusing its vouchers and clawing back their credits"
        );
        for c in audit.credits {
            self.claw_back(job_id, step, micro, c, fx);
            self.refuse(c.worker, fx);
        }
        fx.notify(job_id);
    }

    /// An extra replica agreed with the accepted result: credited, not used again.
    pub(super) fn credit_extra(&mut self, job_id: JobId, micro: u32, a: Author, fx: &mut Effects) {
        let Some(job) = self.jobs.get(&job_id) else {
            return;
        };
        let (step, flops) = (
            job.step,
            job.spec
                .train_flops(job.micros[micro as usize].rows.len() as u64),
        );
        let credit = self.credit(a.worker, flops);
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.results_accepted += 1;
        }
        fx.persist(StoreOp::Credit {
            job: job_id,
            step,
            micro,
            credit,
        });
        self.verdict(
            a.conn,
            a.worker,
            Some(job_id),
            a.lease,
            Verdict::Accepted,
            fx,
        );
    }

    /// The one reject path: a strike (persisted), then the `rejected` verdict, then — if this strike refused the
    /// worker — `error refused` and a close on each of its connections.
    pub(super) fn reject(&mut self, job_id: JobId, a: Author, why: &str, fx: &mut Effects) {
        tracing::warn!(worker = %a.worker, job = %job_id, lease = %a.lease, %why, "result rejected");
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.results_rejected += 1;
        }
        let struck = self.strike(a.worker, fx);
        self.verdict(
            a.conn,
            a.worker,
            Some(job_id),
            a.lease,
            Verdict::Rejected,
            fx,
        );
        if struck == super::trust::Struck::Refused {
            self.close_refused(a.worker, fx);
        }
    }

    /// Neither accepted nor rejected: no credit, no strike.
    pub(super) fn late(&mut self, job_id: JobId, a: Author, fx: &mut Effects) {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.results_late += 1;
        }
        self.verdict(a.conn, a.worker, Some(job_id), a.lease, Verdict::Late, fx);
    }

    /// A near miss is answered `late`; the [`super::NEAR_MISS_STRIKE`]th in a row is rejected instead (a worker
    /// adding small noise to every result lands here every time).
    pub(super) fn near_miss_verdict(&mut self, job_id: JobId, a: Author, fx: &mut Effects) {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.counters.near_misses += 1;
        }
        if self.near_miss(a.worker) {
            self.reject(job_id, a, "near misses in a row", fx);
        } else {
            self.late(job_id, a, fx);
        }
    }
}

/// Splits `subs` into the winners named by index and the rest.
pub(super) fn pick(subs: Vec<Submission>, winners: &[usize]) -> (Vec<Submission>, Vec<Submission>) {
    let mut won = Vec::with_capacity(winners.len());
    let mut lost = Vec::new();
    for (i, s) in subs.into_iter().enumerate() {
        if winners.contains(&i) {
            won.push(s);
        } else {
            lost.push(s);
        }
    }
    (won, lost)
}

/// The mean of agreeing replicas (loss and gradient; the first replica's correct count).
pub(super) fn mean_outcome(won: &[Submission], agreeing: u32, verified: bool) -> Outcome {
    let n = won.len() as f32;
    let mut grad = vec![0.0f32; won[0].grad.len()];
    for w in won {
        for (o, v) in grad.iter_mut().zip(&w.grad) {
            *o += v / n;
        }
    }
    Outcome {
        loss: won.iter().map(|w| w.loss).sum::<f32>() / n,
        correct: won[0].correct,
        grad: Arc::new(grad),
        agreeing,
        verified,
        trace: won[0].trace.clone(),
    }
}
