//! HTTP layer: routes, extractors and the one error mapping. Handlers stay thin: they parse,
//! call a service with an `Actor`, and shape the response.

pub mod admission;
pub mod error;
pub mod extract;
pub mod limits;
pub mod metrics;
pub mod routes;
pub mod server;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::jwt::JwtVerifier;
use crate::config::Config;
use crate::services::Context;
use admission::Admission;
use error::ApiError;
use limits::RateLimiter;

pub const API_PREFIX: &str = "/api/v1/oauth";
/// The sign-in routes, under [`API_PREFIX`]: they have a concurrency bound of their own.
const AUTHORIZE_ROUTE: &str = "/providers/{provider}/authorize";
const CALLBACK_ROUTE: &str = "/callback/{provider}";
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A caller's request id longer than this is replaced by a fresh one.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Bodies of this API are small JSON documents.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Sent on every response that does not set its own: JSON needs no sources, and no response of
/// this service is meant to be framed.
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";
/// How long browsers may cache a CORS preflight answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// Everything a handler can reach, behind one `Arc`: axum clones the state for every
/// extractor and middleware of every request, and cloning the parts one by one (a dozen
/// reference counts, shared by both cores) was 14 % of the hand-out's CPU (BENCHMARKS.md).
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

pub struct SharedState {
    pub config: Arc<Config>,
    pub verifier: Arc<JwtVerifier>,
    pub services: Context,
    /// `None` when `OAUTH_RATE_LIMIT_ENABLED=false`.
    pub limiter: Option<Arc<RateLimiter>>,
}

impl AppState {
    pub fn new(shared: SharedState) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(AUTHORIZE_ROUTE, post(routes::connect::authorize))
        .route(CALLBACK_ROUTE, get(routes::connect::callback))
        .route("/openapi.json", get(routes::openapi::openapi_json))
        .route("/providers", get(routes::providers::list))
        .route("/integrations", get(routes::integrations::list))
        .route(
            "/integrations/{id}",
            get(routes::integrations::get).delete(routes::tokens::disconnect),
        )
        .route("/integrations/{id}/token", get(routes::tokens::token))
        .route("/integrations/{id}/refresh", post(routes::tokens::refresh))
        .route(
            "/integrations/{id}/features",
            get(routes::catalog::integration_features),
        )
        .route(
            "/providers/{provider}/scopes",
            get(routes::catalog::scopes).post(routes::catalog::put_scope),
        )
        .route("/features", get(routes::catalog::features))
        .route("/consents", get(routes::consents::list))
        .route("/audit", get(routes::audit::list))
        .route("/consents/{id}/withdraw", post(routes::consents::withdraw))
        .route("/users/{user_id}/export", get(routes::users::export))
        .route("/users/{user_id}", delete(routes::users::erase));
    let limiter = middleware::from_fn_with_state(state.clone(), limits::limit_requests);
    let admission = Admission::new(state.config.max_concurrent_requests);
    let track_requests = state
        .config
        .metrics_addr
        .is_some()
        .then_some(metrics::TrackRequests);
    let cors = cors_layer(&state.config.cors_allowed_origins);
    Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .nest(API_PREFIX, api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                // A caller's id is echoed and logged: only a plain, short one is kept, anything
                // else is dropped here so the next layer assigns a fresh UUID.
                .map_request(drop_unusable_request_id)
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request| {
                            let request_id = request
                                .headers()
                                .get(REQUEST_ID)
                                .and_then(|value| value.to_str().ok())
                                .unwrap_or_default();
                            // The path only: query strings of callbacks carry authorization codes.
                            tracing::info_span!("request", method = %request.method(),
                        path = %request.uri().path(), request_id = %request_id)
                        })
                        // One access-log line per request (status, latency) at info.
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                // Outside everything that answers early (429, 431, timeouts, panics), so
                // every status is counted.
                .option_layer(track_requests)
                .map_response(security_headers)
                // Outside the limiter, so that a browser can read a 429 too.
                .option_layer(cors)
                // A panicking handler answers a problem+json 500 (with its request id) instead
                // of dropping the connection.
                .layer(CatchPanicLayer::custom(panic_response))
                // The header-size check, the request's time limit (its wait for a turn
                // included) and the concurrency bound; outside the rest, so that what waits
                // holds little memory.
                .layer(admission)
                // Inside the timeout: nothing the limiter waits on (Redis, JWKS) can hang a
                // request.
                .layer(limiter)
                .layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
}

/// Headers every response carries unless it sets its own: never cached anywhere (responses of
/// the API may carry tokens, and nothing else here gains from a cache); no content sniffing;
/// no `Referer` onward (callback URLs carry authorization codes and API URLs ids); never
/// framed; and a CSP that allows nothing. One function rather than a layer per header: a
/// layer's future and its copy of the stack carry its header name and value in every request.
fn security_headers<B>(mut response: axum::http::Response<B>) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, DEFAULT_CSP),
    ] {
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

/// CORS for the configured origins only (`OAUTH_CORS_ALLOWED_ORIGINS`); none configured, no
/// CORS headers at all. Callers authenticate with a bearer token in `Authorization`, not with
/// cookies, so credentials mode is not enabled.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, REQUEST_ID])
            .expose_headers([REQUEST_ID, header::RETRY_AFTER, header::WWW_AUTHENTICATE])
            .max_age(CORS_MAX_AGE),
    )
}

/// Keeps `x-request-id` only when it matches `[A-Za-z0-9._:-]{1,128}`: the value reaches every
/// log line and response, so spaces, quotes or kilobytes of text must not.
fn drop_unusable_request_id(mut request: Request) -> Request {
    let usable = request.headers().get(REQUEST_ID).is_some_and(|value| {
        let id = value.as_bytes();
        (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
            && id
                .iter()
                .all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(byte))
    });
    if !usable {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// A panic is a bug: its message goes to the log, the caller gets the usual 500.
fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a non-text payload");
    ApiError::internal(&format!("handler panicked: {message}")).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
