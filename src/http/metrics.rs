//! HTTP side of the metrics: a middleware counting and timing requests by route template, and
//! `GET /metrics` in the Prometheus text format, served on a listener of its own
//! (`OAUTH_METRICS_ADDR`) so that it is never reachable through the public API.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::metrics::{HTTP_DURATION, HTTP_REQUESTS};

/// The Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Middleware: one count and one latency sample per request, labelled by method, route
/// template (`/api/v1/oauth/integrations/{id}`; never the path itself, whose ids would make a
/// series per integration) and status. A pass-through when metrics are off (`enabled`).
pub async fn track_requests(State(enabled): State<bool>, request: Request, next: Next) -> Response {
    if !enabled {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_str().to_owned()),
    ];
    metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}

/// Methods are arbitrary tokens: only the standard ones become label values.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The metrics listener's router: `GET /metrics` only.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let body = handle.render();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response() }
        }),
    )
}

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    if let Err(err) = axum::serve(listener, router(handle)).await {
        tracing::error!(error = %err, "the metrics listener stopped");
    }
}
