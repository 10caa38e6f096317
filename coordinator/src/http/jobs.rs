//! Jobs: the owner's and the public view, listing, creation from an uploaded dataset, and owner control.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use starling_core::ModelSpec;
use starling_core::protocol::JobId;

use super::{ApiError, ApiResult, Auth, JobAccess};
use crate::App;
use crate::examples::Examples;
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
    /// Whether the job trains a language model (token windows; its eval loss is in nats per token, and
    /// `GET /api/v1/jobs/{id}/sample` generates text from it).
    pub language_model: bool,
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
    /// The running verification cost since the coordinator started (`null` before the first accepted unit).
    pub verification: Option<VerificationCost>,
    pub workers: Vec<ConnectedWorker>,
    pub created_ms: i64,
}

/// Verification compute over useful compute, from the job's row counters (docs/API.md, Job status).
#[derive(Debug, Clone, Serialize)]
pub struct VerificationCost {
    /// (rows computed by workers + rows recomputed by the coordinator − rows accepted) / rows accepted.
    pub total: f64,
    /// Rows recomputed by the coordinator / rows accepted.
    pub coordinator: f64,
}

impl VerificationCost {
    pub fn of(c: &JobCounters) -> Option<Self> {
        let useful = c.rows_accepted as f64;
        (c.rows_accepted > 0).then(|| Self {
            total: (c.rows_computed as f64 + c.rows_recomputed as f64 - useful) / useful,
            coordinator: c.rows_recomputed as f64 / useful,
        })
    }
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
        language_model: j.spec.token_vocab().is_some(),
        train_rows: j.train_rows(),
        test_rows: j.test_rows(),
        last_train: j.last_train.clone(),
        last_eval: j.last_eval.clone(),
        best_test_accuracy: j.best_accuracy,
        step_ms: j.step_ms,
        counters: j.counters.clone(),
        last_bad_step: j.last_bad_step,
        verification: VerificationCost::of(&j.counters),
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
    let hyper: Hyper = match req.hyper {
        Some(h) => serde_json::from_value(h)
            .map_err(|e| ApiError::bad("bad_hyper", format!("invalid hyperparameters: {e}")))?,
        None => Hyper::default(),
    };
    if app
        .store
        .dataset_exists(req.dataset, Some(owner))
        .await?
        .is_none()
    {
        return Err(ApiError::bad(
            "unknown_dataset",
            format!("dataset {} does not exist", req.dataset),
        ));
    }
    let (train, test) = app.store.load_examples(req.dataset).await?;
    check_data(&spec, &train, &test)?;
    hyper
        .validate(train.rows())
        .map_err(|e| ApiError::bad("bad_hyper", e))?;
    let spec_json = serde_json::to_string(&spec).unwrap_or_default();
    let hyper_json = serde_json::to_string(&hyper).unwrap_or_default();
    let id = app
        .store
        .insert_job(name, &spec_json, &hyper_json, req.dataset, Some(owner))
        .await?;
    if app.cluster.mode == crate::cluster::Mode::Shared {
        // Several nodes: the job is led by whichever node holds its lock; this one asks first.
        if !crate::cluster::adopt(&app, id).await {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader_yet",
                format!("job {id} was created; another node leads it (ask there, or retry)"),
            ));
        }
        let view = job_view(&app, id, true).ok_or_else(|| ApiError::not_found("job"))?;
        return Ok((StatusCode::CREATED, Json(view)));
    }
    let dataset_frame = match hyper.is_local() {
        true => app.store.train_frame(req.dataset, &train).await?,
        false => None,
    };
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
            dataset_frame,
        });
        st.tick()
    };
    app.apply(fx).await;
    let view = job_view(&app, id, true).ok_or_else(|| ApiError::not_found("job"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Whether a spec can train on a dataset: a classifier on rows whose width and labels it fits, a language model
/// (issue 13) on a token stream of its context and vocabulary.
fn check_data(spec: &ModelSpec, train: &Examples, test: &Examples) -> Result<(), ApiError> {
    let mismatch = |m: String| ApiError::bad("shape_mismatch", m);
    match (spec.token_vocab(), train, test) {
        (None, Examples::Rows(train), Examples::Rows(test)) => {
            if train.dim != spec.input_len() {
                return Err(mismatch(format!(
                    "dataset rows have {} features, the spec's input has {}",
                    train.dim,
                    spec.input_len()
                )));
            }
            let classes = train.classes().max(test.classes());
            if classes > spec.classes() {
                return Err(mismatch(format!(
                    "labels name {classes} classes, the spec's last layer has {}",
                    spec.classes()
                )));
            }
            Ok(())
        }
        (Some(vocab), Examples::Tokens { .. }, _) => {
            let (context, vocab_size) = train.tokens().unwrap_or_default();
            if spec.labels_per_row() != context || spec.input_len() != context {
                return Err(mismatch(format!(
                    "the dataset's context is {context} tokens, the spec's is {}",
                    spec.input_len()
                )));
            }
            if vocab_size as usize > vocab || vocab_size as usize > spec.classes() {
                return Err(mismatch(format!(
                    "the dataset's vocabulary has {vocab_size} ids, the spec's embedding and head take {vocab} and {}",
                    spec.classes()
                )));
            }
            Ok(())
        }
        (Some(_), Examples::Rows(_), _) => Err(mismatch(
            "a language model (its first layer is an embedding) needs a token dataset (STK1 upload)".into(),
        )),
        (None, _, _) => Err(mismatch(
            "a token dataset needs a language model (embedding ... lm_head)".into(),
        )),
    }
}

/// `GET /api/v1/jobs/{id}/sample` query (docs/API.md).
#[derive(Debug, Deserialize)]
pub(super) struct SampleQuery {
    /// Text the sample continues; each character must be an entry of the vocabulary (default: a newline, or
    /// token 0 when the vocabulary has none).
    prompt: Option<String>,
    /// Tokens to generate (1 to [`MAX_SAMPLE_TOKENS`], default 200).
    tokens: Option<usize>,
    /// Softmax temperature, 0 (arg-max) to 10 (default 0.8).
    temperature: Option<f32>,
    /// Seed of the draws (default 1): the same seed and checkpoint give the same text.
    seed: Option<u64>,
    #[allow(dead_code)]
    token: Option<String>,
}

/// Most tokens one sample request generates: each is a forward pass over up to `context` tokens on the CPU.
pub const MAX_SAMPLE_TOKENS: usize = 1000;

/// `GET /api/v1/jobs/{id}/sample` (owner only): text generated on the CPU from a language model's current
/// version, off the scheduler lock and the async threads.
pub(super) async fn sample_job(
    State(app): State<Arc<App>>,
    Extension(access): Extension<JobAccess>,
    Query(q): Query<SampleQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let bad = |code, m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, m);
    let tokens = q.tokens.unwrap_or(200);
    if !(1..=MAX_SAMPLE_TOKENS).contains(&tokens) {
        return Err(bad(
            "bad_request",
            format!("tokens must be 1 to {MAX_SAMPLE_TOKENS}"),
        ));
    }
    let temperature = q.temperature.unwrap_or(0.8);
    if !(0.0..=10.0).contains(&temperature) {
        return Err(bad("bad_request", "temperature must be 0 to 10".into()));
    }
    let seed = q.seed.unwrap_or(1);
    let (spec, step, params, vocab) = {
        let st = app.state();
        let j = st
            .job(access.id)
            .ok_or_else(|| ApiError::not_found("job"))?;
        (
            j.spec.clone(),
            j.step,
            j.params(),
            j.vocab().map(<[String]>::to_vec),
        )
    };
    let lm = starling_core::transformer::LmSpec::from_model_spec(&spec).ok_or_else(|| {
        bad(
            "not_a_language_model",
            "only a language-model job (embedding ... lm_head) can be sampled".into(),
        )
    })?;
    let prompt_text = q.prompt.unwrap_or_else(|| {
        if vocab.is_some() {
            "\n".into()
        } else {
            String::new()
        }
    });
    let prompt = match &vocab {
        Some(v) => prompt_text
            .chars()
            .map(|c| {
                let s = c.to_string();
                v.iter().position(|e| *e == s).map(|i| i as u32).ok_or(c)
            })
            .collect::<Result<Vec<u32>, char>>()
            .map_err(|c| {
                bad(
                    "bad_request",
                    format!("the prompt's character {c:?} is not in the vocabulary"),
                )
            })?,
        None if prompt_text.is_empty() => Vec::new(),
        None => {
            return Err(bad(
                "no_vocabulary",
                "the job's dataset has no vocabulary, so a prompt cannot be encoded".into(),
            ));
        }
    };
    let out = tokio::task::spawn_blocking(move || {
        starling_core::transformer::sample::generate(
            &lm,
            &params,
            &prompt,
            tokens,
            temperature,
            seed,
        )
    })
    .await;
    let out = match out {
        Ok(Ok(out)) => out,
        // The spec and parameters come from the job itself, so a failure is a bug, not the client's fault.
        Ok(Err(e)) => return Err(internal(access.id, &e)),
        Err(e) => return Err(internal(access.id, &e)),
    };
    let text = vocab.as_ref().map(|v| {
        out.iter()
            .filter_map(|&i| v.get(i as usize).map(String::as_str))
            .collect::<String>()
    });
    Ok(Json(serde_json::json!({
        "step": step,
        "prompt": prompt_text,
        "text": text,
        "ids": out,
        "temperature": temperature,
        "seed": seed,
    })))
}

fn internal(job: JobId, e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%job, error = %e, "sampling a language model failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
}
