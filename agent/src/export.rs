//! Export: serve the metrics over HTTP at /metrics. OpenMetrics text when the scraper asks for
//! it (Prometheus does), else the classic Prometheus text format (same samples, no `# EOF`).
use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderMap},
    response::IntoResponse,
    routing::get,
    Router,
};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

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
    "wsgiscope: metrics at /metrics\n"
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(scrape)).route("/", get(index)).with_state(metrics);
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
