//! A job's life beyond single micro-batches: applying a step once every micro-batch is settled, evaluations and
//! early stopping, owner control (pause, resume, cancel), and halting a job whose durable write failed.

use std::collections::BTreeSet;
use std::sync::Arc;

use starling_core::protocol::{JobId, LeaseId};

use super::State;
use super::effects::{Action, Deferred, Effects, EvalTask, Evaluation, StoreOp};
use super::micro::Phase;
use crate::job::JobStatus;
use crate::store::{Checkpoint, MetricRow, now_ms};

impl State {
    /// Applies the step once every micro-batch is settled (a `local` round: once it is due, `elastic.rs`): the
    /// robust aggregate of the accepted gradients (a `local` round's stale deltas weighted `1/(1+s)`), one
    /// optimizer update, a new model version, a checkpoint, and (every `eval_every` steps) an evaluation.
    pub(super) fn maybe_advance(&mut self, job_id: JobId, fx: &mut Effects) {
        let now = self.now();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let due = match job.local {
            Some(_) => job.round_due(now),
            None => !job.micros.is_empty() && !job.micros.iter().any(|m| m.unsettled()),
        };
        if !due {
            return;
        }
        let old_step = job.step;
        let weights = super::elastic::part_weights(job);
        let stale = job
            .micros
            .iter()
            .filter(|m| {
                matches!(m.phase, Phase::Accepted(_)) && m.origin.is_some_and(|(v, _)| v < job.step)
            })
            .count() as u64;
        let mut parts: Vec<(u32, &[f32])> = Vec::new();
        let (mut loss_sum, mut correct, mut rows, mut min_agreeing) =
            (0.0f64, 0u32, 0u32, u32::MAX);
        for (m, w) in job.micros.iter().zip(&weights) {
            if let (Phase::Accepted(o), Some(w)) = (&m.phase, w) {
                let r = m.rows.len() as u32;
                parts.push((*w, o.grad.as_slice()));
                // A local lease's loss and counts are over its H inner batches.
                // A language model's are over every position of its rows.
                let seen = if job.local.is_some() {
                    job.hyper.h * job.hyper.inner_batch
                } else {
                    r * job.spec.labels_per_row() as u32
                };
                loss_sum += o.loss as f64 * seen as f64;
                correct += o.correct;
                rows += seen;
                min_agreeing = min_agreeing.min(o.agreeing);
            }
        }
        if parts.is_empty() {
            // Every micro-batch was abandoned: run the same step again with fresh leases.
            let fresh = job.fresh_micros();
            let old = std::mem::replace(&mut job.micros, fresh);
            if job.local.is_some() {
                self.carry(job_id, old_step, old, fx);
            }
            return;
        }
        job.counters.stale_deltas_applied += stale;
        let grad = crate::aggregate::combine(&parts, job.hyper.aggregate, job.hyper.clip_norm);
        if let Some(local) = job.local.as_mut() {
            // A local round: `grad` is the mean verified delta; the outer step moves θ*, workers get θ_{v+1}.
            let next = local.outer_step(&job.hyper, job.id, job.step, &job.params, &grad);
            local.keep_base(job.step, job.params.clone(), job.hyper.staleness);
            job.params = Arc::new(next);
        } else {
            let scale = job.hyper.lr_schedule.factor(job.step, job.hyper.steps);
            let params = Arc::make_mut(&mut job.params);
            job.optim
                .step_scaled(params, &grad, scale, job.hyper.weight_decay);
        }
        job.step += 1;
        job.counters.steps_applied += 1;
        let elapsed = now.duration_since(job.step_started).as_secs_f64() * 1000.0;
        job.step_ms = if job.step_ms == 0.0 {
            elapsed
        } else {
            0.95 * job.step_ms + 0.05 * elapsed
        };
        job.step_started = now;
        let job_id = job.id;
        job.model_frame = super::JobRun::model_frame(job.id, job.step, &job.spec, &job.params);
        let train = MetricRow {
            step: job.step,
            kind: "train".into(),
            loss: (loss_sum / rows as f64) as f32,
            accuracy: correct as f32 / rows as f32,
            min_agreeing,
            at_ms: now_ms(),
        };
        if job.step % 50 == 0 {
            tracing::info!(job = %job.id, step = job.step, loss = train.loss, accuracy = train.accuracy, step_ms = job.step_ms as u64, "step applied");
        }
        job.last_train = Some(train.clone());
        fx.persist(StoreOp::Checkpoint {
            job: job.id,
            ckpt: Checkpoint {
                step: job.step,
                params: job.params.to_vec(),
                optim: match &job.local {
                    Some(local) => local.to_bytes(),
                    None => job.optim.to_bytes(),
                },
            },
            train,
        });
        let done = job.step >= job.hyper.steps;
        if job.step % job.hyper.eval_every == 0 || done {
            let task = EvalTask {
                job: job.id,
                step: job.step,
                spec: job.spec.clone(),
                params: job.params.clone(),
                test: job.test.clone(),
            };
            fx.eval(task);
        }
        let mut carried = None;
        if done {
            job.status = JobStatus::Completed;
            job.micros.clear();
            fx.persist(StoreOp::Status {
                job: job.id,
                status: JobStatus::Completed,
            });
            tracing::info!(job = %job.id, step = job.step, "job completed its steps");
        } else {
            let fresh = job.fresh_micros();
            let old = std::mem::replace(&mut job.micros, fresh);
            if job.local.is_some() {
                carried = Some(old);
            }
        }
        self.step_hist.observe(elapsed / 1000.0);
        if let Some(old) = carried {
            self.carry(job_id, old_step, old, fx);
        }
        fx.notify(job_id);
    }

    /// An evaluation finished: record it, and complete the job if it reached its target accuracy or its held-out
    /// loss has not improved for `hyper.patience` evaluations (early stopping: the best version stays
    /// downloadable).
    pub fn evaluated(&mut self, job_id: JobId, step: u64, eval: Evaluation) -> Effects {
        let mut fx = self.effects();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return fx;
        };
        let m = MetricRow {
            step,
            kind: "eval".into(),
            loss: eval.loss,
            accuracy: eval.accuracy(),
            min_agreeing: 0,
            at_ms: now_ms(),
        };
        tracing::info!(job = %job_id, step, test_loss = m.loss, test_accuracy = m.accuracy, "evaluated on held-out set");
        job.best_accuracy = Some(job.best_accuracy.map_or(m.accuracy, |b| b.max(m.accuracy)));
        job.note_eval_loss(m.loss);
        if job.last_eval.as_ref().is_none_or(|l| l.step <= step) {
            job.last_eval = Some(m.clone());
        }
        let target = job.hyper.target_accuracy.is_some_and(|t| m.accuracy >= t);
        let stale = job
            .hyper
            .patience
            .is_some_and(|p| job.evals_since_best >= p);
        if job.status == JobStatus::Running && (target || stale) {
            job.status = JobStatus::Completed;
            job.micros.clear();
            if target {
                tracing::info!(job = %job_id, step, accuracy = m.accuracy, "target accuracy reached; job completed");
            } else {
                tracing::info!(job = %job_id, step, best = job.best_accuracy, "no improvement for {} evaluations; job completed (early stopping)", job.evals_since_best);
            }
            fx.persist(StoreOp::Status {
                job: job_id,
                status: JobStatus::Completed,
            });
        }
        fx.persist(StoreOp::Eval {
            job: job_id,
            metric: m,
        });
        fx.notify(job_id);
        fx
    }

    /// Owner control: pause (no new leases), resume, or cancel (terminal; outstanding leases are dropped).
    pub fn set_status(&mut self, job_id: JobId, want: JobStatus) -> Result<Effects, String> {
        let mut fx = self.effects();
        let pass = self.min_pass();
        let job = self.jobs.get_mut(&job_id).ok_or("no such job")?;
        if job.status.is_terminal() {
            return Err(format!("job is {} and cannot change", job.status.as_str()));
        }
        match want {
            JobStatus::Paused => job.status = want,
            JobStatus::Running => {
                if job.status != JobStatus::Running {
                    job.pass = job.pass.max(pass);
                }
                job.status = want;
                job.error = None;
            }
            JobStatus::Cancelled => {
                job.status = JobStatus::Cancelled;
                job.micros.clear();
                self.drop_job_leases(job_id);
            }
            JobStatus::Completed => return Err("a job completes by itself".into()),
        }
        tracing::info!(job = %job_id, status = want.as_str(), "job status changed by its owner");
        fx.persist(StoreOp::Status {
            job: job_id,
            status: want,
        });
        fx.notify(job_id);
        self.assign_all(&mut fx);
        Ok(fx)
    }

    /// This coordinator node no longer leads job `job_id` (another node took it over, or its leadership lapsed):
    /// its leases are dropped (results for them are answered `late`) and it leaves memory, so nothing more is
    /// computed, sent or written for it here. Its durable state is the new leader's to load.
    pub fn unload_job(&mut self, job_id: JobId) {
        self.drop_job_leases(job_id);
        if self.jobs.remove(&job_id).is_some() {
            tracing::info!(job = %job_id, "job unloaded: another node leads it");
        }
    }

    /// Every open connection's id (to send them all the same frame, e.g. a `redirect`).
    pub fn conn_ids(&self) -> Vec<super::ConnId> {
        self.conns.keys().copied().collect()
    }

    fn drop_job_leases(&mut self, job_id: JobId) {
        let dropped: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.job == job_id)
            .map(|(id, _)| *id)
            .collect();
        for id in dropped {
            self.drop_lease(id);
        }
    }

    /// A durable write failed (`error`), or effects computed before an earlier halt were found stale (`None`: the
    /// job keeps the error it has): the jobs whose announcements were withheld are paused (the caller then
    /// reloads them from the store with [`State::reload_job`]); their leases are dropped (results for them are
    /// late), connections whose lease frames were withheld ask again, and connections that missed a `model` frame
    /// get it with their next lease.
    /// Gives a reloaded job back the status it had before a halt over stale effects (not a failed write): a
    /// running job stays running, a job paused by an earlier failed write stays paused.
    pub fn keep_status(&mut self, job: JobId, status: JobStatus) {
        if let Some(j) = self.jobs.get_mut(&job)
            && !j.status.is_terminal()
        {
            j.status = status;
        }
    }

    pub fn halt(&mut self, jobs: &BTreeSet<JobId>, withheld: &[Deferred], error: Option<&str>) {
        self.halts += 1;
        let epoch = self.halts;
        for id in jobs {
            if let Some(job) = self.jobs.get_mut(id) {
                job.halted_epoch = epoch;
                if !job.status.is_terminal() {
                    job.status = JobStatus::Paused;
                }
                if let Some(error) = error {
                    tracing::error!(job = %id, %error, "job paused: a durable write failed");
                    job.error = Some(error.to_string());
                }
            }
            self.drop_job_leases(*id);
        }
        for d in withheld {
            if let Action::Send { conn, lease, .. } = &d.action
                && let Some(c) = self.conns.get_mut(conn)
            {
                c.model = None;
                if lease.is_some() && c.lease.is_none() && c.ready.is_none() {
                    c.ready = Some(self.next_ticket);
                    self.next_ticket += 1;
                }
                c.waiting_sent = false;
            }
        }
    }
}
