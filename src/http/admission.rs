//! Admission: what every request passes before the rate limiter and its handler, in this
//! order: the size of its headers (431), the request's time limit (503 `request_timeout` after
//! [`REQUEST_TIMEOUT`], waiting included), and the bound on API requests in progress
//! (`OAUTH_MAX_CONCURRENT_REQUESTS`), counted apart for sign-ins (authorize, callback) and for
//! everything else, so that a burst of sign-ins waiting for their provider never makes token
//! hand-outs wait behind it. `/healthz`, `/readyz` and unknown paths are not counted.
//!
//! It is one hand-written tower service rather than three `axum::middleware::from_fn` layers:
//! each of those keeps, for every request, a copy of the whole stack beneath it and a future
//! large enough for its own state and the extractors', whether the request is waiting for its
//! turn or running. Here a waiting request holds its head, the stack's handle and the wait, in
//! one allocation of a few hundred bytes, and nothing of the rate limiter or its handler yet
//! (under a burst of 1,000 sign-ins, 256 at a time, the middleware's futures were 10 MB of the
//! peak heap; BENCHMARKS.md, sessions 9 and 11).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::error::ApiError;
use super::{API_PREFIX, AUTHORIZE_ROUTE, CALLBACK_ROUTE};

/// No request may hang longer than this, whatever a dependency does.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Request headers may total this much; more is a 431. Nothing this API reads comes near it (a
/// JWT is at most 8 KiB). hyper buffers up to ~400 KiB of headers and 100 fields and answers
/// 431 itself beyond that; this is the tighter limit.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// One permit pool per class of route, shared by every request.
#[derive(Clone)]
pub struct Admission {
    sign_ins: Arc<Semaphore>,
    others: Arc<Semaphore>,
    timeout: Duration,
}

impl Admission {
    /// `per_class` requests of each class at once, each within [`REQUEST_TIMEOUT`].
    pub fn new(per_class: usize) -> Self {
        Self::with_timeout(per_class, REQUEST_TIMEOUT)
    }

    fn with_timeout(per_class: usize, timeout: Duration) -> Self {
        Self {
            sign_ins: Arc::new(Semaphore::new(per_class)),
            others: Arc::new(Semaphore::new(per_class)),
            timeout,
        }
    }

    /// The pool a request of the (matched) `route` takes its permit from, if any.
    fn pool(&self, route: &str) -> Option<&Arc<Semaphore>> {
        let api_route = route.strip_prefix(API_PREFIX)?;
        if api_route == AUTHORIZE_ROUTE || api_route == CALLBACK_ROUTE {
            Some(&self.sign_ins)
        } else {
            Some(&self.others)
        }
    }

    fn pool_of(&self, request: &Request) -> Option<Arc<Semaphore>> {
        let route = request.extensions().get::<MatchedPath>()?;
        self.pool(route.as_str()).cloned()
    }
}

impl<S> Layer<S> for Admission {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted {
            inner,
            admission: self.clone(),
        }
    }
}

/// The service [`Admission`] wraps around the rest of the stack.
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Admission,
}

impl<S> Service<Request> for Admitted<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> BoxFuture {
        if let Some(too_large) = oversized_headers(&request) {
            return Box::pin(std::future::ready(Ok(too_large)));
        }
        let pool = self.admission.pool_of(&request);
        let timeout = self.admission.timeout;
        // The instance that was polled ready serves this request once admitted; its clone
        // stays for the next one (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let admitted = async move {
                // First come, first served. `acquire` fails only on a closed semaphore, and
                // these are never closed.
                let _permit = match &pool {
                    Some(pool) => pool.acquire().await.ok(),
                    None => None,
                };
                inner.call(request).await
            };
            match tokio::time::timeout(timeout, admitted).await {
                Ok(response) => response,
                Err(_) => {
                    Ok(
                        ApiError::unavailable("request_timeout", "the request took too long", 1)
                            .into_response(),
                    )
                }
            }
        })
    }
}

/// 431 for oversized request headers, before anything (JWT verification included) reads them.
fn oversized_headers(request: &Request) -> Option<Response> {
    let size: usize = request
        .headers()
        .iter()
        // As on the wire: "name: value\r\n".
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (size > MAX_HEADER_BYTES).then(|| {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            format!(
                "the request headers total {size} bytes; at most {MAX_HEADER_BYTES} are accepted"
            ),
        )
        .into_response()
    })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    const TOKEN_ROUTE: &str = "/api/v1/oauth/integrations/{id}/token";

    /// A router whose one API route never answers, behind `admission`.
    fn stuck_api(admission: Admission) -> Router {
        Router::new()
            .route(TOKEN_ROUTE, get(std::future::pending::<&'static str>))
            .layer(admission)
    }

    fn token_request(extra_header_bytes: usize) -> Request {
        Request::builder()
            .uri("/api/v1/oauth/integrations/1/token")
            .header("x-padding", "a".repeat(extra_header_bytes))
            .body(Body::empty())
            .unwrap()
    }

    async fn problem_code(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (
            status,
            problem["code"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// The answer to `request`, which must come within 5 s.
    async fn answer(api: Router, request: Request) -> (StatusCode, String) {
        let response = tokio::time::timeout(Duration::from_secs(5), api.oneshot(request))
            .await
            .expect("answered within 5 s")
            .unwrap();
        problem_code(response).await
    }

    fn timed_out() -> (StatusCode, String) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout".to_owned(),
        )
    }

    #[tokio::test]
    async fn the_time_limit_covers_the_wait_for_a_turn() {
        let admission = Admission::with_timeout(1, Duration::from_millis(100));
        // Its one permit is taken for good: a request can only wait for it.
        let _taken = admission.others.clone().try_acquire_owned().unwrap();
        let answer = answer(stuck_api(admission), token_request(1)).await;
        assert_eq!(answer, timed_out());
    }

    #[tokio::test]
    async fn the_time_limit_covers_the_handler() {
        let admission = Admission::with_timeout(1, Duration::from_millis(100));
        let answer = answer(stuck_api(admission), token_request(1)).await;
        assert_eq!(answer, timed_out());
    }

    #[tokio::test]
    async fn oversized_headers_get_431_without_waiting_for_a_turn() {
        let admission = Admission::with_timeout(1, Duration::from_secs(60));
        let _taken = admission.others.clone().try_acquire_owned().unwrap();
        let answer = answer(stuck_api(admission), token_request(MAX_HEADER_BYTES)).await;
        assert_eq!(
            answer,
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large".to_owned()
            )
        );
    }

    #[test]
    fn sign_ins_and_other_api_routes_count_apart_and_probes_not_at_all() {
        let admission = Admission::new(1);
        let pool = |route: &str| admission.pool(route).map(Arc::as_ptr);
        let sign_ins = Some(Arc::as_ptr(&admission.sign_ins));
        let others = Some(Arc::as_ptr(&admission.others));
        assert_eq!(
            pool("/api/v1/oauth/providers/{provider}/authorize"),
            sign_ins
        );
        assert_eq!(pool("/api/v1/oauth/callback/{provider}"), sign_ins);
        assert_eq!(pool("/api/v1/oauth/integrations/{id}/token"), others);
        assert_eq!(pool("/api/v1/oauth/providers"), others);
        assert_eq!(pool("/healthz"), None);
        assert_eq!(pool("/readyz"), None);
    }
}
