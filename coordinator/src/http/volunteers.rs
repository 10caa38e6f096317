//! Volunteers as the public sees them: workers, the credits leaderboard, and each worker's own ledger.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult};
use crate::App;

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

pub(super) async fn list_workers(State(app): State<Arc<App>>) -> ApiResult<Json<Vec<WorkerView>>> {
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
pub(super) async fn credits_leaderboard(
    State(app): State<Arc<App>>,
) -> ApiResult<Json<serde_json::Value>> {
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
pub(super) struct LedgerQuery {
    token: Option<String>,
    /// Only the newest this many entries (all when absent).
    limit: Option<usize>,
}

/// `GET /credits/{worker}`: a volunteer's own ledger entries; needs that worker's token (`?token=` or the
/// `X-Worker-Token` header), compared by its sha256 like the WebSocket hello.
pub(super) async fn worker_ledger(
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
