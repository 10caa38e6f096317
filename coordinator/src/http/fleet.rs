//! Owners' and operators' views that span every node of a cluster (PostgreSQL): `GET /api/v1/jobs` lists the jobs
//! of every live node, and `GET /metrics/cluster` is every live node's `/metrics` in one text, each series
//! labelled with its `node`. Each node is asked for what it leads (a request carrying the forwarded mark,
//! [`crate::cluster::FORWARDED`], is answered by the node for itself only, so nothing is asked twice or in a
//! loop), with a short timeout: a node that does not answer is left out, and said so in a header
//! (`x-starling-partial: n2,n3`). On SQLite (one node) both answer from this node alone.
//!
//! Why ask the peers rather than read the shared `jobs` table: a job's view is mostly live state only its leader
//! has (step in progress, counters, connected workers, last evaluation), and a listed job must look the same as
//! `GET /api/v1/jobs/{id}`, which forwards to the leader for the same reason. `/metrics` itself stays per node
//! (the workers connected to it and the jobs it leads), so a Prometheus scraping every node counts each series
//! once; `/metrics/cluster` is for one scrape target or a person with `curl`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use prometheus_client::encoding::prometheus_text;

use crate::App;
use crate::cluster::{FORWARDED, Mode, forward};

/// How long a peer may take to answer before it is left out.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read from a peer.
const PEER_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Names the live nodes that did not answer, when an answer leaves them out.
const PARTIAL: &str = "x-starling-partial";

/// Asks node `base` for `path_and_query` with `auth` (the owner's `Authorization`, if any); the body on a 200.
async fn ask(
    base: &str,
    me: &str,
    path_and_query: &str,
    auth: Option<&HeaderValue>,
) -> Result<axum::body::Bytes, String> {
    let mut req = Request::builder().method(Method::GET).uri(path_and_query);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = req.body(Body::empty()).map_err(|e| e.to_string())?;
    let asked = async {
        let resp = forward(base, me, req).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        axum::body::to_bytes(resp.into_body(), PEER_BODY_LIMIT)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(PEER_TIMEOUT, asked)
        .await
        .map_err(|_| format!("no answer within {PEER_TIMEOUT:?}"))?
}

/// Whether this request should be answered for the whole cluster (PostgreSQL, a GET, not asked by another node).
fn cluster_wide(app: &App, req: &Request) -> bool {
    app.cluster.mode == Mode::Shared
        && req.method() == Method::GET
        && !req.headers().contains_key(FORWARDED)
}

/// Layer on `/api/v1/jobs`: on a cluster, this node's list plus each live peer's, merged by job id (ascending).
pub async fn jobs_everywhere(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if !cluster_wide(&app, &req) {
        return next.run(req).await;
    }
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/api/v1/jobs", |p| p.as_str())
        .to_string();
    // Inside the nested router the path has lost its `/api/v1` prefix.
    let path = if path.starts_with("/api/v1") {
        path
    } else {
        format!("/api/v1{path}")
    };
    let local = next.run(req).await;
    if local.status() != StatusCode::OK {
        return local;
    }
    let Ok(body) = axum::body::to_bytes(local.into_body(), PEER_BODY_LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut jobs: std::collections::BTreeMap<u64, serde_json::Value> = Default::default();
    let mut add = |body: &[u8]| -> bool {
        let Ok(serde_json::Value::Array(list)) = serde_json::from_slice(body) else {
            return false;
        };
        for j in list {
            if let Some(id) = j["id"].as_u64() {
                jobs.entry(id).or_insert(j);
            }
        }
        true
    };
    add(&body);
    let mut missing = Vec::new();
    for (id, url) in app.cluster.peers() {
        match ask(&url, &app.cluster.node_id, &path, auth.as_ref()).await {
            Ok(b) if add(&b) => {}
            Ok(_) => missing.push(id),
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "a peer's job list is left out");
                missing.push(id);
            }
        }
    }
    let list: Vec<serde_json::Value> = jobs.into_values().collect();
    let mut resp = axum::Json(list).into_response();
    if !missing.is_empty()
        && let Ok(v) = HeaderValue::from_str(&missing.join(","))
    {
        resp.headers_mut().insert(PARTIAL, v);
    }
    resp
}

/// `GET /metrics/cluster`: every live node's `/metrics` (this one's included), each series labelled `node`.
pub async fn metrics_everywhere(State(app): State<Arc<App>>) -> Response {
    let me = app.cluster.node_id.clone();
    let own = crate::live::prometheus(State(app.clone())).await;
    let Ok(own) = axum::body::to_bytes(own.into_body(), PEER_BODY_LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut texts = vec![(me.clone(), String::from_utf8_lossy(&own).into_owned())];
    let mut missing = Vec::new();
    for (id, url) in app.cluster.peers() {
        match ask(&url, &me, "/metrics", None).await {
            Ok(b) => texts.push((id, String::from_utf8_lossy(&b).into_owned())),
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "a peer's metrics are left out");
                missing.push(id);
            }
        }
    }
    let mut resp = (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        merge(&texts),
    )
        .into_response();
    if !missing.is_empty()
        && let Ok(v) = HeaderValue::from_str(&missing.join(","))
    {
        resp.headers_mut().insert(PARTIAL, v);
    }
    resp
}

/// Several nodes' Prometheus texts (format 0.0.4) as one: each family's `# HELP`/`# TYPE`/`# UNIT` once, then its
/// samples from every node in turn, with a `node` label first.
fn merge(texts: &[(String, String)]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> =
        Default::default();
    for (node, text) in texts {
        let node = node.replace('\\', "\\\\").replace('"', "\\\"");
        let mut family = String::new();
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.split_whitespace().nth(1).unwrap_or_default();
                family = name.to_string();
                let f = families.entry(family.clone()).or_insert_with(|| {
                    order.push(name.to_string());
                    Default::default()
                });
                if !f.0.iter().any(|h| h == line) {
                    f.0.push(line.to_string());
                }
                continue;
            }
            let labelled = match line.find(['{', ' ']) {
                Some(i) if line[i..].starts_with("{}") => {
                    format!("{}{{node=\"{node}\"}}{}", &line[..i], &line[i + 2..])
                }
                Some(i) if line[i..].starts_with('{') => {
                    format!("{}{{node=\"{node}\",{}", &line[..i], &line[i + 1..])
                }
                Some(i) => format!("{}{{node=\"{node}\"}}{}", &line[..i], &line[i..]),
                None => continue,
            };
            let f = families.entry(family.clone()).or_insert_with(|| {
                order.push(family.clone());
                Default::default()
            });
            f.1.push(labelled);
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((heads, samples)) = families.get(&name) {
            for l in heads.iter().chain(samples) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_two_nodes_merge_by_family_with_a_node_label() {
        let a = "# HELP starling_job_step Step\n# TYPE starling_job_step gauge\nstarling_job_step{job=\"1\"} 7\n\
                 # HELP starling_up Up\n# TYPE starling_up gauge\nstarling_up 1\n# EOF\n";
        let b = "# HELP starling_job_step Step\n# TYPE starling_job_step gauge\nstarling_job_step{job=\"2\"} 3\n# EOF\n";
        let merged = merge(&[("n1".into(), a.into()), ("n2".into(), b.into())]);
        assert_eq!(
            merged,
            "# HELP starling_job_step Step\n# TYPE starling_job_step gauge\n\
             starling_job_step{node=\"n1\",job=\"1\"} 7\nstarling_job_step{node=\"n2\",job=\"2\"} 3\n\
             # HELP starling_up Up\n# TYPE starling_up gauge\nstarling_up{node=\"n1\"} 1\n"
        );
    }
}
