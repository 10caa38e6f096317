//! Jobs: the owner's and the public view, listing, creation from an uploaded dataset, and owner control.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use starling_core::ModelSpec;
use starling_core::protocol::JobId;

use super::{ApiError, ApiResult, Auth, JobAccess};
use crate::App;
use crate::job::Hyper;
use crate::scheduler::{JobCounters, JobLoad};
use crate::store::MetricRow;

pub(super) async fn control(
    app: Arc<App>,
    id: JobId,
    want: crate::job::JobStatus,
) -> ApiResult<Json<JobView>> {
    let fx = app
        .state()
        .set_status(id, want)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "conflict", e))?;
    app.apply(fx).await;
    job_view(&app, id, true)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

pub(super) async fn pause_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Paused).await
}

pub(super) async fn resume_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Running).await
}

pub(super) async fn cancel_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Cancelled).await
}

/// A worker connected to the coordinator, as owners see it.
#[derive(Debug, Serialize)]
pub struct ConnectedWorker {
    pub worker: u64,
    pub name: Option<String>,
    pub backend: starling_core::protocol::Backend,
    pub adapter: String,
    pub platform: starling_core::protocol::Platform,
    pub connected_ms: i64,
}

/// A job's status, as `GET /api/v1/jobs/{id}` returns it.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: JobId,
    pub name: String,
    pub status: &'static str,
    /// Why the coordinator paused the job itself (a durable write failed); `null` otherwise.
    pub error: Option<String>,
    pub step: u64,
    pub steps: u64,
    /// Whether the requester owns the job (and so sees `spec`, `hyper` and may control it).
    pub owned: bool,
    /// Whom the job trains for (the owner's name; public).
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<ModelSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hyper: Option<Hyper>,
    pub param_count: usize,
    pub train_rows: usize,
    pub test_rows: usize,
    pub last_train: Option<MetricRow>,
    pub last_eval: Option<MetricRow>,
    pub best_test_accuracy: Option<f32>,
    /// Mean wall time per applied step (exponential moving average).
    pub step_ms: f64,
    pub counters: JobCounters,
    /// The step that included the latest micro-batch a failed audit found wrong (`null` if none).
    pub last_bad_step: Option<u64>,
    pub workers: Vec<ConnectedWorker>,
    pub created_ms: i64,
}

/// A job as its owner (`owned`) or the public (volunteers: progress only) sees it.
pub fn job_view(app: &App, id: JobId, owned: bool) -> Option<JobView> {
    let st = app.state();
    let j = st.job(id)?;
    let workers = st
        .connections()
        .map(|c| ConnectedWorker {
            worker: c.worker.0,
            name: c.name.clone(),
            backend: c.backend,
            adapter: c.adapter.clone(),
            platform: c.platform,
            connected_ms: c.connected_ms,
        })
        .collect();
    Some(JobView {
        id: j.id,
        name: j.name.clone(),
        status: j.status.as_str(),
        error: j.error.clone(),
        step: j.step,
        steps: j.hyper.steps,
        owned,
        owner: j.owner_name.clone(),
        spec: owned.then(|| j.spec.clone()),
        hyper: owned.then(|| j.hyper.clone()),
        param_count: j.spec.param_count(),
        train_rows: j.train_rows(),
        test_rows: j.test_rows(),
        last_train: j.last_train.clone(),
        last_eval: j.last_eval.clone(),
        best_test_accuracy: j.best_accuracy,
        step_ms: j.step_ms,
        counters: j.counters.clone(),
        last_bad_step: j.last_bad_step,
        workers,
        created_ms: j.created_ms,
    })
}

/// Without a token: every job's public progress (what volunteers see). With one: that owner's jobs, in full.
pub(super) async fn list_jobs(State(app): State<Arc<App>>, auth: Auth) -> Json<Vec<JobView>> {
    let me = auth.0.as_ref().map(|o| o.id);
    let ids: Vec<(JobId, bool)> = app
        .state()
        .jobs()
        .filter(|j| me.is_none() || j.owner == me)
        .map(|j| (j.id, me.is_some()))
        .collect();
    Json(
        ids.into_iter()
            .filter_map(|(id, owned)| job_view(&app, id, owned))
            .collect(),
    )
}

pub(super) async fn get_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    job_view(&app, access.id, access.owned)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

pub(super) async fn job_metrics(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<Vec<MetricRow>>> {
    Ok(Json(app.store.metrics(access.id).await?))
}

/// `POST /api/v1/jobs` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    pub name: String,
    pub spec: serde_json::Value,
    /// A dataset id returned by `POST /api/v1/datasets`.
    pub dataset: i64,
    #[serde(default)]
    pub hyper: Option<serde_json::Value>,
}

pub(super) async fn create_job(
    State(app): State<Arc<App>>,
    auth: Auth,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let owner = auth.required()?.id;
    let req: CreateJob = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("bad_request", format!("invalid job request: {e}")))?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::bad(
            "bad_name",
            "name must be 1 to 100 characters",
        ));
    }
    let spec = ModelSpec::from_json(&req.spec.to_string())
        .map_err(|e| ApiError::bad("bad_spec", e.to_string()))?;
    // Issue 13's LM layers run in core (reference and CPU) and in `starling train`, but the job surface (token
    // datasets, per-position labels) does not carry them yet: refuse clearly instead of failing every lease.
    if spec.labels_per_row() != 1 || spec.token_vocab().is_some() {
        return Err(ApiError::bad(
            "bad_spec",
            "language-model layers (embedding, lm_head) cannot be trained through the coordinator yet; \
             use `starling train --model char-lm`",
        ));
    }
    let hyper: Hyper = match req.hyper {
        Some(h) => serde_json::from_value(h)
            .map_err(|e| ApiError::bad("bad_hyper", format!("invalid hyperparameters: {e}")))?,
        None => Hyper::default(),
    };
    let Some((dim, train_rows, _)) = app.store.dataset_exists(req.dataset, Some(owner)).await?
    else {
        return Err(ApiError::bad(
            "unknown_dataset",
            format!("dataset {} does not exist", req.dataset),
        ));
    };
    if dim != spec.input_len() {
        return Err(ApiError::bad(
            "shape_mismatch",
            format!(
                "dataset rows have {dim} features, the spec's input has {}",
                spec.input_len()
            ),
        ));
    }
    hyper
        .validate(train_rows)
        .map_err(|e| ApiError::bad("bad_hyper", e))?;
    let (train, test) = app.store.load_dataset(req.dataset).await?;
    let classes = train.classes().max(test.classes());
    if classes > spec.classes() {
        return Err(ApiError::bad(
            "shape_mismatch",
            format!(
                "labels name {classes} classes, the spec's last layer has {}",
                spec.classes()
            ),
        ));
    }
    let spec_json = serde_json::to_string(&spec).unwrap_or_default();
    let hyper_json = serde_json::to_string(&hyper).unwrap_or_default();
    let id = app
        .store
        .insert_job(name, &spec_json, &hyper_json, req.dataset, Some(owner))
        .await?;
    let fx = {
        let mut st = app.state();
        st.load_job(JobLoad {
            id,
            owner: Some(owner),
            owner_name: auth.0.as_ref().map(|o| o.name.clone()),
            name: name.to_string(),
            spec,
            hyper,
            status: crate::job::JobStatus::Running,
            created_ms: crate::store::now_ms(),
            train,
            test,
            checkpoint: None,
            accepted: Vec::new(),
        });
        st.tick()
    };
    app.apply(fx).await;
    let view = job_view(&app, id, true).ok_or_else(|| ApiError::not_found("job"))?;
    Ok((StatusCode::CREATED, Json(view)))
}
