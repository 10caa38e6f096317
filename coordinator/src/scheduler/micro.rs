//! One micro-batch of one step: its rows, the replicas leased and submitted, and where it is in its lifecycle.
//!
//! ```text
//!             ┌─────────── result (replicas agree: quorum) ──────────────┐
//!             │                                                           ▼
//!  Open{wanted} ── wanted replicas in, no quorum ──► Checking ── reference ──► Accepted
//!     ▲   │                (model small enough)          │  (a replica or near misses agree with it)
//!     │   │ solo (adaptive) first result ───────────────►│
//!     │   └─ no quorum, model too large: wanted += 1     │
//!     │      (tie-breaker) ... wanted = MAX ─► Abandoned │
//!     └──────────── no replica agrees with the reference ┘  (or the recomputation could not run)
//! ```
//!
//! `Open`: leases may be issued while `active + subs < wanted` (one more as a speculative replica of a straggler).
//! `Checking`: the coordinator is recomputing the micro-batch; no new leases; results still arriving from active
//! leases join `subs` and are judged against the reference too. `Accepted` and `Abandoned` are final for the step:
//! a later replica of an accepted micro-batch is compared with the accepted result (credited if it agrees); one
//! of an abandoned micro-batch is late. In audited mode an accepted micro-batch may carry a pending audit
//! (`Micro::audit`): the step waits for it, and a failed one replaces the outcome with the coordinator's (or, for a
//! refused worker's other results, reopens the micro-batch: `audit::strike_out`). Transitions: [`Micro::check`], [`Micro::reopen`], [`Micro::accept`],
//! [`Micro::abandon`].

use std::net::IpAddr;
use std::sync::Arc;

use starling_core::protocol::{LeaseId, WorkerId};

use super::effects::{CheckKind, ConnId};
use super::round::Trace;

/// A validated result waiting for its micro-batch to settle.
#[derive(Debug)]
pub(super) struct Submission {
    pub worker: WorkerId,
    pub conn: ConnId,
    pub lease: LeaseId,
    pub loss: f32,
    pub correct: u32,
    pub grad: Vec<f32>,
    /// A `local` lease's inner losses and correct counts (`None` for `sync` results).
    pub trace: Option<Arc<Trace>>,
}

/// How verification sees a result: a `local` result's correct counts are compared step by step in its trace
/// (`round::traces_agree`), so its summed count does not take part in the one-row rule.
pub(super) fn candidate<'a>(
    loss: f32,
    correct: u32,
    grad: &'a [f32],
    trace: Option<&Trace>,
) -> crate::verify::Candidate<'a> {
    crate::verify::Candidate {
        loss,
        correct: if trace.is_some() { 0 } else { correct },
        grad,
    }
}

impl Submission {
    pub fn candidate(&self) -> crate::verify::Candidate<'_> {
        candidate(self.loss, self.correct, &self.grad, self.trace.as_deref())
    }
}

impl Outcome {
    pub fn candidate(&self) -> crate::verify::Candidate<'_> {
        candidate(self.loss, self.correct, &self.grad, self.trace.as_deref())
    }
}

/// The result a micro-batch contributes to its step.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub loss: f32,
    pub correct: u32,
    pub grad: Arc<Vec<f32>>,
    /// Independent computations that agreed on it (the coordinator's recomputation counts as one).
    pub agreeing: u32,
    /// The coordinator's own recomputation agreed with it (not only replicas, which colluders can be): a later
    /// replica that disagrees with it may be struck.
    pub verified: bool,
    /// A `local` result's trace (of the first agreeing replica, or the coordinator's replay); `None` for `sync`
    /// results and for results reloaded after a restart (the trace is not stored; the delta still is).
    pub trace: Option<Arc<Trace>>,
}

#[derive(Debug)]
pub(super) enum Phase {
    Open {
        /// Replicas wanted now: R, plus one per tie-breaker; 1 for a trusted worker's solo lease.
        wanted: u32,
        /// Leased to one trusted worker only (adaptive replication): its result goes to a spot check.
        solo: bool,
    },
    Checking {
        kind: CheckKind,
        /// Replicas wanted if the recomputation cannot run and the micro-batch goes back to replication.
        fallback: u32,
    },
    Accepted(Outcome),
    /// No quorum within `MAX_REPLICAS` (models too large to recompute): the step goes on without it.
    Abandoned,
}

#[derive(Debug)]
pub(super) struct Micro {
    pub rows: Vec<u32>,
    pub phase: Phase,
    /// Outstanding leases of this micro-batch.
    pub active: Vec<LeaseId>,
    /// Validated results not yet settled.
    pub subs: Vec<Submission>,
    /// Workers (and their addresses) leased this micro-batch in this step, except those whose lease was lost
    /// without a result (`State::lose_lease`): none holds or submits it twice.
    pub involved: Vec<(WorkerId, IpAddr)>,
    /// Credits granted for the accepted result (its vouchers), clawed back if an audit shows it wrong.
    pub vouchers: Vec<crate::store::Credit>,
    /// Audited mode: the accepted result is being audited, and the step waits for the verdict.
    pub audit: Option<super::audit::PendingAudit>,
    /// A `local` shard carried over from an earlier round (`scheduler::elastic`): that round and the shard's index
    /// in it, which name its plan and its base version. No new leases are issued for it. `None`: a shard of the
    /// current round, named by its index.
    pub origin: Option<(u64, u32)>,
}

impl Micro {
    pub fn new(rows: Vec<u32>, wanted: u32) -> Self {
        Self {
            rows,
            phase: Phase::Open {
                wanted,
                solo: false,
            },
            active: Vec::new(),
            subs: Vec::new(),
            involved: Vec::new(),
            vouchers: Vec::new(),
            audit: None,
            origin: None,
        }
    }

    /// Replicas leased or submitted so far.
    pub fn replicas(&self) -> u32 {
        (self.active.len() + self.subs.len()) as u32
    }

    /// Whether the step still waits for this micro-batch (its accepted result may still be under audit).
    pub fn unsettled(&self) -> bool {
        matches!(self.phase, Phase::Open { .. } | Phase::Checking { .. }) || self.audit.is_some()
    }

    /// Replicas wanted while open (`None` once it is being checked or is settled).
    pub fn wanted(&self) -> Option<u32> {
        match self.phase {
            Phase::Open { wanted, .. } => Some(wanted),
            _ => None,
        }
    }

    /// Open → Checking: the coordinator recomputes it.
    pub fn check(&mut self, kind: CheckKind, fallback: u32) {
        debug_assert!(matches!(self.phase, Phase::Open { .. }));
        self.phase = Phase::Checking { kind, fallback };
    }

    /// Checking/Open → Open with `wanted` replicas (a failed check, or a tie-breaker).
    pub fn reopen(&mut self, wanted: u32) {
        debug_assert!(self.unsettled());
        self.phase = Phase::Open {
            wanted,
            solo: false,
        };
    }

    /// Open/Checking → Accepted.
    pub fn accept(&mut self, outcome: Outcome) {
        debug_assert!(self.unsettled());
        self.subs.clear();
        self.phase = Phase::Accepted(outcome);
    }

    /// Open → Abandoned.
    pub fn abandon(&mut self) {
        debug_assert!(matches!(self.phase, Phase::Open { .. }));
        self.subs.clear();
        self.phase = Phase::Abandoned;
    }
}
