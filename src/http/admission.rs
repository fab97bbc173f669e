//! The bound on API requests in progress (`OAUTH_MAX_CONCURRENT_REQUESTS`), counted apart for
//! sign-ins (authorize, callback) and for everything else, so that a burst of sign-ins waiting
//! for their provider never makes token hand-outs wait behind it. `/healthz`, `/readyz` and
//! unknown paths are not counted.
//!
//! It sits near the outside of the middleware stack, just inside the request timeout: a request
//! waiting for its turn holds only the futures of the layers outside it, not yet those of the
//! rate limiter, the header check and its handler (the middleware's futures were 10 MB of the
//! peak heap under a burst of 1,000 sign-ins, 256 at a time; BENCHMARKS.md, session 9).

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use super::{API_PREFIX, AUTHORIZE_ROUTE, CALLBACK_ROUTE};

/// One permit pool per class of route, shared by every request.
#[derive(Clone)]
pub struct Admission {
    sign_ins: Arc<Semaphore>,
    others: Arc<Semaphore>,
}

impl Admission {
    /// `per_class` requests of each class at once.
    pub fn new(per_class: usize) -> Self {
        Self {
            sign_ins: Arc::new(Semaphore::new(per_class)),
            others: Arc::new(Semaphore::new(per_class)),
        }
    }

    /// The pool a request of the (matched) `route` takes its permit from, if any.
    fn pool(&self, route: &str) -> Option<&Semaphore> {
        let api_route = route.strip_prefix(API_PREFIX)?;
        if api_route == AUTHORIZE_ROUTE || api_route == CALLBACK_ROUTE {
            Some(&self.sign_ins)
        } else {
            Some(&self.others)
        }
    }
}

/// Waits for a permit of the request's class (first come, first served) and holds it until
/// the response is ready.
pub async fn admit(State(admission): State<Admission>, request: Request, next: Next) -> Response {
    let pool = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|route| admission.pool(route.as_str()));
    let Some(pool) = pool else {
        return next.run(request).await;
    };
    // `acquire` fails only on a closed semaphore, and these are never closed.
    let _permit = pool.acquire().await.ok();
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_ins_and_other_api_routes_count_apart_and_probes_not_at_all() {
        let admission = Admission::new(1);
        let pool = |route: &str| admission.pool(route).map(std::ptr::from_ref);
        let sign_ins = Some(std::ptr::from_ref(&*admission.sign_ins));
        let others = Some(std::ptr::from_ref(&*admission.others));
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
