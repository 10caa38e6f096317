//! Lies against local leases: sign-flipped, scaled, noised (above the tolerance) and zeroed deltas, deltas from a
//! stale base version, skipped inner steps, other rows than the lease's, and a NaN in the frame. None is ever
//! accepted; the honest workers beside them are never rejected and the job trains on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use starling_core::ModelSpec;
use starling_core::protocol::{
    Backend, CoordinatorMsg, Outcome, PROTOCOL_V2, Platform, Quant, WorkerMsg,
};
use starling_tests::*;
use starling_worker::engine::BackendChoice;
use starling_worker::session::LocalLie;

use super::{Lie, each_step, local_hyper, spawn_liar};

fn keep_plan(_: &mut starling_core::local::LeasePlan) {}
fn keep_output(_: &mut starling_core::local::LocalOutput) {}

/// Computes every lease from the first model it ever saw (a worker that never updates). Its leases of that first
/// version are honest, so it counts them: only those may be accepted.
struct Stale(Option<(u64, Vec<f32>)>, Arc<AtomicU64>);

impl LocalLie for Stale {
    fn base(&mut self, version: u64, params: &mut Vec<f32>) {
        match &self.0 {
            Some((v, first)) => {
                if *v == version {
                    self.1.fetch_add(1, Ordering::Relaxed);
                }
                params.clone_from(first)
            }
            None => {
                self.1.fetch_add(1, Ordering::Relaxed);
                self.0 = Some((version, params.clone()));
            }
        }
    }
}

/// A lying worker: its name, a tamper of every inner step, a lie about the whole lease.
type Liar = (&'static str, Option<SendTamper>, Option<Box<dyn LocalLie>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_lies_are_never_accepted() -> anyhow::Result<()> {
    init_tracing();
    let mut hyper = local_hyper(8, 12, Quant::Int8);
    hyper.eval_every = 4;
    let cluster = Cluster::builder("local-lies")
        .hyper(hyper)
        .workers(3)
        .start()
        .await?;
    let url = cluster.server.ws_url();
    let stale_honest = Arc::new(AtomicU64::new(0));
    let liars: Vec<Liar> = vec![
        (
            "flip",
            Some(each_step(|o| o.grad.iter_mut().for_each(|g| *g = -*g))),
            None,
        ),
        (
            "scale",
            None,
            Some(Box::new(Lie {
                plan: keep_plan,
                output: |o| o.delta.iter_mut().for_each(|d| *d *= 10.0),
            })),
        ),
        (
            "noise",
            None,
            Some(Box::new(Lie {
                plan: keep_plan,
                // Noise at ~20% of the delta's RMS on every value: far above the tolerance.
                output: |o| {
                    let rms =
                        (o.delta.iter().map(|d| d * d).sum::<f32>() / o.delta.len() as f32).sqrt();
                    let mut r = starling_core::rng::SplitMix64::new(9);
                    o.delta
                        .iter_mut()
                        .for_each(|d| *d += 0.2 * rms * r.normal() as f32);
                },
            })),
        ),
        (
            "zeros",
            None,
            Some(Box::new(Lie {
                plan: keep_plan,
                output: |o| o.delta.iter_mut().for_each(|d| *d = 0.0),
            })),
        ),
        (
            "skip",
            None,
            Some(Box::new(Lie {
                // Half the inner steps, the trace padded to look complete.
                plan: |p| p.h = (p.h / 2).max(1),
                output: |o| {
                    let (l, c) = (o.losses[o.losses.len() - 1], o.correct[o.correct.len() - 1]);
                    while o.losses.len() < 8 {
                        o.losses.push(l);
                        o.correct.push(c);
                    }
                },
            })),
        ),
        (
            "rows",
            None,
            Some(Box::new(Lie {
                plan: |p| p.seed ^= 1,
                output: keep_output,
            })),
        ),
        (
            "stale",
            None,
            Some(Box::new(Stale(None, stale_honest.clone()))),
        ),
    ];
    let handles: Vec<_> = liars
        .into_iter()
        .map(|(name, tamper, lie)| {
            (
                name,
                spawn_liar(url.clone(), BackendChoice::Cpu, name, tamper, lie),
            )
        })
        .collect();
    let job = cluster
        .server
        .wait_job(1, Duration::from_secs(600), |j| j["status"] == "completed")
        .await?;
    super::assert_rounds_verified(&cluster.server, 1, 2).await?;
    let c = job["counters"].clone();
    println!(
        "accepted {} rejected {} late {} arbitrations {}; best accuracy {}",
        c["results_accepted"],
        c["results_rejected"],
        c["results_late"],
        c["arbitrations"],
        job["best_test_accuracy"]
    );
    let (_, honest) = cluster.finish().await?;
    for (name, h) in handles {
        let r = join(h)?;
        println!("{name}: {:?} closed by {:?}", r.stats, r.closed_by);
        // The stale worker's leases of the one version it holds are honest; only those may be accepted.
        let allowed = if name == "stale" {
            stale_honest.load(Ordering::Relaxed)
        } else {
            0
        };
        assert!(
            r.stats.accepted <= allowed,
            "the {name} lie was accepted: {:?}",
            r.stats
        );
        assert!(
            r.stats.rejected > 0,
            "the {name} liar was never caught: {:?}",
            r.stats
        );
    }
    for r in honest {
        assert_eq!(
            r.stats.rejected, 0,
            "an honest worker was rejected: {:?}",
            r.stats
        );
        assert!(r.stats.accepted > 0, "{:?}", r.stats);
    }
    assert!(c["results_rejected"].as_u64().unwrap_or(0) > 0);
    Ok(())
}

/// Raw v2 frames: the worker names protocol 2 and gets it, a full model then a `local_lease`; a `local_result`
/// whose int8 block scale is NaN, or whose trace is short, is rejected (a strike), not accepted or ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_local_results_are_rejected() -> anyhow::Result<()> {
    init_tracing();
    let cluster = Cluster::builder("local-raw")
        .hyper(local_hyper(4, 3, Quant::Int8))
        .start()
        .await?;
    let mut raw = RawClient::connect(&cluster.server.ws_url()).await?;
    raw.send(
        &WorkerMsg::Hello {
            protocol: PROTOCOL_V2,
            token: None,
            name: Some("raw-v2".into()),
            backend: Backend::Cpu,
            adapter: "test".into(),
            platform: Platform::Native,
        },
        &[],
    )
    .await?;
    let picked = raw
        .recv_until(|m, _| match m {
            CoordinatorMsg::Welcome { protocol, .. } => Some(*protocol),
            _ => None,
        })
        .await?;
    assert_eq!(picked, PROTOCOL_V2);
    let n = ModelSpec::mnist_mlp().param_count();
    for bad in ["nan-scale", "short-trace"] {
        raw.send(&WorkerMsg::Ready, &[]).await?;
        let (lease, h) = raw
            .recv_until(|m, _| match m {
                CoordinatorMsg::LocalLease { lease, plan, .. } => Some((*lease, plan.h)),
                CoordinatorMsg::Lease { .. } => panic!("a local job leases local_lease, not lease"),
                _ => None,
            })
            .await?;
        let mut payload = starling_core::quant::encode(&vec![1e-3f32; n])?;
        let mut losses = vec![1.0f32; h as usize];
        if bad == "nan-scale" {
            payload[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        } else {
            losses.pop();
        }
        raw.send(
            &WorkerMsg::LocalResult {
                lease,
                losses,
                correct: vec![1; h as usize],
                quant: Quant::Int8,
                commit: None,
            },
            &payload,
        )
        .await?;
        let outcome = raw
            .recv_until(|m, _| match m {
                CoordinatorMsg::Verdict {
                    lease: l, outcome, ..
                } if *l == lease => Some(*outcome),
                _ => None,
            })
            .await?;
        assert_eq!(outcome, Outcome::Rejected, "{bad}");
    }
    cluster.finish().await?;
    Ok(())
}
