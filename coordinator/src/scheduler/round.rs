//! `local` jobs (protocol v2): an outer round is a step whose micro-batches are leases of H inner steps each. This
//! module holds what such a job adds to a [`JobRun`]: the master parameters θ* in f32, the outer Nesterov state,
//! the int8 model broadcasts (a delta from each of the last few versions), the lease message, the result path
//! (decoding the delta, checking the traces) and the outer step.
//!
//! The micro-batch machinery is shared with `sync` jobs: a lease's result is a [`Submission`] whose `grad` is the
//! dequantised delta Δ and whose `trace` holds the H inner losses and correct counts, so replica agreement, the
//! coordinator's replay on a disagreement (`core::local::run_cpu`, off the lock), credits and durability are the
//! ones `settle` already implements for `sync` jobs.
//!
//! Broadcast: workers hold θ_v bit for bit. After an outer step the coordinator has θ*_{v+1}; it sends
//! θ_{v+1} = θ_v + deq(Q(θ*_{v+1} − θ_v)) and keeps θ*, so what quantisation dropped this round is still in
//! θ* − θ_{v+1} and is sent with the next round's delta (error feedback, as DoubleSqueeze). A connection that holds
//! one of the last [`KEPT_DELTAS`] versions gets the chain of deltas from it; any other gets the full model.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;

use starling_core::local::{LeasePlan, LocalOutput};
use starling_core::optim::Nesterov;
use starling_core::protocol::{
    CoordinatorMsg, DatasetEncoding, JobId, LeaseId, Quant, WireFrame, dataset_sha256,
    decode_delta, encode, encode_dataset, encode_delta, encode_token_dataset,
};

use super::State;
use super::effects::{ConnId, Effects};
use super::job_run::JobRun;
use super::settle::Author;
use crate::job::Hyper;

/// Model versions a connection may lag behind and still get deltas instead of the full model.
pub const KEPT_DELTAS: usize = 4;

/// The H inner losses and correct counts of a lease result, compared between replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub losses: Vec<f32>,
    pub correct: Vec<u32>,
}

impl Trace {
    /// Mean inner loss (the round's training loss).
    pub fn mean_loss(&self) -> f32 {
        self.losses.iter().sum::<f32>() / self.losses.len().max(1) as f32
    }
}

impl From<&LocalOutput> for Trace {
    fn from(o: &LocalOutput) -> Self {
        Self {
            losses: o.losses.clone(),
            correct: o.correct.clone(),
        }
    }
}

/// What a `local` job keeps beyond a `sync` job.
#[derive(Debug)]
pub struct LocalRun {
    /// θ*: the outer optimizer's parameters, in f32; the job's `params` are θ_v, what workers hold.
    pub(super) master: Vec<f32>,
    pub(super) outer: Nesterov,
    /// `model_delta` frames of the last versions: `(from, frame)` takes a worker from `from` to `from + 1`.
    deltas: VecDeque<(u64, Bytes)>,
    /// θ_v of the last `hyper.staleness` versions before the current one: a shard carried from round v is
    /// replayed from them (`elastic.rs`). In memory only: carried shards do not survive a restart.
    bases: VecDeque<(u64, Arc<Vec<f32>>)>,
}

/// A checkpoint's optimizer bytes for a `local` job: a tag, then θ* and the outer velocity as f32 LE.
const TAG: &[u8; 8] = b"local\x00v1";

impl LocalRun {
    /// A fresh job: θ* = θ_0.
    pub fn new(hyper: &Hyper, params: &[f32]) -> Self {
        Self {
            master: params.to_vec(),
            outer: Nesterov::new(hyper.outer_lr, hyper.outer_momentum, params.len()),
            deltas: VecDeque::new(),
            bases: VecDeque::new(),
        }
    }

    /// Restores θ* and the velocity from a checkpoint (a fresh state from `params` if the bytes do not fit).
    pub fn from_bytes(hyper: &Hyper, params: &[f32], bytes: &[u8]) -> Self {
        let n = params.len();
        if bytes.len() == TAG.len() + 8 * n && bytes.starts_with(TAG) {
            let floats = starling_core::protocol::f32s(&bytes[TAG.len()..]);
            let (master, u) = floats.split_at(n);
            let mut run = Self::new(hyper, master);
            run.outer.u = u.to_vec();
            return run;
        }
        Self::new(hyper, params)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = TAG.to_vec();
        out.extend_from_slice(&starling_core::protocol::f32_bytes(&self.master));
        out.extend_from_slice(&starling_core::protocol::f32_bytes(&self.outer.u));
        out
    }

    /// Keeps θ_`version` (being replaced by an outer step) for shards of that round still out, `keep` versions.
    pub(super) fn keep_base(&mut self, version: u64, params: Arc<Vec<f32>>, keep: u32) {
        self.bases.push_back((version, params));
        while self.bases.len() > keep as usize {
            self.bases.pop_front();
        }
    }

    /// θ_`version`, if it is kept.
    pub(super) fn base(&self, version: u64) -> Option<Arc<Vec<f32>>> {
        self.bases
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, p)| p.clone())
    }

    /// The frames that bring a connection holding `held` to the job's current version.
    pub(super) fn model_frames(&self, job: &JobRun, held: Option<(JobId, u64)>) -> Vec<Bytes> {
        match held {
            Some((id, v)) if id == job.id && v == job.step => Vec::new(),
            Some((id, v))
                if id == job.id
                    && v < job.step
                    && self.deltas.front().is_some_and(|(from, _)| *from <= v) =>
            {
                self.deltas
                    .iter()
                    .filter(|(from, _)| *from >= v)
                    .map(|(_, f)| f.clone())
                    .collect()
            }
            _ => vec![job.model_frame.clone()],
        }
    }

    /// The `local_lease` message for shard `shard` of the current round.
    pub(super) fn lease_msg(
        &self,
        job: &JobRun,
        lease: LeaseId,
        shard: u32,
        rows: u32,
    ) -> CoordinatorMsg {
        CoordinatorMsg::LocalLease {
            lease,
            job: job.id,
            version: job.step,
            round: job.step,
            shard,
            rows,
            plan: plan(&job.hyper, job.step, shard),
            quant: job.hyper.quant,
            deadline_ms: job.hyper.lease_timeout_ms,
            dataset: job.dataset.as_ref().map(|(sha, _)| sha.clone()),
        }
    }

    /// The outer step over the round's mean verified delta (θ* moves), then the broadcast: returns θ_{v+1} =
    /// θ_v + deq(Q(θ* − θ_v)) and keeps the `model_delta` frame that takes a worker from `version` to it.
    pub(super) fn outer_step(
        &mut self,
        hyper: &Hyper,
        job: JobId,
        version: u64,
        params: &[f32],
        mean_delta: &[f32],
    ) -> Vec<f32> {
        self.outer.step(&mut self.master, mean_delta);
        let mut target: Vec<f32> = self.master.iter().zip(params).map(|(m, p)| m - p).collect();
        if target.iter().any(|v| !v.is_finite()) {
            // Verified deltas are finite, so θ* is; should it ever not be, broadcast no change rather than NaN.
            tracing::error!(%job, version, "master parameters are not finite; the round's broadcast is a zero delta");
            target.iter_mut().for_each(|v| *v = 0.0);
        }
        let bytes = encode_delta(hyper.quant, &target).unwrap_or_default();
        let step = decode_delta(hyper.quant, &bytes, params.len())
            .unwrap_or_else(|_| vec![0.0; params.len()]);
        let next: Vec<f32> = params.iter().zip(&step).map(|(p, d)| p + d).collect();
        let msg = CoordinatorMsg::ModelDelta {
            job,
            from: version,
            version: version + 1,
            quant: hyper.quant,
        };
        let frame = match encode(&msg, &bytes) {
            WireFrame::Binary(b) => Bytes::from(b),
            WireFrame::Text(t) => Bytes::from(t.into_bytes()),
        };
        self.deltas.push_back((version, frame));
        while self.deltas.len() > KEPT_DELTAS {
            self.deltas.pop_front();
        }
        next
    }
}

/// A `local` job's training set as `dataset` frames: the compact one (`palette_deflate` when the features hold at
/// most 256 distinct values, else `deflate`), built on load, and the raw SDS1 one for v2 workers that list no
/// `accept`, built on the first such request.
#[derive(Debug, Clone)]
pub struct DatasetFrames {
    sha256: String,
    compact: (DatasetEncoding, Bytes),
    raw: Option<Bytes>,
}

impl DatasetFrames {
    /// The frames of `train` for job `job`, named by the SHA-256 of its SDS1 bytes.
    pub fn new(job: JobId, train: &starling_core::data::Dataset) -> Self {
        let sha256 = dataset_sha256(train);
        let (encoding, payload) = encode_dataset(
            train,
            &[
                DatasetEncoding::PaletteDeflate.as_str().into(),
                DatasetEncoding::Deflate.as_str().into(),
            ],
        );
        let compact = (encoding, Self::frame(job, &sha256, encoding, &payload));
        Self {
            sha256,
            compact,
            raw: None,
        }
    }

    fn frame(job: JobId, sha256: &str, encoding: DatasetEncoding, payload: &[u8]) -> Bytes {
        let msg = CoordinatorMsg::Dataset {
            job,
            sha256: sha256.to_string(),
            encoding,
        };
        match encode(&msg, payload) {
            WireFrame::Binary(b) => Bytes::from(b),
            WireFrame::Text(t) => Bytes::from(t.into_bytes()),
        }
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The frame for a worker that decodes `accept` (encoding names): the compact one if it is listed, else the
    /// raw one (built from `train` the first time).
    pub fn for_accept(
        &mut self,
        job: JobId,
        train: &starling_core::data::Dataset,
        accept: &[String],
    ) -> Bytes {
        let (encoding, frame) = &self.compact;
        if accept.iter().any(|a| a == encoding.as_str()) {
            return frame.clone();
        }
        let sha256 = &self.sha256;
        self.raw
            .get_or_insert_with(|| {
                Self::frame(
                    job,
                    sha256,
                    DatasetEncoding::Raw,
                    &starling_core::data::encode_raw(train),
                )
            })
            .clone()
    }
}

/// A training set's `dataset` frames and its SHA-256 (lower-case hex) over the SDS1 bytes, which names it in every
/// encoding. Built once per job load (the demo's 8,000 MNIST rows: ~25 MB raw, ~1.5 MB compact).
pub fn dataset_frame(job: JobId, train: &starling_core::data::Dataset) -> (String, DatasetFrames) {
    let frames = DatasetFrames::new(job, train);
    (frames.sha256().to_string(), frames)
}

/// A language model's training stream as its one `dataset` frame (`stk1_deflate`, named by the SHA-256 of the
/// stream's STK1 bytes); `None`, logged, if the stream cannot be encoded (a local lease then carries its windows'
/// ids and labels instead).
pub fn token_dataset_frame(
    job: JobId,
    train: &crate::examples::Examples,
) -> Option<(String, DatasetFrames)> {
    let stk1 = train
        .encode()
        .map_err(|e| tracing::error!(%job, error = %e, "cannot encode the token stream"))
        .ok()?;
    let (sha256, payload) = encode_token_dataset(&stk1);
    let encoding = DatasetEncoding::Stk1Deflate;
    let frame = DatasetFrames::frame(job, &sha256, encoding, &payload);
    let frames = DatasetFrames {
        sha256: sha256.clone(),
        compact: (encoding, frame),
        raw: None,
    };
    Some((sha256, frames))
}

/// The plan of shard `shard` of round `round`: every replica of the shard gets the same seed.
pub fn plan(hyper: &Hyper, round: u64, shard: u32) -> LeasePlan {
    let mut rng = starling_core::rng::SplitMix64::new(
        hyper.seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((shard as u64) << 40),
    );
    LeasePlan {
        h: hyper.h,
        inner_batch: hyper.inner_batch,
        seed: rng.next_u64(),
        optimizer: hyper.inner_optimizer,
    }
}

/// Whether two traces agree: every inner loss within `tolerance` relatively (absolute floor `tolerance · 1e-3`)
/// and every correct count within one row, with the same number of steps.
pub fn traces_agree(a: &Trace, b: &Trace, tolerance: f32) -> bool {
    let tol = tolerance as f64;
    a.losses.len() == b.losses.len()
        && a.correct.len() == b.correct.len()
        && a.losses
            .iter()
            .zip(&b.losses)
            .all(|(x, y)| ((x - y).abs() as f64) <= tol * (x.abs().max(y.abs()) as f64).max(1e-3))
        && a.correct
            .iter()
            .zip(&b.correct)
            .all(|(x, y)| x.abs_diff(*y) <= 1)
}

impl State {
    /// A v2 worker asks for a job's training set: it gets the `dataset` frame if `sha256` names it (anything else
    /// is ignored: the worker will fail its lease and get the next one).
    pub fn dataset_request(
        &mut self,
        conn: ConnId,
        job_id: JobId,
        sha256: &str,
        accept: &[String],
    ) -> Effects {
        let mut fx = self.effects();
        let v2 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.protocol >= starling_core::protocol::PROTOCOL_V2);
        if let Some(job) = self.jobs.get_mut(&job_id)
            && v2
            && let Some((sha, frames)) = &mut job.dataset
            && sha.eq_ignore_ascii_case(sha256)
        {
            let frame = match &*job.train {
                crate::examples::Examples::Rows(train) => {
                    Some(frames.for_accept(job_id, train, accept))
                }
                // A token stream has one encoding; a worker that cannot decode it gets no frame (and fails the
                // lease when its deadline passes).
                crate::examples::Examples::Tokens { .. } => {
                    let (encoding, frame) = &frames.compact;
                    accept
                        .iter()
                        .any(|a| a == encoding.as_str())
                        .then(|| frame.clone())
                }
            };
            if let Some(frame) = frame {
                fx.send(
                    conn,
                    Some(job_id),
                    super::effects::Outbound::Frame(axum::extract::ws::Message::Binary(frame)),
                );
            }
        }
        fx
    }

    /// A `local_result` arrived for `lease_id` on `conn`: the delta is decoded and checked (length, finiteness,
    /// one loss and count per inner step) and then settled like any result, its trace compared with the
    /// replicas'.
    #[allow(clippy::too_many_arguments)] // The message's fields, as `result` takes them.
    pub fn local_result(
        &mut self,
        conn: ConnId,
        lease_id: LeaseId,
        losses: Vec<f32>,
        correct: Vec<u32>,
        quant: Quant,
        payload: &[u8],
    ) -> Effects {
        let mut fx = self.effects();
        if let Some(claim) = self.claim(conn, lease_id, &mut fx) {
            let author = Author {
                worker: claim.worker,
                conn: claim.conn,
                lease: claim.lease,
            };
            match self.check_local(claim.job, &losses, &correct, quant, payload) {
                Ok(delta) => {
                    let trace = Trace { losses, correct };
                    let (loss, count) = (trace.mean_loss(), trace.correct.iter().sum::<u32>());
                    self.submit_with(claim, loss, count, delta, Some(Arc::new(trace)), &mut fx);
                }
                Err(why) => self.reject(claim.job, author, &why, &mut fx),
            }
        }
        self.assign_all(&mut fx);
        fx
    }

    /// Decodes and checks a local result against its job's plan.
    fn check_local(
        &self,
        job_id: JobId,
        losses: &[f32],
        correct: &[u32],
        quant: Quant,
        payload: &[u8],
    ) -> Result<Vec<f32>, String> {
        let job = self.jobs.get(&job_id).ok_or("no such job")?;
        if job.local.is_none() {
            return Err("a local result for a job that is not in local mode".into());
        }
        let h = job.hyper.h as usize;
        if quant != job.hyper.quant {
            return Err(format!(
                "delta is {}, the lease asked for {}",
                quant.as_str(),
                job.hyper.quant.as_str()
            ));
        }
        if losses.len() != h || correct.len() != h {
            return Err(format!(
                "{} losses and {} correct counts for a lease of {h} inner steps",
                losses.len(),
                correct.len()
            ));
        }
        if let Some(l) = losses.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
            return Err(format!(
                "inner loss {l} is not a finite non-negative number"
            ));
        }
        // A language model counts correct positions: T per row.
        let positions = job.hyper.inner_batch as usize * job.spec.labels_per_row();
        if let Some(c) = correct.iter().find(|c| **c as usize > positions) {
            return Err(format!(
                "correct count {c} exceeds the {positions} predictions of an inner step"
            ));
        }
        decode_delta(quant, payload, job.spec.param_count()).map_err(|e| e.to_string())
    }
}
