//! Checkpoint export: a job's weights as safetensors, two tensors per layer with parameters, spec in the metadata.
//!
//! For spec layer `i` (its index in the spec's `layers`, counting parameter-free layers too): dense —
//! `layers.{i}.weight` `[in, out]` (so `y = x @ weight + bias`, as in the model: the transpose of PyTorch's
//! `nn.Linear.weight`) and `layers.{i}.bias` `[out]`; conv2d — `layers.{i}.weight` `[out_c, in_c, k, k]` (PyTorch's
//! `nn.Conv2d.weight` layout) and `layers.{i}.bias` `[out_c]`; layer_norm and group_norm — `layers.{i}.weight` (γ)
//! and `layers.{i}.bias` (β), `[features]` or `[channels]`. A v1 dense spec keeps its v1 names. Metadata:
//! `starling.spec` (the model spec JSON), `starling.step`, `starling.job`, `starling.test_accuracy` (when the held-out
//! set was evaluated at that step), `starling.layout` and, for a language model whose token dataset has one,
//! `starling.vocab` (a JSON array of the vocabulary's strings, entry `i` the text of id `i`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use starling_core::ModelSpec;
use starling_core::data::{TensorData, encode_safetensors};
use starling_core::protocol::JobId;
use starling_core::spec::Op;
use starling_core::transformer::graph;

use crate::App;
use crate::http::{ApiError, ApiResult, JobAccess};

#[derive(Debug, Deserialize)]
pub struct Which {
    /// `latest` (default) or `best` (the best evaluated version so far: a language model's lowest held-out loss,
    /// a classifier's highest held-out accuracy).
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
    vocab: Option<&[String]>,
) -> Result<Vec<u8>, starling_core::data::DataError> {
    let plans = spec.plan();
    let names: Vec<(String, String)> = (0..plans.len())
        .map(|i| (format!("layers.{i}.weight"), format!("layers.{i}.bias")))
        .collect();
    // Transformer layers (issue 13) name several tensors each: `layers.{i}.{suffix}`, suffixes from core.
    let named: Vec<(String, Vec<usize>, usize)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, graph::op_tensors(&p.op)?)))
        .flat_map(|(i, list)| {
            list.into_iter()
                .map(move |(suffix, shape, off)| (format!("layers.{i}.{suffix}"), shape, off))
        })
        .collect();
    let mut tensors = Vec::new();
    for (name, shape, off) in &named {
        let len: usize = shape.iter().product();
        tensors.push((
            name.as_str(),
            shape.clone(),
            TensorData::F32(&params[*off..*off + len]),
        ));
    }
    for (p, (w, b)) in plans.iter().zip(&names) {
        // (weight offset, weight shape, bias offset, bias length) of the layers that have parameters.
        let (wo, wshape, bo, blen) = match p.op {
            Op::Dense(l) => (l.weight, vec![l.inputs, l.outputs], l.bias, l.outputs),
            Op::Conv2d { dims, weight, bias } => (
                weight,
                vec![dims.out_c, dims.in_c, dims.kernel, dims.kernel],
                bias,
                dims.out_c,
            ),
            Op::LayerNorm {
                dim, gamma, beta, ..
            } => (gamma, vec![dim], beta, dim),
            Op::GroupNorm {
                dims, gamma, beta, ..
            } => (gamma, vec![dims.channels], beta, dims.channels),
            Op::MaxPool2d(_) | Op::AvgPool2d(_) | Op::Flatten | Op::Relu | Op::Gelu => continue,
            Op::Embedding { .. }
            | Op::PositionalEmbedding { .. }
            | Op::TransformerBlock { .. }
            | Op::LmHead { .. } => continue,
        };
        tensors.push((w.as_str(), wshape, TensorData::F32(&params[wo..bo])));
        tensors.push((
            b.as_str(),
            vec![blen],
            TensorData::F32(&params[bo..bo + blen]),
        ));
    }
    let mut meta = BTreeMap::new();
    meta.insert(
        "starling.spec".to_string(),
        serde_json::to_string(spec).unwrap_or_default(),
    );
    meta.insert("starling.step".to_string(), step.to_string());
    meta.insert("starling.job".to_string(), job.to_string());
    meta.insert("starling.layout".to_string(), "layers.{i} is spec layer i; activations NCHW per sample; dense: y = x @ weight + bias, weight [in, out], then the layer's activation; conv2d: weight [out_c, in_c, k, k] (cross-correlation, zero padding), bias [out_c]; norms: weight = gamma, bias = beta; softmax over the last layer".to_string());
    if let Some(a) = accuracy {
        meta.insert("starling.test_accuracy".to_string(), a.to_string());
    }
    if let Some(v) = vocab {
        meta.insert(
            "starling.vocab".to_string(),
            serde_json::to_string(v).unwrap_or_default(),
        );
    }
    encode_safetensors(&tensors, &meta)
}

/// `GET /api/v1/jobs/{id}/checkpoint?which=latest|best` (owner only).
pub async fn download(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
    Query(q): Query<Which>,
) -> ApiResult<Response> {
    let id = access.id;
    let which = q.which.as_deref().unwrap_or("latest");
    let vocab = app
        .state()
        .job(id)
        .and_then(|j| j.vocab().map(<[String]>::to_vec));
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
            let best = app.store.load_best(id).await?.ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no evaluated checkpoint yet",
                )
            })?;
            (spec, best.step, Some(best.accuracy), best.params)
        }
        other => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_request",
                format!("which must be latest or best, not {other:?}"),
            ));
        }
    };
    let body =
        to_safetensors(id, &spec, step, accuracy, &params, vocab.as_deref()).map_err(|e| {
            // The layout comes from the spec, so this is a bug, not the client's fault.
            tracing::error!(job = %id, error = %e, "encoding a checkpoint failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "could not encode the checkpoint",
            )
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use starling_core::transformer::LmSpec;
    use starling_core::transformer::export::from_safetensors;

    /// A language-model job's export is what `starling job sample ID` reads back: the same spec and parameters.
    #[test]
    fn an_lm_export_reads_back_as_an_lm_checkpoint() {
        for tied in [true, false] {
            let lm = LmSpec {
                vocab: 9,
                context: 5,
                width: 8,
                heads: 2,
                layers: 2,
                tied,
            };
            let spec = lm.model_spec();
            let params: Vec<f32> = (0..spec.param_count()).map(|i| i as f32 * 0.5).collect();
            let vocab: Vec<String> = "abcdefghi".chars().map(String::from).collect();
            let bytes =
                to_safetensors(JobId(3), &spec, 7, None, &params, Some(&vocab)).expect("export");
            let ck = from_safetensors(&bytes).expect("an LM checkpoint");
            assert_eq!(ck.vocab.as_ref(), Some(&vocab));
            assert_eq!(ck.spec, lm);
            assert_eq!(
                ck.params, params,
                "tied {tied}: every parameter lands where it came from"
            );
            assert_eq!(ck.step, 7);
        }
        // A classifier's export is not an LM checkpoint, and says so.
        let mlp = ModelSpec::mnist_mlp();
        let bytes = to_safetensors(JobId(1), &mlp, 0, None, &vec![0.0; mlp.param_count()], None)
            .expect("export");
        assert!(from_safetensors(&bytes).is_err());
    }
}
