//! The routes under `/api/v1/jobs/{id}` and the one job-access rule every one of them goes through.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use starling_core::protocol::JobId;

use super::jobs::{cancel_job, get_job, job_metrics, pause_job, resume_job, sample_job};
use super::{ApiError, ApiResult, Auth};
use crate::App;

/// Every route under `/api/v1/jobs/{id}`: the router is built from this list alone, behind the one access rule
/// ([`job_gate`]), and the conformance test walks the same list, so no job route can skip the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRoute {
    Status,
    Metrics,
    Events,
    Pause,
    Resume,
    Cancel,
    Checkpoint,
    Sample,
}

impl JobRoute {
    pub const ALL: [JobRoute; 8] = [
        Self::Status,
        Self::Metrics,
        Self::Events,
        Self::Pause,
        Self::Resume,
        Self::Cancel,
        Self::Checkpoint,
        Self::Sample,
    ];

    /// The HTTP method.
    pub fn method(self) -> &'static str {
        match self {
            Self::Status | Self::Metrics | Self::Events | Self::Checkpoint | Self::Sample => "GET",
            Self::Pause | Self::Resume | Self::Cancel => "POST",
        }
    }

    /// The path below `/api/v1/jobs/{id}` (`""` for the job itself).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Status => "",
            Self::Metrics => "/metrics",
            Self::Events => "/events",
            Self::Pause => "/pause",
            Self::Resume => "/resume",
            Self::Cancel => "/cancel",
            Self::Checkpoint => "/checkpoint",
            Self::Sample => "/sample",
        }
    }

    /// Whether the route answers without a token (with the public view: what volunteers see). The others answer
    /// 401 without one.
    pub fn public(self) -> bool {
        matches!(self, Self::Status | Self::Metrics | Self::Events)
    }

    fn handler(self) -> axum::routing::MethodRouter<Arc<App>> {
        use axum::routing::post;
        match self {
            Self::Status => get(get_job),
            Self::Metrics => get(job_metrics),
            Self::Events => get(crate::live::job_events),
            Self::Pause => post(pause_job),
            Self::Resume => post(resume_job),
            Self::Cancel => post(cancel_job),
            Self::Checkpoint => get(crate::export::download),
            Self::Sample => get(sample_job),
        }
    }
}

/// The routes of one job, every one behind [`job_gate`].
pub(super) fn job_routes(app: Arc<App>) -> Router<Arc<App>> {
    let mut r = Router::new();
    for route in JobRoute::ALL {
        let path = if route.suffix().is_empty() {
            "/"
        } else {
            route.suffix()
        };
        r = r.route(path, route.handler());
    }
    r.route_layer(axum::middleware::from_fn_with_state(app, job_gate))
}

/// What a request may see of the job it names; [`job_gate`] puts it in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct JobAccess {
    pub id: JobId,
    /// The requester owns the job: the full view and control. Otherwise the public view.
    pub owned: bool,
}

/// The one job-access rule (docs/API.md, "Owners and tokens"):
/// - a token that names no owner: 401 (the [`Auth`] extractor);
/// - an owner's token: the job must be that owner's, otherwise 404 — exactly as for a job that does not exist, so
///   other owners' jobs do not leak;
/// - no token: the public view on a [`JobRoute::public`] route (404 if there is no such job), 401 on any other.
pub fn job_access(app: &App, auth: &Auth, id: JobId, public: bool) -> ApiResult<JobAccess> {
    let job_owner = app.state().job(id).map(|j| j.owner);
    match &auth.0 {
        Some(owner) => match job_owner {
            Some(o) if o == Some(owner.id) => Ok(JobAccess { id, owned: true }),
            _ => Err(ApiError::not_found("job")),
        },
        None if !public => Err(ApiError::token_needed()),
        None => match job_owner {
            Some(_) => Ok(JobAccess { id, owned: false }),
            None => Err(ApiError::not_found("job")),
        },
    }
}

/// Middleware on every job route: applies [`job_access`] and hands the handler a [`JobAccess`].
pub(super) async fn job_gate(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(id): Path<String>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A route missing from `JobRoute::ALL` (it cannot be routed, but fail closed) is treated as owner-only.
    let suffix = matched
        .as_ref()
        .map(|m| {
            m.as_str()
                .trim_start_matches("/api/v1/jobs/{id}")
                .trim_end_matches('/')
        })
        .unwrap_or_default();
    let public = JobRoute::ALL
        .iter()
        .any(|r| r.public() && r.suffix() == suffix && r.method() == req.method().as_str());
    let Ok(id) = id.parse::<u64>() else {
        return ApiError::not_found("job").into_response();
    };
    let mut req = match crate::cluster::elsewhere(&app, JobId(id), req).await {
        Ok(answered) => return answered,
        Err(req) => req,
    };
    match job_access(&app, &auth, JobId(id), public) {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}
