//! HTTP side of the metrics: a middleware counting and timing requests by route template, and
//! `GET /metrics` in the Prometheus text format, served on a listener of its own
//! (`OAUTH_METRICS_ADDR`) so that it is never reachable through the public API.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, Method};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::{Layer, Service};

use crate::metrics::{HTTP_DURATION, HTTP_REQUESTS};

/// The Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Layer: one count and one latency sample per request, labelled by method, route template
/// (`/api/v1/oauth/integrations/{id}`; never the path itself, whose ids would make a series per
/// integration) and status. Added only when metrics are on. Hand-written rather than
/// `from_fn`, which would keep a copy of the stack beneath it in every request's future.
#[derive(Clone, Copy)]
pub struct TrackRequests;

impl<S> Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner }
    }
}

/// The service [`TrackRequests`] wraps around the rest of the stack.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
}

impl<S, B> Service<Request> for Tracked<S>
where
    S: Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = axum::http::Response<B>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
        let method = method_label(request.method());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let labels = [
                ("method", method.to_owned()),
                ("route", route),
                ("status", response.status().as_str().to_owned()),
            ];
            metrics::counter!(HTTP_REQUESTS, &labels).increment(1);
            metrics::histogram!(HTTP_DURATION, &labels).record(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
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
