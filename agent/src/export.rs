//! Export: serve the metrics over HTTP at /metrics. OpenMetrics text when the scraper asks for
//! it (Prometheus does), else the classic Prometheus text format (same samples, no `# EOF`).
//! With the live views on, also their JSON API under /api/ and the page at / (its files are
//! in the binary).
use std::sync::Arc;

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::{
    metrics::Metrics,
    views::{requests::DEFAULT_LIMIT, Views},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type for a scraper's `Accept` header.
pub fn negotiate(accept: Option<&str>, openmetrics_body: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        return (OPENMETRICS, openmetrics_body);
    }
    (PROMETHEUS_TEXT, classic_text(&openmetrics_body))
}

/// The classic text format from OpenMetrics: the samples are the same; a counter's HELP and
/// TYPE lines name its samples (`x_total`), not its family (`x`); no `# EOF`.
fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) if rest.split(' ').next().is_some_and(|name| counters.contains(name)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn scrape(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = negotiate(accept, m.encode());
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn index() -> &'static str {
    "wsgiscope: metrics at /metrics (the live views are off: --ui off)\n"
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

async fn requests(State(v): State<Arc<Views>>, q: Result<Query<Since>, axum::extract::rejection::QueryRejection>) -> Response {
    match q {
        Ok(Query(q)) => {
            let body = v.requests_json(q.since, q.limit.unwrap_or(DEFAULT_LIMIT));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}: use /api/requests?since=CURSOR&limit=N (numbers)\n")).into_response(),
    }
}

/// A file of the page, with headers that keep it to itself: no framing, scripts and data from
/// this agent only.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

const PAGE_HTML: &str = include_str!("views/page/index.html");
const PAGE_JS: &str = include_str!("views/page/app.js");
const PAGE_CSS: &str = include_str!("views/page/style.css");

/// The live views: JSON API and page.
fn ui(views: Arc<Views>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", PAGE_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }))
        .route("/api/requests", get(requests))
        .route("/api/active", get(|State(v): State<Arc<Views>>| async move { Json(v.active()) }))
        .route("/api/routes", get(|State(v): State<Arc<Views>>| async move { Json(v.routes()) }))
        .with_state(views)
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, views: Option<Arc<Views>>) -> std::io::Result<()> {
    let metrics = Router::new().route("/metrics", get(scrape)).with_state(metrics);
    let app = match views {
        Some(v) => metrics.merge(ui(v)),
        None => metrics.route("/", get(index)),
    };
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP a Requests.\n# TYPE a counter\na_total{x=\"1\"} 2\n# HELP b Busy.\n# TYPE b gauge\nb 1\n# EOF\n";
        let want = "# HELP a_total Requests.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n# HELP b Busy.\n# TYPE b gauge\nb 1\n";
        assert_eq!(classic_text(om), want);
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let body = "# TYPE x counter\nx_total 1\n# EOF\n".to_string();
        let prom = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prom), body.clone()), (OPENMETRICS, body.clone()));
        assert_eq!(negotiate(None, body.clone()), (PROMETHEUS_TEXT, "# TYPE x_total counter\nx_total 1\n".to_string()));
        assert_eq!(negotiate(Some("text/plain"), body).0, PROMETHEUS_TEXT);
    }
}
