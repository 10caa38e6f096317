//! A small HTTP/1.1 client (one request per connection, plain `http://`) for the owner CLI and the tests.
//! The coordinator serves plain HTTP; put TLS in front of it with a reverse proxy.

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A response: status, lower-cased headers and the body (de-chunked).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (a JSON string holding the text when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&self.body).into_owned())
        })
    }

    /// The API's error message, or the status line.
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

/// A coordinator's base URL and, optionally, an owner token.
#[derive(Debug, Clone)]
pub struct Client {
    host: String,
    pub base: String,
    token: Option<String>,
}

impl Client {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let rest = base.strip_prefix("http://").with_context(|| {
            format!(
                "coordinator URL must start with http:// (got {base}); use a TLS proxy for https"
            )
        })?;
        let host = rest.trim_end_matches('/').to_string();
        anyhow::ensure!(
            !host.is_empty() && !host.contains('/'),
            "coordinator URL must be http://HOST:PORT, got {base}"
        );
        Ok(Self {
            base: format!("http://{host}"),
            host,
            token,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.request("GET", path, None, &[]).await
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        self.request("POST", path, Some(content_type), body).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        let mut s = TcpStream::connect(&self.host)
            .await
            .with_context(|| format!("connecting to {}", self.base))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        parse(&buf)
    }
}

fn parse(buf: &[u8]) -> anyhow::Result<Response> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP response (no header end)")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("malformed status line")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let raw = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk header")?;
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&raw[..line_end])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = super::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = super::parse(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
    }
}
