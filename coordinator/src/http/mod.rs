//! The HTTP side: REST API under `/api/v1` (docs/API.md), the worker WebSocket at `/ws`, and `www/` at `/`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::services::ServeDir;

mod access; // The job routes and the one job-access rule every one of them goes through.
mod datasets; // Owners' dataset uploads and listings.
mod fleet; // The job list and metrics of every node of a cluster.
mod jobs; // Job views, creation and owner control.
mod volunteers; // Workers, the credits leaderboard and each worker's ledger.

pub use access::{JobAccess, JobRoute, job_access};
pub use jobs::{ConnectedWorker, CreateJob, JobView, job_view};
pub use volunteers::{CreditsRow, WorkerView};

use access::job_routes;
use datasets::{list_datasets, upload_dataset};
use jobs::{create_job, list_jobs};
use volunteers::{credits_leaderboard, list_workers, worker_ledger};

use crate::App;

/// Builds the router; `main` and the tests serve it.
pub fn router(app: Arc<App>) -> Router {
    let upload_limit = app.config.max_upload_bytes;
    let api = Router::new()
        .route("/health", get(health))
        .route(
            "/jobs",
            get(list_jobs)
                .post(create_job)
                .layer(axum::middleware::from_fn_with_state(
                    app.clone(),
                    fleet::jobs_everywhere,
                )),
        )
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
        .route("/metrics/cluster", get(fleet::metrics_everywhere))
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

async fn me(auth: Auth) -> ApiResult<Json<serde_json::Value>> {
    let o = auth.required()?;
    Ok(Json(serde_json::json!({"owner": o.id, "name": o.name})))
}

async fn health() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "protocol": starling_core::protocol::PROTOCOL_VERSION}),
    )
}
