//! Which web origins may host the volunteer widget and open browser worker sockets: the partner allow-list
//! (`--allow-origin`).
//!
//! Two checks, both against the coordinator's own origin plus the list: `/embed.html` (the widget's iframe, which
//! runs the worker) is answered with `Content-Security-Policy: frame-ancestors` so browsers refuse to frame it
//! anywhere else, and the `/ws` upgrade refuses a browser `Origin` that is neither. Native workers send no `Origin`
//! and are always allowed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::App;

/// Normalises and validates one `--allow-origin` value: `scheme://host[:port]`, no path.
pub fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/').to_ascii_lowercase();
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("origin `{s}` must start with http:// or https://"))?;
    let valid = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !valid {
        return Err(format!(
            "origin `{s}` must be scheme://host[:port] without a path"
        ));
    }
    Ok(s)
}

/// Whether a request's `Origin` (if any) may use this coordinator: absent (a native client), the coordinator's own
/// origin (its `Host`), or on the allow-list.
pub fn request_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let is_own = own.is_some_and(|host| {
        origin == format!("http://{host}") || origin == format!("https://{host}")
    });
    is_own || allowed.contains(&origin)
}

/// `GET /embed.html`: the widget's iframe page, framable only by the coordinator itself and the allow-list, with the
/// list written into the page so it can refuse to start under any other parent.
pub async fn embed_page(State(app): State<Arc<App>>) -> Response {
    let path = app.config.www.join("embed.html");
    let html = match tokio::fs::read_to_string(&path).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the embed page");
            return (StatusCode::NOT_FOUND, "no embed page").into_response();
        }
    };
    let allowed = &app.config.allow_origin;
    // The list was validated at start-up (scheme://host[:port]), so it holds no quote or angle bracket; JSON
    // escaping keeps the attribute well-formed regardless.
    let list = serde_json::to_string(allowed)
        .unwrap_or_else(|_| "[]".into())
        .replace('"', "&quot;");
    let html = html.replacen(
        "data-allowed-origins=\"[]\"",
        &format!("data-allowed-origins=\"{list}\""),
        1,
    );
    let mut csp = String::from("frame-ancestors 'self'");
    for origin in allowed {
        csp.push(' ');
        csp.push_str(origin);
    }
    let mut response = html.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        h
    }

    #[test]
    fn origins_are_checked_against_own_host_and_list() {
        let list = vec!["http://partner.example:8000".to_string()];
        assert!(request_allowed(&headers(None, "127.0.0.1:9"), &list));
        assert!(request_allowed(
            &headers(Some("http://127.0.0.1:9"), "127.0.0.1:9"),
            &list
        ));
        assert!(request_allowed(
            &headers(Some("http://partner.example:8000"), "127.0.0.1:9"),
            &list
        ));
        assert!(!request_allowed(
            &headers(Some("http://evil.example"), "127.0.0.1:9"),
            &list
        ));
        assert!(!request_allowed(
            &headers(Some("http://127.0.0.1:10"), "127.0.0.1:9"),
            &list
        ));
    }

    #[test]
    fn allow_origin_values_are_validated() {
        assert_eq!(
            parse_origin("HTTP://Partner.example:8000/").as_deref(),
            Ok("http://partner.example:8000")
        );
        assert!(parse_origin("partner.example").is_err());
        assert!(parse_origin("http://partner.example/path").is_err());
        assert!(parse_origin("http://a\" onload=\"x").is_err());
    }
}
