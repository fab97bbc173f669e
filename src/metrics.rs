//! Prometheus metrics through the `metrics` facade.
//!
//! Code records with the one-line helpers below (no-ops until a recorder is installed, i.e.
//! unless `OAUTH_METRICS_ADDR` is set). The recorder is process-wide, so [`install`] installs it
//! once and hands every later caller the same handle (tests start many apps in one process).
//! Labels are bounded sets: route templates (never raw paths), status codes, provider names,
//! outcome codes.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "http_requests_total";
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
pub const RATE_LIMITED: &str = "http_rate_limited_total";
pub const CONNECTION_LIMIT_WAITS: &str = "http_connection_limit_waits_total";
pub const REFRESHES: &str = "oauth_refreshes_total";
pub const SINGLE_FLIGHT_WAITS: &str = "oauth_refresh_single_flight_waits_total";
pub const WORKER_DUE_REFRESHES: &str = "oauth_worker_due_refreshes";
pub const WORKER_DUE_REVOCATIONS: &str = "oauth_worker_due_revocations";

/// Request latencies from 5 ms to the 30 s request timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram samples are folded into buckets at every scrape and at least this often, so memory
/// stays flat when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder, once per process; every call returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|err| format!("cannot install the metrics recorder: {err}"))?;
            describe();
            let upkeep = handle.clone();
            // A plain thread: the recorder outlives any one async runtime.
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".to_owned())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "no metrics upkeep thread; histograms are folded at scrapes only");
            }
            Ok(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by method, route template and status"
    );
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency by method, route template and status"
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        "Requests refused with 429 by route class and key kind (user or ip)"
    );
    metrics::describe_counter!(
        CONNECTION_LIMIT_WAITS,
        "Client connections that found OAUTH_MAX_CONNECTIONS open and waited for a place"
    );
    metrics::describe_counter!(
        REFRESHES,
        "Token refreshes at the provider by provider and outcome (success or the failure class)"
    );
    metrics::describe_counter!(
        SINGLE_FLIGHT_WAITS,
        "Callers that waited for a refresh already in flight (in this process, or on another replica's lease)"
    );
    metrics::describe_gauge!(
        WORKER_DUE_REFRESHES,
        "Integrations the background worker found due for refresh at its last tick"
    );
    metrics::describe_gauge!(
        WORKER_DUE_REVOCATIONS,
        "Queued provider revocations due at the worker's last tick (up to its batch size)"
    );
}

/// A refresh at the provider ended: `success`, or the failure class (`invalid_grant`, ...).
pub fn refresh(provider: &str, outcome: &'static str) {
    metrics::counter!(REFRESHES, "provider" => provider.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// A caller waited for a refresh in flight: `process` (the in-process lock) or `replica`
/// (polling another replica's lease).
pub fn single_flight_wait(on: &'static str) {
    metrics::counter!(SINGLE_FLIGHT_WAITS, "on" => on).increment(1);
}

/// About to take an integration's in-process refresh lock: anyone else holding a reference
/// holds or awaits the lock, so this caller waits for them.
pub fn single_flight_lock<T>(lock: &std::sync::Arc<T>) {
    if std::sync::Arc::strong_count(lock) > 1 {
        single_flight_wait("process");
    }
}

/// A request was refused with 429.
pub fn rate_limited(class: &'static str, by: &'static str) {
    metrics::counter!(RATE_LIMITED, "class" => class, "by" => by).increment(1);
}

/// A client connection found the connection limit reached and waits for a place.
pub fn connection_limit_wait() {
    metrics::counter!(CONNECTION_LIMIT_WAITS).increment(1);
}

/// Integrations the worker found due for refresh at a tick.
pub fn worker_due_refreshes(due: u64) {
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(WORKER_DUE_REFRESHES).set(due as f64);
}

/// Queued revocations the worker found due at a tick.
pub fn worker_due_revocations(due: usize) {
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(WORKER_DUE_REVOCATIONS).set(due as f64);
}
