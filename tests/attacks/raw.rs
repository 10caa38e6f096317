//! Hand-driven protocol peers of the attack suite: each answers its leases in one wrong way (non-finite values, a
//! stale model, a replayed or copied result) and reports what the coordinator answered.

use super::*;

/// How a hand-driven peer answers its leases.
#[derive(Clone)]
pub(super) enum Raw {
    /// Computes honestly, then puts a NaN or an Inf into the gradient.
    NonFinite,
    /// Keeps the first model it is sent and answers every lease at least 3 versions later with a gradient computed
    /// on that stale model (earlier leases are declined with `failed`).
    Stale,
    /// Answers its first lease honestly and every later lease with the bytes it sent for the first.
    Replay,
    /// Computes honestly and publishes each result for its partner (version, micro-batch) → result.
    Publisher(Shared),
    /// Computes honestly but sends a `commit` that is not the hash of the payload it sends.
    BadCommit,
    /// Never computes: sends the partner's result for the same (version, micro-batch) when there is one, otherwise
    /// the partner's latest result for any other micro-batch.
    Copier(Shared),
}

pub(super) type Shared = Arc<Mutex<HashMap<(u64, u32), (f32, u32, Vec<u8>)>>>;

/// What kind of answer a raw peer sent for a lease.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Sent {
    Honest,
    Lie,
    /// An exact copy of another worker's honest result for the same micro-batch and version.
    Copy,
}

#[derive(Debug, Default)]
pub(super) struct RawReport {
    pub(super) sent: HashMap<LeaseId, Sent>,
    pub(super) verdicts: HashMap<LeaseId, Outcome>,
    pub(super) refused: bool,
}

impl RawReport {
    pub(super) fn accepted(&self, kind: Sent) -> usize {
        self.verdicts
            .iter()
            .filter(|(l, o)| **o == Outcome::Accepted && self.sent.get(l) == Some(&kind))
            .count()
    }
    pub(super) fn count(&self, kind: Sent) -> usize {
        self.sent.values().filter(|k| **k == kind).count()
    }
}

/// Runs a raw peer until the coordinator closes it or `report` is read after the job; returns when closed.
pub(super) async fn raw_peer(
    url: String,
    name: &str,
    how: Raw,
    report: Arc<Mutex<RawReport>>,
) -> anyhow::Result<()> {
    let mut c = RawClient::connect(&url).await?;
    let hello = WorkerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        name: Some(name.into()),
        backend: Backend::Cpu,
        adapter: "raw".into(),
        platform: Platform::Native,
    };
    c.send(&hello, &[]).await?;
    c.send(&WorkerMsg::Ready, &[]).await?;
    let mut engine: Option<(ModelSpec, CpuEngine, u64)> = None;
    let mut first_version = None;
    let mut first_result: Option<(f32, u32, Vec<u8>)> = None;
    let mut flips = 0u32;
    while let Some((msg, payload)) = c.recv().await? {
        match msg {
            CoordinatorMsg::Model { version, spec, .. } => {
                if matches!(how, Raw::Stale) && engine.is_some() {
                    continue; // keeps computing on the first model it was sent
                }
                let mut e = CpuEngine::new(spec.clone());
                e.load(&f32s(&payload))?;
                first_version.get_or_insert(version);
                engine = Some((spec, e, version));
            }
            CoordinatorMsg::Lease {
                lease,
                version,
                micro_batch,
                rows,
                ..
            } => {
                let Some((spec, e, _)) = engine.as_mut() else {
                    anyhow::bail!("lease before model")
                };
                let (x, y) = split_lease_payload(&payload, rows as usize, spec.input_len())?;
                let mut honest = || -> anyhow::Result<StepOutput> { Ok(e.step(&x, &y)?) };
                let (answer, kind) = match &how {
                    Raw::NonFinite => {
                        let mut out = honest()?;
                        flips += 1;
                        let i = (flips as usize * 7919) % out.grad.len();
                        out.grad[i] = if flips.is_multiple_of(2) {
                            f32::NAN
                        } else {
                            f32::INFINITY
                        };
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Stale if version < first_version.unwrap_or(0) + 3 => (None, Sent::Honest),
                    Raw::Stale => {
                        let out = honest()?;
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Replay => match &first_result {
                        Some(r) => (Some(r.clone()), Sent::Lie),
                        None => {
                            let out = honest()?;
                            let r = (out.loss, out.correct, f32_bytes(&out.grad));
                            first_result = Some(r.clone());
                            (Some(r), Sent::Honest)
                        }
                    },
                    Raw::BadCommit => {
                        let out = honest()?;
                        (
                            Some((out.loss, out.correct, f32_bytes(&out.grad))),
                            Sent::Lie,
                        )
                    }
                    Raw::Publisher(shared) => {
                        let out = honest()?;
                        let r = (out.loss, out.correct, f32_bytes(&out.grad));
                        shared
                            .lock()
                            .unwrap()
                            .insert((version, micro_batch), r.clone());
                        (Some(r), Sent::Honest)
                    }
                    Raw::Copier(shared) => {
                        // Give the partner a moment, as a colluder with a side channel would.
                        let mut copy = None;
                        for _ in 0..10 {
                            copy = shared.lock().unwrap().get(&(version, micro_batch)).cloned();
                            if copy.is_some() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        match copy {
                            Some(r) => (Some(r), Sent::Copy),
                            None => {
                                let any = shared.lock().unwrap().values().next().cloned();
                                (
                                    Some(any.unwrap_or_else(|| {
                                        (1.0, 0, f32_bytes(&vec![0.0; spec.param_count()]))
                                    })),
                                    Sent::Lie,
                                )
                            }
                        }
                    }
                };
                match answer {
                    Some((loss, correct, bytes)) => {
                        report.lock().unwrap().sent.insert(lease, kind);
                        // The publisher commits to its payload as `Session` does; the others send no commit
                        // (older workers) except the one whose commit is wrong.
                        let commit = match how {
                            Raw::Publisher(_) => Some(sha256_hex(&bytes)),
                            Raw::BadCommit => Some(sha256_hex(&[&bytes[..], b"x"].concat())),
                            _ => None,
                        };
                        c.send(
                            &WorkerMsg::Result {
                                lease,
                                loss,
                                correct,
                                commit,
                            },
                            &bytes,
                        )
                        .await?;
                    }
                    None => {
                        c.send(
                            &WorkerMsg::Failed {
                                lease,
                                reason: "declined".into(),
                            },
                            &[],
                        )
                        .await?
                    }
                }
                c.send(&WorkerMsg::Ready, &[]).await?;
            }
            CoordinatorMsg::Verdict { lease, outcome, .. } => {
                report.lock().unwrap().verdicts.insert(lease, outcome);
            }
            CoordinatorMsg::Error { code, .. } => {
                report.lock().unwrap().refused = code == ErrorCode::Refused;
                break;
            }
            // v2 messages: never sent to this v1 client.
            CoordinatorMsg::Welcome { .. }
            | CoordinatorMsg::Waiting { .. }
            | CoordinatorMsg::ModelDelta { .. }
            | CoordinatorMsg::LocalLease { .. }
            | CoordinatorMsg::Dataset { .. }
            | CoordinatorMsg::Redirect { .. } => {}
        }
    }
    Ok(())
}
