//! Export: serve the metrics over HTTP at /metrics (OpenMetrics text, which Prometheus scrapes).
use std::sync::Arc;

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn scrape(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], m.encode())
}

async fn index() -> &'static str {
    "wsgiscope: metrics at /metrics\n"
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(scrape)).route("/", get(index)).with_state(metrics);
    axum::serve(listener, app).await
}
