//! Datasets: an owner's uploads (safetensors, raw, or `STK1` token streams for language models) and the listing
//! of their own.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use starling_core::data::parse_upload;

use super::{ApiError, ApiResult, Auth};
use crate::App;
use crate::examples::Examples;

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
    /// Rows held out for evaluation when the upload has no test tensors (default: 20%); for a token upload whose
    /// header holds out nothing, the share of tokens at the end held out (default: 10%).
    test_fraction: Option<f32>,
}

pub(super) async fn upload_dataset(
    State(app): State<Arc<App>>,
    auth: Auth,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let owner = auth.required()?.id;
    if starling_core::tokens::is_token_upload(&body) {
        return upload_tokens(&app, owner, q, &body).await;
    }
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
    let name = upload_name(q.name);
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

fn upload_name(name: Option<String>) -> String {
    name.unwrap_or_else(|| "upload".into())
        .chars()
        .take(100)
        .collect()
}

/// An `STK1` token stream (docs/API.md, "Token datasets"): split by position into a training and a held-out
/// stream, each stored as `STK1`; a row of a job on it is a window of the context length.
async fn upload_tokens(
    app: &App,
    owner: i64,
    q: UploadQuery,
    body: &[u8],
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let bad = |e: starling_core::tokens::TokenError| ApiError::bad("bad_dataset", e.to_string());
    let ds = starling_core::tokens::parse_tokens(body).map_err(bad)?;
    let (train, test) = ds.split(q.test_fraction.unwrap_or(0.1)).map_err(bad)?;
    let side = |stream| Examples::Tokens {
        stream,
        vocab_size: ds.vocab_size,
        vocab: ds.vocab.clone(),
    };
    let (train, test) = (side(train), side(test));
    let name = upload_name(q.name);
    let id = app
        .store
        .insert_examples(&name, &train, &test, Some(owner))
        .await?;
    let tokens = |e: &Examples| match e {
        Examples::Tokens { stream, .. } => stream.tokens.len(),
        Examples::Rows(_) => 0,
    };
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": id,
            "name": name,
            "kind": "tokens",
            "dim": ds.context,
            "context": ds.context,
            "vocab_size": ds.vocab_size,
            "has_vocab": ds.vocab.is_some(),
            "train_tokens": tokens(&train),
            "test_tokens": tokens(&test),
            "train_rows": train.rows(),
            "test_rows": test.rows(),
            "classes": ds.vocab_size,
        })),
    ))
}
