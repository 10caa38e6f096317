//! Live views: the job event stream (SSE) the dashboard subscribes to, and `/metrics` in Prometheus text format.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use starling_core::protocol::Backend;

use crate::App;
use crate::http::{ApiResult, JobAccess, job_view};

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

/// `GET /metrics`: Prometheus text exposition.
pub async fn prometheus(State(app): State<Arc<App>>) -> impl IntoResponse {
    let st = app.state();
    let mut out = String::new();
    let (mut gpu, mut cpu) = (0u64, 0u64);
    for c in st.connections() {
        match c.backend {
            Backend::Gpu => gpu += 1,
            Backend::Cpu => cpu += 1,
        }
    }
    let _ = writeln!(
        out,
        "# HELP starling_workers_connected Worker connections by compute backend.\n# TYPE starling_workers_connected gauge"
    );
    let _ = writeln!(
        out,
        "starling_workers_connected{{backend=\"gpu\"}} {gpu}\nstarling_workers_connected{{backend=\"cpu\"}} {cpu}"
    );
    type Pick = fn(&crate::scheduler::JobCounters) -> u64;
    let counters: [(&str, &str, Pick); 8] = [
        (
            "starling_leases_issued_total",
            "Leases handed to workers.",
            |c| c.leases_issued,
        ),
        (
            "starling_leases_expired_total",
            "Leases that passed their deadline.",
            |c| c.leases_expired,
        ),
        (
            "starling_results_accepted_total",
            "Results accepted by verification.",
            |c| c.results_accepted,
        ),
        (
            "starling_results_rejected_total",
            "Results rejected (lost verification or invalid).",
            |c| c.results_rejected,
        ),
        (
            "starling_results_late_total",
            "Results for expired leases or superseded versions.",
            |c| c.results_late,
        ),
        (
            "starling_verification_disagreements_total",
            "Micro-batches whose replicas disagreed (a tie-breaker was leased).",
            |c| c.disagreements,
        ),
        (
            "starling_steps_applied_total",
            "Optimizer steps applied.",
            |c| c.steps_applied,
        ),
        (
            "starling_speculative_leases_total",
            "Extra replicas leased to cover stragglers.",
            |c| c.speculative_leases,
        ),
    ];
    for (name, help, pick) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for j in st.jobs() {
            let _ = writeln!(out, "{name}{{job=\"{}\"}} {}", j.id, pick(&j.counters));
        }
    }
    let _ = writeln!(
        out,
        "# HELP starling_job_step Current step (model version) of each job.\n# TYPE starling_job_step gauge"
    );
    for j in st.jobs() {
        let _ = writeln!(out, "starling_job_step{{job=\"{}\"}} {}", j.id, j.step);
    }
    let h = st.step_hist();
    let _ = writeln!(
        out,
        "# HELP starling_step_duration_seconds Wall time from one applied step to the next.\n# TYPE starling_step_duration_seconds histogram"
    );
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(
            out,
            "starling_step_duration_seconds_bucket{{le=\"{b}\"}} {c}"
        );
    }
    let _ = writeln!(
        out,
        "starling_step_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(
        out,
        "starling_step_duration_seconds_sum {}\nstarling_step_duration_seconds_count {}",
        h.sum, h.count
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
}
