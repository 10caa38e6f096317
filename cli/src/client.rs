//! The coordinator's HTTP API as the owner CLI uses it: blocking requests over plain `http://` with `ureq`.
//!
//! Why `ureq` rather than `reqwest`: the CLI makes a handful of sequential requests, so it needs no async stack, and
//! it speaks plain http (a TLS proxy fronts a public coordinator), so it needs no TLS stack either. Without default
//! features `ureq` brings 16 crates (`cargo tree -e normal`, deduplicated); `reqwest` 0.12 with `rustls-tls` brings
//! 93, among them hyper, tokio, rustls and ring, whose C and assembly are compiled with `cc`. Measured cold, each
//! alone in a scratch crate (`cargo build`, dev profile, `-j 2` on our shared 2-core machine): 21 s for ureq, 83 s
//! for reqwest. In this workspace reqwest would share tokio and hyper with axum, but rustls and ring remain, for
//! nothing the CLI uses.

use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;

/// Largest JSON answer read into memory; weights are streamed instead (see [`Client::download`]).
const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (a JSON string holding the text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
        })
    }

    /// The API's error message (docs/API.md: `{"error": {"code", "message"}}`), or the status.
    pub fn error_message(&self) -> String {
        let j = self.json();
        match j["error"]["message"].as_str() {
            Some(m) => format!(
                "HTTP {} ({}): {m}",
                self.status,
                j["error"]["code"].as_str().unwrap_or("?")
            ),
            None => format!("HTTP {}", self.status),
        }
    }
}

/// A coordinator's base URL and, optionally, an owner token sent as `Authorization: Bearer`.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    /// `http://HOST:PORT`, without a trailing slash.
    pub base: String,
    token: Option<String>,
}

impl Client {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let rest = base.strip_prefix("http://").with_context(|| {
            format!(
                "coordinator URL must start with http:// (got {base}); put a TLS proxy in front for https"
            )
        })?;
        let host = rest.trim_end_matches('/');
        anyhow::ensure!(
            !host.is_empty() && !host.contains('/'),
            "coordinator URL must be http://HOST:PORT, got {base}"
        );
        let agent = ureq::Agent::config_builder()
            // API errors are answers with a JSON body the CLI reports, not transport errors.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        Ok(Self {
            agent,
            base: format!("http://{host}"),
            token,
        })
    }

    /// `GET path` (path and query, starting with `/`).
    pub fn get(&self, path: &str) -> anyhow::Result<Reply> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req
            .call()
            .with_context(|| format!("GET {}{path}", self.base))?;
        read(resp)
    }

    /// `POST path` with a body of the given content type.
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<Reply> {
        self.post_with_query(path, &[], content_type, body)
    }

    /// `POST path?query` (ureq percent-encodes the pairs) with a body of the given content type.
    pub fn post_with_query(
        &self,
        path: &str,
        query: &[(&str, String)],
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<Reply> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        for (k, v) in query {
            req = req.query(*k, v);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req
            .send(body)
            .with_context(|| format!("POST {}{path}", self.base))?;
        read(resp)
    }

    /// `GET path`, streaming a 200 answer's body into `out` (weights can be far larger than any JSON answer).
    /// Returns the bytes written, or the error answer.
    pub fn download(&self, path: &str, out: &mut impl Write) -> anyhow::Result<Result<u64, Reply>> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req
            .call()
            .with_context(|| format!("GET {}{path}", self.base))?;
        if resp.status() != 200 {
            return Ok(Err(read(resp)?));
        }
        let n = std::io::copy(&mut resp.body_mut().as_reader(), out)
            .with_context(|| format!("reading {}{path}", self.base))?;
        Ok(Ok(n))
    }
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<Reply> {
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_REPLY_BYTES)
        .read_to_vec()
        .context("reading the answer")?;
    Ok(Reply { status, body })
}
