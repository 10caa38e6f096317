//! Live views: the job event stream (SSE) the dashboard subscribes to, and `/metrics` in Prometheus text format.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric as _, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::broadcast::error::RecvError;

use starling_core::protocol::Backend;

use crate::App;
use crate::http::{ApiResult, JobAccess, job_view};
use crate::scheduler::State as Scheduler;

/// Fastest a stream re-sends a job's view, however fast steps are applied.
const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// `GET /api/v1/jobs/{id}/events`: a `job` event with the job's view now and after every change (at most four a
/// second). The owner's token (header or `?token=`) gives the full view; without one, public progress.
pub async fn job_events(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let (id, owned) = (access.id, access.owned);
    let rx = app.events.subscribe();
    let stream = futures_util::stream::unfold(
        (app, rx, None::<Instant>),
        move |(app, mut rx, last)| async move {
            if let Some(last) = last {
                // Wait for a change to this job (or a lag, after which the current view is all that matters).
                loop {
                    match rx.recv().await {
                        Ok(job) if job == id => break,
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return None,
                    }
                }
                let since = last.elapsed();
                if since < MIN_INTERVAL {
                    tokio::time::sleep(MIN_INTERVAL - since).await;
                }
            }
            let view = job_view(&app, id, owned)?;
            let event = Event::default()
                .event("job")
                .json_data(&view)
                .unwrap_or_else(|_| Event::default().comment("unserialisable"));
            Some((Ok(event), (app, rx, Some(Instant::now()))))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /metrics`: Prometheus text exposition (format 0.0.4), written by `prometheus-client`.
///
/// The figures already live in the scheduler (per-job [`crate::scheduler::JobCounters`], the step histogram, the
/// connections), so instead of a second set of counters to keep in step with them, each scrape takes a snapshot
/// under the lock and hands it to the encoder as a collector, after the lock is released.
pub async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let snapshot = Snapshot::take(&app.state());
    let mut registry = Registry::with_prefix("starling");
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    match prometheus_text::encode(&mut out, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], out).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding /metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Metric name (after `starling_`, before `_total`) and help of each scheduler counter. The name is the field's,
/// except where docs/API.md named the metric otherwise. A field missing here is exported all the same, under its
/// own name with a generic help, so a new counter cannot be left out of `/metrics`.
fn describe(field: &str) -> (&str, &'static str) {
    match field {
        "leases_issued" => (field, "Leases handed to workers"),
        "leases_expired" => (field, "Leases that passed their deadline"),
        "speculative_leases" => (field, "Extra replicas leased to cover stragglers"),
        "results_accepted" => (field, "Results accepted by verification"),
        "results_rejected" => (field, "Results rejected (lost verification or invalid)"),
        "results_late" => (field, "Results for expired leases or superseded versions"),
        "results_failed" => (field, "Leases a worker reported it could not compute"),
        "disagreements" => (
            "verification_disagreements",
            "Micro-batches whose replicas disagreed",
        ),
        "micro_batches_abandoned" => (
            field,
            "Micro-batches left without a quorum after the most replicas",
        ),
        "spot_checks" => (
            field,
            "Trusted results recomputed by the coordinator instead of replicated",
        ),
        "spot_check_failures" => (field, "Spot checks that disagreed with the trusted result"),
        "arbitrations" => (
            field,
            "Disagreements settled by the coordinator's own recomputation",
        ),
        "steps_applied" => (field, "Optimizer steps applied"),
        _ => (field, "A scheduler counter (scheduler::JobCounters)"),
    }
}

/// One job's figures in a scrape.
#[derive(Debug)]
struct JobFigures {
    /// The `job` label.
    id: String,
    /// Every counter: field name → value, from the counters' serialisation (so a new field is included).
    counters: Vec<(String, u64)>,
    step: u64,
}

/// What one scrape reports, copied out of the scheduler.
#[derive(Debug)]
struct Snapshot {
    /// Worker connections by backend label.
    connected: [(&'static str, u64); 2],
    jobs: Vec<JobFigures>,
    /// Seconds between applied steps: sum, count and cumulative counts per upper bound.
    step_sum: f64,
    step_count: u64,
    step_buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    fn take(st: &Scheduler) -> Self {
        let (mut gpu, mut cpu) = (0u64, 0u64);
        for c in st.connections() {
            match c.backend {
                Backend::Gpu => gpu += 1,
                Backend::Cpu => cpu += 1,
            }
        }
        let jobs = st
            .jobs()
            .map(|j| {
                let counters = match serde_json::to_value(&j.counters) {
                    Ok(serde_json::Value::Object(fields)) => fields
                        .into_iter()
                        .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
                        .collect(),
                    _ => Vec::new(),
                };
                JobFigures {
                    id: j.id.to_string(),
                    counters,
                    step: j.step,
                }
            })
            .collect();
        let h = st.step_hist();
        Self {
            connected: [("gpu", gpu), ("cpu", cpu)],
            jobs,
            step_sum: h.sum,
            step_count: h.count,
            step_buckets: h
                .bounds
                .iter()
                .copied()
                .zip(h.counts.iter().copied())
                .collect(),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(
            "workers_connected",
            "Worker connections by compute backend",
            None,
            MetricType::Gauge,
        )?;
        for (backend, n) in &self.connected {
            ConstGauge::new(*n as i64).encode(m.encode_family(&[("backend", *backend)])?)?;
        }
        // Every counter field, in the order the first job lists them (all jobs have the same fields).
        let fields: Vec<&str> = self
            .jobs
            .first()
            .map(|j| j.counters.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default();
        for field in &fields {
            let (name, help) = describe(field);
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for job in &self.jobs {
                if let Some((_, v)) = job.counters.iter().find(|(k, _)| k == field) {
                    ConstCounter::new(*v).encode(m.encode_family(&[("job", job.id.as_str())])?)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "job_step",
            "Current step (model version) of each job",
            None,
            MetricType::Gauge,
        )?;
        for job in &self.jobs {
            ConstGauge::new(job.step as i64)
                .encode(m.encode_family(&[("job", job.id.as_str())])?)?;
        }
        // The encoder wants per-bucket counts (it accumulates them); the scheduler keeps them cumulative.
        let per_bucket: Vec<(f64, u64)> = self
            .step_buckets
            .iter()
            .scan(0u64, |below, &(le, cum)| {
                let n = cum.saturating_sub(*below);
                *below = cum;
                Some((le, n))
            })
            .collect();
        let mut m = enc.encode_descriptor(
            "step_duration",
            "Wall time from one applied step to the next",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(self.step_sum, self.step_count, &per_bucket, None)
    }
}
