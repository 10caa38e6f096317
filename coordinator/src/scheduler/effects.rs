//! What a scheduler handler asks the transport to do: durable writes first, then everything that reports on them.
//!
//! Every deferred action (a frame to send, a live notification, an evaluation, a recomputation) records how many
//! of the handler's store operations precede it (`after`). The caller writes the operations in order and carries
//! out only the actions whose preceding operations are all durable; the rest are withheld ([`Effects::split`]), so
//! nothing is announced that was not written ("durable, then visible").

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::Message;

use starling_core::protocol::{
    CoordinatorMsg, ErrorCode, JobId, LeaseId, WireFrame, WorkerId, encode,
};
use starling_core::{EvalOutput, ModelSpec};

use crate::store::{AcceptedRow, Checkpoint, Credit, MetricRow};

/// One WebSocket connection.
pub type ConnId = u64;

/// Something to send on a connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    Frame(Message),
    /// Send an `error` message with this code, then close the connection.
    Close(ErrorCode, String),
}

impl Outbound {
    pub fn msg(msg: &CoordinatorMsg, payload: &[u8]) -> Self {
        Self::Frame(frame_message(encode(msg, payload)))
    }
}

pub fn frame_message(frame: WireFrame) -> Message {
    match frame {
        WireFrame::Text(t) => Message::Text(t.into()),
        WireFrame::Binary(b) => Message::Binary(Bytes::from(b)),
    }
}

/// A durable write the scheduler asks for.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// An accepted micro-batch result and the credits it grants, in one transaction.
    Accepted {
        job: JobId,
        step: u64,
        row: AcceptedRow,
        credits: Vec<Credit>,
    },
    /// A credit for an extra replica of a micro-batch accepted earlier.
    Credit {
        job: JobId,
        step: u64,
        micro: u32,
        credit: Credit,
    },
    Rejection {
        worker: WorkerId,
        refused: bool,
    },
    /// A compensating ledger entry: `credit.flops` taken back from `credit.worker` for micro-batch `micro` of
    /// `step` (a failed audit showed the result it was granted for was wrong).
    Clawback {
        job: JobId,
        step: u64,
        micro: u32,
        credit: Credit,
    },
    Checkpoint {
        job: JobId,
        ckpt: Checkpoint,
        train: MetricRow,
    },
    Status {
        job: JobId,
        status: crate::job::JobStatus,
    },
    Eval {
        job: JobId,
        metric: MetricRow,
    },
}

impl StoreOp {
    /// The job whose durable state this write changes (`None`: a worker's standing only).
    pub fn job(&self) -> Option<JobId> {
        match self {
            Self::Accepted { job, .. }
            | Self::Credit { job, .. }
            | Self::Clawback { job, .. }
            | Self::Checkpoint { job, .. }
            | Self::Status { job, .. }
            | Self::Eval { job, .. } => Some(*job),
            Self::Rejection { .. } => None,
        }
    }

    /// Workers whose cached standing (credits, strikes) this write makes durable.
    pub fn workers(&self) -> Vec<WorkerId> {
        match self {
            Self::Accepted { credits, .. } => credits.iter().map(|c| c.worker).collect(),
            Self::Credit { credit, .. } | Self::Clawback { credit, .. } => vec![credit.worker],
            Self::Rejection { worker, .. } => vec![*worker],
            _ => Vec::new(),
        }
    }
}

/// Why the coordinator recomputes a micro-batch itself (on the CPU, off the lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// Adaptive replication: a trusted worker's unreplicated result, accepted only if the recomputation agrees.
    Spot,
    /// Replicas disagree: the recomputation settles it (never a volunteer tie-breaker, whom a colluder could be).
    Arbitrate,
    /// A random audit of a micro-batch already accepted on replicas alone: a disagreement refuses every worker
    /// that vouched for it and claws back their credits.
    Audit,
}

/// A micro-batch for the coordinator to recompute; the outcome goes to [`super::State::recomputed`].
#[derive(Debug, Clone)]
pub struct Recompute {
    pub kind: CheckKind,
    pub job: JobId,
    pub step: u64,
    pub micro: u32,
    pub spec: ModelSpec,
    pub params: Arc<Vec<f32>>,
    pub x: Vec<f32>,
    pub labels: Vec<u32>,
    /// A `local` lease to replay (H inner steps from `params`) instead of one step.
    pub local: Option<LocalReplay>,
}

/// What the coordinator's replay of a `local` lease needs beyond a recomputation's inputs.
#[derive(Debug, Clone)]
pub struct LocalReplay {
    pub plan: starling_core::local::LeasePlan,
    /// The job's delta encoding: the replay's delta goes through it as a replica's does.
    pub quant: starling_core::protocol::Quant,
}

/// A held-out evaluation to run off the scheduler lock; the outcome goes to [`super::State::evaluated`].
#[derive(Debug, Clone)]
pub struct EvalTask {
    pub job: JobId,
    pub step: u64,
    pub spec: ModelSpec,
    pub params: Arc<Vec<f32>>,
    pub test: Arc<crate::examples::Examples>,
}

/// The outcome of an [`EvalTask`].
pub type Evaluation = EvalOutput;

/// An action carried out once the store operations before it are durable.
#[derive(Debug)]
pub enum Action {
    Send {
        conn: ConnId,
        out: Outbound,
        /// The lease this frame hands out (its `model` or `lease` frame), released if the frame is withheld.
        lease: Option<LeaseId>,
    },
    /// The job's visible state changed: live views (SSE) refresh.
    Notify(JobId),
    Eval(EvalTask),
    Recompute(Recompute),
}

/// An [`Action`] and what it waits for.
#[derive(Debug)]
pub struct Deferred {
    /// How many of the handler's store operations precede this action: it runs only if all of them succeeded.
    pub after: usize,
    /// The job it concerns, so a failed write can halt exactly the jobs whose announcements were withheld.
    pub job: Option<JobId>,
    pub action: Action,
}

/// What a handler wants done: `store` in order, then `later` (each only once the writes before it are durable).
#[derive(Debug, Default)]
pub struct Effects {
    pub store: Vec<StoreOp>,
    pub later: Vec<Deferred>,
    /// The scheduler's halt count when these effects were computed: a job halted since then was reloaded from the
    /// store, so these effects' writes for it describe a state that no longer exists and must not be made.
    pub epoch: u64,
}

impl Effects {
    pub(super) fn persist(&mut self, op: StoreOp) {
        self.store.push(op);
    }

    fn defer(&mut self, job: Option<JobId>, action: Action) {
        self.later.push(Deferred {
            after: self.store.len(),
            job,
            action,
        });
    }

    pub(super) fn send(&mut self, conn: ConnId, job: Option<JobId>, out: Outbound) {
        self.defer(
            job,
            Action::Send {
                conn,
                out,
                lease: None,
            },
        );
    }

    pub(super) fn send_msg(&mut self, conn: ConnId, job: Option<JobId>, msg: &CoordinatorMsg) {
        self.send(conn, job, Outbound::msg(msg, &[]));
    }

    pub(super) fn send_lease(&mut self, conn: ConnId, job: JobId, lease: LeaseId, out: Outbound) {
        self.defer(
            Some(job),
            Action::Send {
                conn,
                out,
                lease: Some(lease),
            },
        );
    }

    pub(super) fn notify(&mut self, job: JobId) {
        self.defer(Some(job), Action::Notify(job));
    }

    pub(super) fn eval(&mut self, task: EvalTask) {
        self.defer(Some(task.job), Action::Eval(task));
    }

    pub(super) fn recompute(&mut self, r: Recompute) {
        self.defer(Some(r.job), Action::Recompute(r));
    }

    /// Appends another handler's effects (their store operations keep their order after ours).
    pub fn extend(&mut self, other: Effects) {
        self.epoch = self.epoch.min(other.epoch);
        let base = self.store.len();
        self.store.extend(other.store);
        self.later.extend(other.later.into_iter().map(|mut d| {
            d.after += base;
            d
        }));
    }

    /// Splits deferred actions by whether the first `durable` store operations (all that succeeded) cover them:
    /// `(to carry out, withheld)`.
    pub fn split(later: Vec<Deferred>, durable: usize) -> (Vec<Action>, Vec<Deferred>) {
        let (go, withheld): (Vec<Deferred>, Vec<Deferred>) =
            later.into_iter().partition(|d| d.after <= durable);
        (go.into_iter().map(|d| d.action).collect(), withheld)
    }

    /// The frames this handler sends, in order (for tests and logs).
    pub fn sends(&self) -> impl Iterator<Item = (ConnId, &Outbound)> {
        self.later.iter().filter_map(|d| match &d.action {
            Action::Send { conn, out, .. } => Some((*conn, out)),
            _ => None,
        })
    }

    pub fn recomputes(&self) -> impl Iterator<Item = &Recompute> {
        self.later.iter().filter_map(|d| match &d.action {
            Action::Recompute(r) => Some(r),
            _ => None,
        })
    }

    pub fn evals(&self) -> impl Iterator<Item = &EvalTask> {
        self.later.iter().filter_map(|d| match &d.action {
            Action::Eval(t) => Some(t),
            _ => None,
        })
    }
}
