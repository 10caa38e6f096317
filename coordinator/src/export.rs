//! Checkpoint export: a job's weights as safetensors, one tensor per layer's weight and bias, spec in the metadata.
//!
//! Tensor `layers.{i}.weight` has shape `[in_i, out_i]` (so `y = x @ weight + bias`, as in the model: note this is
//! the transpose of PyTorch's `nn.Linear.weight`), `layers.{i}.bias` has shape `[out_i]`. Metadata:
//! `starling.spec` (the model spec JSON), `starling.step`, `starling.job`, `starling.test_accuracy` (when the held-out
//! set was evaluated at that step) and `starling.layout`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use starling_core::ModelSpec;
use starling_core::data::{TensorData, encode_safetensors};
use starling_core::protocol::JobId;

use crate::App;
use crate::http::{ApiError, ApiResult, Auth, owned_job};

#[derive(Debug, Deserialize)]
pub struct Which {
    /// `latest` (default) or `best` (highest held-out accuracy so far).
    which: Option<String>,
    #[allow(dead_code)]
    token: Option<String>,
}

/// Encodes parameters in the documented safetensors layout.
pub fn to_safetensors(
    job: JobId,
    spec: &ModelSpec,
    step: u64,
    accuracy: Option<f32>,
    params: &[f32],
) -> Vec<u8> {
    let layout = spec.layout();
    let names: Vec<(String, String)> = (0..layout.len())
        .map(|i| (format!("layers.{i}.weight"), format!("layers.{i}.bias")))
        .collect();
    let mut tensors = Vec::new();
    for (l, (w, b)) in layout.iter().zip(&names) {
        tensors.push((
            w.as_str(),
            vec![l.inputs, l.outputs],
            TensorData::F32(&params[l.weight..l.bias]),
        ));
        tensors.push((
            b.as_str(),
            vec![l.outputs],
            TensorData::F32(&params[l.bias..l.bias + l.outputs]),
        ));
    }
    let mut meta = BTreeMap::new();
    meta.insert(
        "starling.spec".to_string(),
        serde_json::to_string(spec).unwrap_or_default(),
    );
    meta.insert("starling.step".to_string(), step.to_string());
    meta.insert("starling.job".to_string(), job.to_string());
    meta.insert("starling.layout".to_string(), "y = x @ weight + bias; weight is [in, out]; relu after every layer whose spec says so; softmax over the last".to_string());
    if let Some(a) = accuracy {
        meta.insert("starling.test_accuracy".to_string(), a.to_string());
    }
    encode_safetensors(&tensors, &meta)
}

/// `GET /api/v1/jobs/{id}/checkpoint?which=latest|best` (owner only).
pub async fn download(
    State(app): State<Arc<App>>,
    auth: Auth,
    Path(id): Path<u64>,
    Query(q): Query<Which>,
) -> ApiResult<Response> {
    let id = JobId(id);
    owned_job(&app, &auth, id)?;
    let which = q.which.as_deref().unwrap_or("latest");
    let (spec, step, accuracy, params) = match which {
        "latest" => {
            let st = app.state();
            let j = st.job(id).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "job not found")
            })?;
            let acc = j
                .last_eval
                .as_ref()
                .filter(|e| e.step == j.step)
                .map(|e| e.accuracy);
            (j.spec.clone(), j.step, acc, j.params().to_vec())
        }
        "best" => {
            let spec = app.state().job(id).map(|j| j.spec.clone()).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "job not found")
            })?;
            let (step, acc, params) = app.store.load_best(id).await?.ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no evaluated checkpoint yet",
                )
            })?;
            (spec, step, Some(acc), params)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_request",
                format!("which must be latest or best, not {other:?}"),
            ));
        }
    };
    let body = to_safetensors(id, &spec, step, accuracy, &params);
    let name = format!("starling-job{id}-{which}-step{step}.safetensors");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}
