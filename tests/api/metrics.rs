//! `GET /metrics`: only on its own listener, Prometheus text with request counts by route
//! template, refreshes by provider and outcome, single-flight waits, the worker's queue and
//! rate-limit rejections. The recorder is process-wide and tests run in parallel: assertions are
//! about presence and growth, never exact totals.

use std::time::Duration as StdDuration;

use chrono::Duration;

use crate::lifecycle::{connected, spawn_token_call};
use crate::support::fake_provider::{Endpoint, Fault};
use crate::support::{spawn_app, spawn_with_fake_and, TestApp};
use oauth_manager::services::worker::{self, WorkerSettings};

async fn scrape(app: &TestApp) -> String {
    let address = app.metrics_address.as_ref().expect("metrics listener");
    let response = app
        .http
        .get(format!("{address}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.expect("text")
}

/// The sum of the samples of `name` whose labels include all of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, sample) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")));
            matches.then(|| sample.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[tokio::test]
async fn metrics_are_served_only_on_their_own_listener() {
    let off = spawn_app().await;
    assert!(off.metrics_address.is_none(), "off by default");
    let on = spawn_app_with_metrics().await;
    for app in [&off, &on] {
        let public = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("request");
        assert_eq!(public.status(), 404, "never on the public listener");
    }
    let text = scrape(&on).await;
    assert!(text.contains("# TYPE"), "{text}");
}

async fn spawn_app_with_metrics() -> TestApp {
    crate::support::spawn_app_with(&[("OAUTH_METRICS_ADDR", "127.0.0.1:0")]).await
}

#[tokio::test]
async fn requests_refreshes_waits_the_worker_queue_and_429s_are_counted() {
    let (app, fake) = spawn_with_fake_and(&[
        ("OAUTH_METRICS_ADDR", "127.0.0.1:0"),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "20"),
    ])
    .await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let token_route = [
        ("method", "GET"),
        ("route", "/api/v1/oauth/integrations/{id}/token"),
        ("status", "200"),
    ];
    let refreshed = [("provider", "google"), ("outcome", "success")];
    let before = scrape(&app).await;

    // A refresh, with concurrent callers waiting on it.
    app.clock.advance(Duration::minutes(56));
    fake.push_fault(
        "google",
        Endpoint::Token,
        Fault::Latency(StdDuration::from_millis(300)),
    );
    let calls: Vec<_> = (0..4).map(|_| spawn_token_call(&app, &id)).collect();
    for call in calls {
        call.await.expect("token call");
    }
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    worker::tick(&app.state.services, &WorkerSettings::default()).await;

    // Someone over the limit.
    let flooder = app.token("flooder", &["user"]);
    let mut limited = false;
    for _ in 0..21 {
        limited |= app.get("/api/v1/oauth/providers", &flooder).await.status() == 429;
    }
    assert!(limited);

    let after = scrape(&app).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) > value(&before, name, labels)
    };
    assert!(grew("http_requests_total", &token_route), "{after}");
    assert!(
        value(&after, "http_request_duration_seconds_count", &token_route) >= 4.0,
        "{after}"
    );
    assert!(
        after.contains("http_request_duration_seconds_bucket{"),
        "a histogram"
    );
    assert!(!after.contains(&id), "never a raw path");
    assert!(grew("oauth_refreshes_total", &refreshed), "{after}");
    assert!(
        grew(
            "oauth_refresh_single_flight_waits_total",
            &[("on", "process")]
        ),
        "{after}"
    );
    assert!(
        grew(
            "http_rate_limited_total",
            &[("class", "general"), ("by", "user")]
        ),
        "{after}"
    );
    assert!(
        value(
            &after,
            "http_requests_total",
            &[("route", "/api/v1/oauth/providers"), ("status", "429")]
        ) >= 1.0
    );
    assert!(after.contains("oauth_worker_due_refreshes"), "{after}");
    assert!(after.contains("oauth_worker_due_revocations"), "{after}");
}

#[tokio::test]
async fn failed_refreshes_are_counted_by_their_class() {
    let (app, fake) = spawn_with_fake_and(&[("OAUTH_METRICS_ADDR", "127.0.0.1:0")]).await;
    let id = connected(&app, &fake, "google", "g-1").await;
    let labels = [("provider", "google"), ("outcome", "invalid_grant")];
    let before = value(&scrape(&app).await, "oauth_refreshes_total", &labels);
    fake.revoke_all_grants("google", "g-1");
    app.clock.advance(Duration::minutes(61));
    let response = app
        .get_as(
            &format!("/api/v1/oauth/integrations/{id}/token"),
            "backend",
            &["service"],
        )
        .await;
    assert_eq!(response.status(), 409);
    let after = value(&scrape(&app).await, "oauth_refreshes_total", &labels);
    assert!(after > before, "{before} -> {after}");
}

/// A client that finds `OAUTH_MAX_CONNECTIONS` open is counted as it starts to wait.
#[tokio::test]
async fn connections_that_wait_at_the_connection_limit_are_counted() {
    let app = crate::support::spawn_app_with(&[
        ("OAUTH_METRICS_ADDR", "127.0.0.1:0"),
        ("OAUTH_MAX_CONNECTIONS", "1"),
    ])
    .await;
    let before = value(
        &scrape(&app).await,
        "http_connection_limit_waits_total",
        &[],
    );
    let address = app.address.trim_start_matches("http://").to_owned();
    let open = tokio::net::TcpStream::connect(&address)
        .await
        .expect("first");
    let waiting = tokio::net::TcpStream::connect(&address)
        .await
        .expect("second");
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(10);
    loop {
        let now = value(
            &scrape(&app).await,
            "http_connection_limit_waits_total",
            &[],
        );
        if now > before {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not counted: {now}");
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    drop((open, waiting));
}
