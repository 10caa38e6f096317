//! The HTTP side: REST API under `/api/v1` (docs/API.md), the worker WebSocket at `/ws`, and `www/` at `/`.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tower_http::services::ServeDir;

use starling_core::ModelSpec;
use starling_core::data::parse_upload;
use starling_core::protocol::JobId;

use crate::App;
use crate::job::Hyper;
use crate::scheduler::{JobCounters, JobLoad};
use crate::store::MetricRow;

/// Builds the router; `main` and the tests serve it.
pub fn router(app: Arc<App>) -> Router {
    let upload_limit = app.config.max_upload_bytes;
    let api = Router::new()
        .route("/health", get(health))
        .route("/jobs", get(list_jobs).post(create_job))
        .nest("/jobs/{id}", job_routes(app.clone()))
        .route("/me", get(me))
        .route(
            "/datasets",
            get(list_datasets)
                .post(upload_dataset)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/workers", get(list_workers))
        .route("/credits", get(credits_leaderboard))
        .route("/credits/{worker}", get(worker_ledger))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route")
        });
    Router::new()
        .nest("/api/v1", api)
        .route("/ws", get(crate::ws::upgrade))
        .route("/embed.html", get(crate::origin::embed_page))
        .route("/metrics", get(crate::live::prometheus))
        .route(
            "/dashboard",
            get(|| async { axum::response::Redirect::permanent("/dashboard.html") }),
        )
        .fallback_service(ServeDir::new(&app.config.www).precompressed_gzip())
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .with_state(app)
}

/// A JSON error with a stable machine-readable code. Internal details are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 401: the route needs an owner's token and the request carried none.
    fn token_needed() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this needs an owner token: Authorization: Bearer <token>",
        )
    }

    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error while serving a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The owner a request authenticated as, from `Authorization: Bearer <token>` (or `?token=` for EventSource,
/// which cannot set headers). `None` when the request carried no token.
#[derive(Debug, Clone)]
pub struct Auth(pub Option<crate::store::OwnerRow>);

impl Auth {
    /// The owner, or 401 when there is none.
    pub fn required(&self) -> ApiResult<&crate::store::OwnerRow> {
        self.0.as_ref().ok_or_else(ApiError::token_needed)
    }
}

impl axum::extract::FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let query = parts
            .uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        let Some(token) = header.or(query).filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        match app
            .store
            .owner_by_token_hash(&crate::ws::token_hash(token))
            .await?
        {
            Some(owner) => Ok(Self(Some(owner))),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown or revoked token",
            )),
        }
    }
}

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
}

impl JobRoute {
    pub const ALL: [JobRoute; 7] = [
        Self::Status,
        Self::Metrics,
        Self::Events,
        Self::Pause,
        Self::Resume,
        Self::Cancel,
        Self::Checkpoint,
    ];

    /// The HTTP method.
    pub fn method(self) -> &'static str {
        match self {
            Self::Status | Self::Metrics | Self::Events | Self::Checkpoint => "GET",
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
        }
    }
}

/// The routes of one job, every one behind [`job_gate`].
fn job_routes(app: Arc<App>) -> Router<Arc<App>> {
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
async fn job_gate(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(id): Path<String>,
    matched: Option<axum::extract::MatchedPath>,
    mut req: axum::extract::Request,
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
    match job_access(&app, &auth, JobId(id), public) {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn me(auth: Auth) -> ApiResult<Json<serde_json::Value>> {
    let o = auth.required()?;
    Ok(Json(serde_json::json!({"owner": o.id, "name": o.name})))
}

async fn control(
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

async fn pause_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Paused).await
}

async fn resume_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Running).await
}

async fn cancel_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    control(app, access.id, crate::job::JobStatus::Cancelled).await
}

async fn health() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "protocol": starling_core::protocol::PROTOCOL_VERSION}),
    )
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
        workers,
        created_ms: j.created_ms,
    })
}

/// Without a token: every job's public progress (what volunteers see). With one: that owner's jobs, in full.
async fn list_jobs(State(app): State<Arc<App>>, auth: Auth) -> Json<Vec<JobView>> {
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

async fn get_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<JobView>> {
    job_view(&app, access.id, access.owned)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

async fn job_metrics(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
) -> ApiResult<Json<Vec<MetricRow>>> {
    Ok(Json(app.store.metrics(access.id).await?))
}

/// `GET /api/v1/datasets`: the datasets the owner uploaded (ids for `POST /jobs`).
async fn list_datasets(
    State(app): State<Arc<App>>,
    auth: Auth,
) -> ApiResult<Json<Vec<crate::store::DatasetRow>>> {
    let owner = auth.required()?.id;
    Ok(Json(app.store.owner_datasets(owner).await?))
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

async fn create_job(
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
    if dim != spec.input as usize {
        return Err(ApiError::bad(
            "shape_mismatch",
            format!(
                "dataset rows have {dim} features, the spec's input is {}",
                spec.input
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

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: Option<String>,
    /// Accepted (and ignored here) so `?token=` authentication does not trip the query parser.
    #[allow(dead_code)]
    token: Option<String>,
    /// Rows held out for evaluation when the upload has no test tensors (default: 20%).
    test_fraction: Option<f32>,
}

async fn upload_dataset(
    State(app): State<Arc<App>>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let owner = auth.required()?.id;
    let upload = parse_upload(&body).map_err(|e| ApiError::bad("bad_dataset", e.to_string()))?;
    let (train, test) = match upload.test {
        Some(test) => (upload.train, test),
        None => {
            let frac = q.test_fraction.unwrap_or(0.2);
            if !(0.0..0.9).contains(&frac) || frac.is_nan() {
                return Err(ApiError::bad(
                    "bad_request",
                    "test_fraction must be in [0, 0.9)",
                ));
            }
            let held = ((upload.train.rows() as f32 * frac).round() as usize).max(1);
            if held >= upload.train.rows() {
                return Err(ApiError::bad(
                    "bad_dataset",
                    "too few rows to hold out a test split",
                ));
            }
            upload
                .train
                .split(held, starling_core::data::MNIST_SPLIT_SEED)
        }
    };
    let name = q
        .name
        .unwrap_or_else(|| "upload".into())
        .chars()
        .take(100)
        .collect::<String>();
    let id = app
        .store
        .insert_dataset(&name, &train, &test, Some(owner))
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(
            serde_json::json!({"id": id, "name": name, "dim": train.dim, "train_rows": train.rows(), "test_rows": test.rows(), "classes": train.classes().max(test.classes())}),
        ),
    ))
}

/// A worker as `GET /api/v1/workers` lists it (the credits leaderboard).
#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub id: u64,
    pub name: Option<String>,
    /// Credits in GFLOP of verified work.
    pub credits: f64,
    pub accepted: i64,
    pub rejected: i64,
    pub strikes: i64,
    pub refused: bool,
    pub connected: bool,
}

async fn list_workers(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<WorkerView>>> {
    let rows = app.store.workers().await?;
    let st = app.state();
    Ok(Json(
        rows.into_iter()
            .map(|w| WorkerView {
                id: w.id.0,
                name: w.name,
                credits: w.credits_flops as f64 / 1e9,
                accepted: w.accepted,
                rejected: w.rejected,
                strikes: w.strikes,
                refused: w.refused,
                connected: st.connections().any(|c| c.worker == w.id),
            })
            .collect(),
    ))
}

/// One row of the public credits leaderboard.
#[derive(Debug, Serialize)]
pub struct CreditsRow {
    pub id: u64,
    pub name: Option<String>,
    /// GFLOP.
    pub credits: f64,
    pub accepted: i64,
}

/// `GET /credits`: the leaderboard, and the ledger's head hash so volunteers can pin it.
async fn credits_leaderboard(State(app): State<Arc<App>>) -> ApiResult<Json<serde_json::Value>> {
    let rows: Vec<CreditsRow> = app
        .store
        .workers()
        .await?
        .into_iter()
        .map(|w| CreditsRow {
            id: w.id.0,
            name: w.name,
            credits: w.credits_flops as f64 / 1e9,
            accepted: w.accepted,
        })
        .collect();
    let head = app.store.ledger_head().await?;
    Ok(Json(
        serde_json::json!({"workers": rows, "ledger_head": head}),
    ))
}

#[derive(Debug, Deserialize)]
struct LedgerQuery {
    token: Option<String>,
    /// Only the newest this many entries (all when absent).
    limit: Option<usize>,
}

/// `GET /credits/{worker}`: a volunteer's own ledger entries; needs that worker's token (`?token=` or the
/// `X-Worker-Token` header), compared by its sha256 like the WebSocket hello.
async fn worker_ledger(
    State(app): State<Arc<App>>,
    Path(worker): Path<u64>,
    Query(q): Query<LedgerQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let token = headers
        .get("x-worker-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.token);
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "give the worker's token as ?token= or an X-Worker-Token header",
        ));
    };
    match app
        .store
        .worker_by_token_hash(&crate::ws::token_hash(&token))
        .await?
    {
        Some(w) if w.id.0 == worker => {
            let mut entries = app.store.ledger(Some(w.id)).await?;
            let total = entries.len();
            if let Some(limit) = q.limit {
                entries.drain(..total.saturating_sub(limit));
            }
            Ok(Json(serde_json::json!({
                "id": w.id.0, "name": w.name, "credits": w.credits_flops as f64 / 1e9, "accepted": w.accepted,
                "total_entries": total, "entries": entries
            })))
        }
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that token does not belong to this worker",
        )),
    }
}
