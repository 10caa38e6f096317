//! Datasets: an owner's uploads (safetensors or raw) and the listing of their own.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use starling_core::data::parse_upload;

use super::{ApiError, ApiResult, Auth};
use crate::App;

/// `GET /api/v1/datasets`: the datasets the owner uploaded (ids for `POST /jobs`).
pub(super) async fn list_datasets(
    State(app): State<Arc<App>>,
    auth: Auth,
) -> ApiResult<Json<Vec<crate::store::DatasetRow>>> {
    let owner = auth.required()?.id;
    Ok(Json(app.store.owner_datasets(owner).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct UploadQuery {
    name: Option<String>,
    /// Accepted (and ignored here) so `?token=` authentication does not trip the query parser.
    #[allow(dead_code)]
    token: Option<String>,
    /// Rows held out for evaluation when the upload has no test tensors (default: 20%).
    test_fraction: Option<f32>,
}

pub(super) async fn upload_dataset(
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
