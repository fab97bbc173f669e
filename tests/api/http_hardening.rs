//! HTTP hardening: CORS by allowlist, security headers on the callback's page and redirects and
//! on token responses, oversized request headers.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use crate::connect::{authorization_url, connect, to_service};
use crate::lifecycle::get_token;
use crate::support::fake_provider::{Consent, Endpoint};
use crate::support::{problem, spawn_app, spawn_app_with, spawn_with_fake, TestApp, RETURN_BASE};

const ALLOWED: &str = "https://app.example.test";

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.http
        .request(
            reqwest::Method::OPTIONS,
            app.url("/api/v1/oauth/integrations"),
        )
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight")
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let app = spawn_app().await;
    let response = preflight(&app, ALLOWED).await;
    assert!(!response
        .headers()
        .contains_key("access-control-allow-origin"));
    let response = app
        .http
        .get(app.url("/api/v1/oauth/providers"))
        .bearer_auth(app.token("alice", &["user"]))
        .header("origin", ALLOWED)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert!(!response
        .headers()
        .keys()
        .any(|name| name.as_str().starts_with("access-control-")));
}

#[tokio::test]
async fn only_listed_origins_get_cors_headers() {
    let app = spawn_app_with(&[
        (
            "OAUTH_CORS_ALLOWED_ORIGINS",
            "https://app.example.test, http://localhost:3000",
        ),
        ("OAUTH_RATE_LIMIT_PER_MINUTE", "1"),
    ])
    .await;
    let response = preflight(&app, ALLOWED).await;
    assert!(response.status().is_success(), "{}", response.status());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], ALLOWED);
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(
        methods.contains("GET") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii");
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    assert!(
        !headers.contains_key("access-control-allow-credentials"),
        "bearer tokens, no cookies"
    );

    for other in ["https://evil.example", "https://app.example.test:8443"] {
        let response = preflight(&app, other).await;
        assert!(
            !response
                .headers()
                .contains_key("access-control-allow-origin"),
            "{other}"
        );
    }

    // An actual request from the allowed origin can read the response, a 429 included.
    let alice = app.token("alice", &["user"]);
    let call = || {
        app.http
            .get(app.url("/api/v1/oauth/providers"))
            .bearer_auth(&alice)
            .header("origin", ALLOWED)
            .send()
    };
    let response = call().await.expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], ALLOWED);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(exposed.contains("retry-after") && exposed.contains("x-request-id"));
    let limited = call().await.expect("request");
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["access-control-allow-origin"], ALLOWED);
}

fn assert_security_headers(headers: &HeaderMap, what: &str) {
    assert_eq!(headers["referrer-policy"], "no-referrer", "{what}");
    assert_eq!(headers["x-frame-options"], "DENY", "{what}");
    assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
    let csp = headers["content-security-policy"].to_str().expect("ascii");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(csp.contains("default-src 'none'"), "{what}: {csp}");
}

#[tokio::test]
async fn callback_pages_redirects_and_token_responses_carry_the_security_headers() {
    let (app, fake) = spawn_with_fake().await;

    // The popup page (no return_to, a browser's Accept).
    fake.push_consent("google", Consent::user("g-1"));
    let url = authorization_url(&app, "alice", "google", json!({})).await;
    let location = fake.authorize(&url).await;
    let page = app
        .http
        .get(to_service(&app, &location))
        .header("accept", "text/html")
        .send()
        .await
        .expect("callback");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/html"));
    assert_security_headers(page.headers(), "popup page");
    assert_eq!(page.headers()["cache-control"], "no-store");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(
        csp.contains("script-src 'nonce-"),
        "the page's own policy: {csp}"
    );

    // The redirect back to the host application.
    fake.push_consent("google", Consent::user("g-2"));
    let url = authorization_url(&app, "bob", "google", json!({"return_to": RETURN_BASE})).await;
    let location = fake.authorize(&url).await;
    let redirect = app
        .http
        .get(to_service(&app, &location))
        .send()
        .await
        .expect("callback");
    assert_eq!(redirect.status(), 303);
    assert_security_headers(redirect.headers(), "callback redirect");
    assert_eq!(redirect.headers()["cache-control"], "no-store");

    // A token hand-out.
    let (status, result) = connect(
        &app,
        &fake,
        "google",
        "carol",
        Consent::user("g-3"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    let id = result["integration_id"].as_str().expect("id");
    let token = get_token(&app, id).await;
    assert_eq!(token.status(), 200);
    assert_security_headers(token.headers(), "token response");
    assert_eq!(token.headers()["cache-control"], "no-store");
    let body: Value = token.json().await.expect("json");
    assert!(body["access_token"].is_string());
}

#[tokio::test]
async fn probes_errors_and_early_answers_carry_the_security_headers_too() {
    let app = spawn_app().await;
    let get = |path: &str| app.http.get(app.url(path)).send();
    let health = get("/healthz").await.expect("200");
    let unknown = get("/nowhere").await.expect("404");
    let unauthenticated = get("/api/v1/oauth/integrations").await.expect("401");
    let oversized = app
        .http
        .get(app.url("/api/v1/oauth/providers"))
        .header("x-padding", "a".repeat(20 * 1024))
        .send()
        .await
        .expect("431");
    for (response, status) in [
        (&health, 200),
        (&unknown, 404),
        (&unauthenticated, 401),
        (&oversized, 431),
    ] {
        assert_eq!(response.status(), status);
        assert_security_headers(response.headers(), &format!("{status}"));
        assert_eq!(response.headers()["cache-control"], "no-store", "{status}");
    }
}

#[tokio::test]
async fn oversized_request_headers_get_431_not_an_error_or_a_hang() {
    let app = spawn_app().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    // 100 KB: within what hyper buffers, so the service's own limit answers, as problem+json.
    let response = client
        .get(app.url("/api/v1/oauth/providers"))
        .header("x-padding", "a".repeat(100 * 1024))
        .send()
        .await
        .expect("an answer, not a dropped connection");
    let (status, body) = problem(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (431, Some("request_header_fields_too_large"))
    );
    // Many small headers adding up count the same.
    let mut request = client.get(app.url("/healthz"));
    for n in 0..40 {
        request = request.header(format!("x-padding-{n}"), "b".repeat(1024));
    }
    assert_eq!(request.send().await.expect("answer").status(), 431);
    // Beyond hyper's own limits (~400 KB of headers, 100 fields) hyper answers 431 itself.
    let mut request = client.get(app.url("/healthz"));
    for n in 0..120 {
        request = request.header(format!("x-many-{n}"), "c");
    }
    assert_eq!(request.send().await.expect("answer").status(), 431);
    let huge = client
        .get(app.url("/healthz"))
        .header("x-padding", "a".repeat(600 * 1024))
        .send()
        .await;
    match huge {
        Ok(response) => assert_eq!(response.status(), 431),
        // hyper may close while the client is still sending: refused, but never a hang.
        Err(err) => assert!(!err.is_timeout(), "{err}"),
    }
    // Ordinary requests, a long JWT included, pass.
    let long_token = app.token(&"u".repeat(200), &["user"]);
    let response = client
        .get(app.url("/api/v1/oauth/providers"))
        .bearer_auth(long_token)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
}

/// A new connection to `address` on which `bytes` have been sent.
async fn connect_and_send(
    address: impl tokio::net::ToSocketAddrs,
    bytes: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(bytes).await.expect("send");
    stream
}

/// Reads from `stream` until the service closes it; returns what it sent and how long that
/// took. Gives up (test failure) after `limit`.
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (Vec<u8>, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut chunk),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return (received, started.elapsed()),
            Ok(Ok(read)) => received.extend_from_slice(&chunk[..read]),
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

/// `OAUTH_HTTP_IDLE_TIMEOUT_SECONDS`: a keep-alive connection with no next request, and a
/// client that never finishes its request head (slowloris), are closed after the timeout
/// instead of holding the connection's buffers for ever.
#[tokio::test]
async fn idle_and_trickling_connections_are_closed_after_the_idle_timeout() {
    let app = spawn_app_with(&[("OAUTH_HTTP_IDLE_TIMEOUT_SECONDS", "1")]).await;
    let address = app.address.trim_start_matches("http://").to_owned();

    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let mut idle = connect_and_send(&address, request.as_bytes()).await;
    let (answered, took) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );

    let partial = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n");
    let mut trickling = connect_and_send(&address, partial.as_bytes()).await;
    let (answered, took) = read_until_closed(&mut trickling, Duration::from_secs(10)).await;
    assert!(
        !String::from_utf8_lossy(&answered).contains(" 200 "),
        "an unfinished request was answered"
    );
    assert!(
        took >= Duration::from_millis(900),
        "closed too early: {took:?}"
    );

    // The service goes on serving new connections.
    let response = app.http.get(app.url("/healthz")).send().await.expect("get");
    assert_eq!(response.status(), 200);
}

/// Graceful shutdown through the accept loop: once it begins, no new connection is accepted,
/// an idle keep-alive connection is closed, a request in progress is still answered, and
/// `serve` returns.
#[tokio::test]
async fn a_shutdown_answers_the_request_in_progress_and_closes_idle_connections() {
    let database = crate::support::TestDatabase::create().await;
    let key = oauth_manager::crypto::KeyMaterial::generate();
    let config = crate::support::config_from(&crate::support::base_env(&database.url, &key));
    let application = oauth_manager::app::Application::build(
        config,
        std::sync::Arc::new(oauth_manager::clock::SystemClock),
    )
    .await
    .expect("starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.serve(listener, async {
        let _ = stopped.await;
    }));

    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let mut idle = connect_and_send(address, healthz.as_bytes()).await;
    let mut answer = [0u8; 1024];
    let read = tokio::io::AsyncReadExt::read(&mut idle, &mut answer)
        .await
        .expect("answer");
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"));

    // A request whose body has not all arrived yet when the shutdown begins.
    let token = crate::support::sign_hs256(&crate::support::claims(
        "alice",
        &["user"],
        chrono::Utc::now(),
    ));
    let mut busy = connect_and_send(address, half_sent_request(&address, &token).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).expect("shutdown");

    let (_, took) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(5));
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "a connection was accepted after the shutdown began"
    );
    finish_and_read_the_answer(&mut busy).await;
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns once the request is answered");
    assert!(served.expect("task").is_ok());
}

/// A browser that goes away during the callback (a closed tab, or Nginx closing its upstream
/// connection because its own client aborted) does not cancel the callback half-way: the
/// authorization code is single-use and the sign-in state already consumed, so a callback cut
/// off after the code exchange would lose the user's grant. hyper's half-close mode keeps it
/// from watching the connection for an end of stream while the handler runs.
#[tokio::test]
async fn a_callback_whose_client_hangs_up_still_stores_the_connection() {
    let (app, fake) = spawn_with_fake().await;
    fake.push_consent("google", Consent::user("g-gone"));
    let url = authorization_url(&app, "dora", "google", json!({})).await;
    let callback = url::Url::parse(&to_service(&app, &fake.authorize(&url).await)).expect("url");
    // Slow enough that the hang-up lands while the service waits for the code exchange.
    fake.set_latency("google", Endpoint::Token, Duration::from_millis(700));

    let address = app.address.trim_start_matches("http://").to_owned();
    let request = format!(
        "GET {}?{} HTTP/1.1\r\nHost: {address}\r\nAccept: application/json\r\n\r\n",
        callback.path(),
        callback.query().unwrap_or_default()
    );
    let browser = connect_and_send(&address, request.as_bytes()).await;
    let exchange_started = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.count_grant("google", "authorization_code") == 0 {
        assert!(
            tokio::time::Instant::now() < exchange_started,
            "no exchange"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(browser);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let listed = app
            .get_as("/api/v1/oauth/integrations", "dora", &["user"])
            .await;
        assert_eq!(listed.status(), 200);
        let body: Value = listed.json().await.expect("json");
        if let Some(item) = body["items"].as_array().and_then(|items| items.first()) {
            assert_eq!(item["provider"], "google", "{body}");
            break item["id"].as_str().expect("id").to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the callback was abandoned when its client hung up: no integration for dora"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The stored connection works.
    assert_eq!(get_token(&app, &id).await.status(), 200);
}

/// `OAUTH_HTTP_KEEPALIVE_CONNECTIONS`: a connection opened while that many are open is closed
/// after 5 s without a request, so that a burst of clients does not leave its idle keep-alive
/// connections (and their buffers) open for the whole idle timeout; below the threshold the
/// idle timeout (75 s) applies.
#[tokio::test]
async fn connections_opened_beyond_the_keepalive_threshold_get_a_short_idle_timeout() {
    let crowded = spawn_app_with(&[("OAUTH_HTTP_KEEPALIVE_CONNECTIONS", "1")]).await;
    let calm = spawn_app().await;
    let request = |address: &str| format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let crowded_address = crowded.address.trim_start_matches("http://").to_owned();
    let calm_address = calm.address.trim_start_matches("http://").to_owned();

    let mut first = connect_and_send(&crowded_address, request(&crowded_address).as_bytes()).await;
    let mut beyond = connect_and_send(&crowded_address, request(&crowded_address).as_bytes()).await;
    let mut alone = connect_and_send(&calm_address, request(&calm_address).as_bytes()).await;
    let (answered, took) = read_until_closed(&mut beyond, Duration::from_secs(20)).await;
    assert!(
        String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
        "answered before being closed"
    );
    assert!(
        (Duration::from_millis(4500)..Duration::from_secs(15)).contains(&took),
        "closed after {took:?}"
    );
    // The connections opened below the threshold are still open: they answer another request.
    for (stream, address) in [(&mut first, &crowded_address), (&mut alone, &calm_address)] {
        use tokio::io::AsyncWriteExt;
        stream
            .write_all(request(address).as_bytes())
            .await
            .expect("still open");
        let (answers, _) = read_answers(stream, 2).await;
        assert_eq!(
            answers, 2,
            "two answers on the kept connection to {address}"
        );
    }
}

/// Reads from `stream` until `count` responses (status lines) arrived; returns how many did
/// and the bytes. Gives up after 10 s.
async fn read_answers(stream: &mut tokio::net::TcpStream, count: usize) -> (usize, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let answers = |bytes: &[u8]| String::from_utf8_lossy(bytes).matches("HTTP/1.1 ").count();
    while answers(&received) < count {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => received.extend_from_slice(&chunk[..read]),
            _ => break,
        }
    }
    (answers(&received), received)
}

/// `OAUTH_MAX_CONNECTIONS`: at the limit, keep-alive goes on while no one waits. A client that
/// connects then waits for a place; one open connection closes after its next response, which
/// says `Connection: close` (an idle connection is not cut: its client may be sending on it),
/// and the waiting client is served in the place freed. Nobody waits any more: the other
/// connection stays open.
#[tokio::test]
async fn at_the_connection_limit_connections_close_after_their_next_response_to_make_room() {
    use tokio::io::AsyncWriteExt;
    let full = full_service::<2>().await;
    let (address, request) = (&full.address, &full.request);
    let [mut first, mut second] = full.open;
    first.write_all(request.as_bytes()).await.expect("kept");
    let (answers, answer) = read_answers(&mut first, 1).await;
    assert_eq!(answers, 1, "answered on the kept connection");
    assert!(!says_close(&answer), "no one waits, yet: {answer:?}");

    let mut third = connect_and_send(&address, request.as_bytes()).await;
    assert!(
        !answered_within_half_a_second(&mut third).await,
        "served beyond the limit"
    );
    first.write_all(request.as_bytes()).await.expect("kept");
    let (answer, _) = read_until_closed(&mut first, Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    assert!(
        says_close(&answer),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        read_answers(&mut third, 1).await.0,
        1,
        "served in the freed place"
    );
    // The other connection, idle all along, was not cut, and with nobody waiting any more it
    // is kept.
    second
        .write_all(request.as_bytes())
        .await
        .expect("still open");
    let (answers, answer) = read_answers(&mut second, 1).await;
    assert_eq!(answers, 1);
    assert!(!says_close(&answer), "closed with nobody waiting");
}

/// For each waiting client one open connection closes, not every open one: a crowd beyond
/// the limit would otherwise make every client of a full service connect again.
#[tokio::test]
async fn at_the_connection_limit_as_many_connections_close_as_clients_wait() {
    use tokio::io::AsyncWriteExt;
    let mut full = full_service::<3>().await;
    let (address, request) = (&full.address, &full.request);
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_and_send(&address, request.as_bytes()).await;
        assert!(!answered_within_half_a_second(&mut stream).await);
        waiting.push(stream);
    }
    // Whichever responses go out first make the room: the first waiting client, once served,
    // may close for the second as well as an open connection.
    let mut closed = 0;
    for stream in &mut full.open {
        stream.write_all(request.as_bytes()).await.expect("open");
        let (answers, answer) = read_answers(stream, 1).await;
        assert_eq!(answers, 1);
        closed += usize::from(says_close(&answer));
    }
    for stream in &mut waiting {
        let (answers, answer) = read_answers(stream, 1).await;
        assert_eq!(answers, 1, "served in a freed place");
        closed += usize::from(says_close(&answer));
    }
    assert_eq!(closed, 2, "one close per waiting client");
}

/// A connection its client closes makes room by itself: the client waiting for that place
/// needs no other connection to close.
#[tokio::test]
async fn at_the_connection_limit_a_connection_its_client_closes_makes_the_room() {
    use tokio::io::AsyncWriteExt;
    let full = full_service::<2>().await;
    let (address, request) = (&full.address, &full.request);
    let [mut kept, leaving] = full.open;
    let mut waiting = connect_and_send(&address, request.as_bytes()).await;
    assert!(!answered_within_half_a_second(&mut waiting).await);

    drop(leaving);
    assert_eq!(
        read_answers(&mut waiting, 1).await.0,
        1,
        "served in the place its client gave up"
    );
    kept.write_all(request.as_bytes()).await.expect("open");
    let (answers, answer) = read_answers(&mut kept, 1).await;
    assert_eq!(answers, 1);
    assert!(!says_close(&answer), "closed although nobody waits");
}

/// A service at its connection limit: `LIMIT` connections open, each answered once.
struct Full<const LIMIT: usize> {
    /// Kept for the service to run.
    _app: TestApp,
    address: String,
    /// `GET /healthz` for this service.
    request: String,
    open: [tokio::net::TcpStream; LIMIT],
}

async fn full_service<const LIMIT: usize>() -> Full<LIMIT> {
    let app = spawn_app_with(&[("OAUTH_MAX_CONNECTIONS", &LIMIT.to_string())]).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let mut open = Vec::with_capacity(LIMIT);
    for _ in 0..LIMIT {
        let mut stream = connect_and_send(&address, request.as_bytes()).await;
        assert_eq!(read_answers(&mut stream, 1).await.0, 1);
        open.push(stream);
    }
    let Ok(open) = open.try_into() else {
        unreachable!("LIMIT connections were opened")
    };
    Full {
        _app: app,
        address,
        request,
        open,
    }
}

fn says_close(answer: &[u8]) -> bool {
    String::from_utf8_lossy(answer)
        .to_ascii_lowercase()
        .contains("connection: close")
}

/// At the limit, a connection with a request in progress is not cut: it is answered, then
/// closed, and only then does the waiting client get its place.
#[tokio::test]
async fn at_the_connection_limit_a_request_in_progress_is_answered_before_its_connection_closes() {
    let app = spawn_app_with(&[("OAUTH_MAX_CONNECTIONS", "1")]).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let token = app.token("alice", &["user"]);
    let mut busy = connect_and_send(&address, half_sent_request(&address, &token).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let mut waiting = connect_and_send(&address, healthz.as_bytes()).await;
    assert!(
        !answered_within_half_a_second(&mut waiting).await,
        "served while the limit's only connection was busy"
    );

    let answered = finish_and_read_the_answer(&mut busy).await;
    assert!(says_close(answered.as_bytes()), "{answered}");
    assert_eq!(
        read_answers(&mut waiting, 1).await.0,
        1,
        "then the waiting client is served"
    );
}

/// An authorize request whose body (`{}`) has only half arrived: in progress until the rest does.
fn half_sent_request(address: &impl std::fmt::Display, token: &str) -> String {
    format!(
        "POST /api/v1/oauth/providers/google/authorize HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{"
    )
}

/// Sends the rest of a [`half_sent_request`] and reads until the service closes the
/// connection; asserts that an answer came first and returns it.
async fn finish_and_read_the_answer(busy: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncWriteExt;
    busy.write_all(b"}").await.expect("the rest of the body");
    let (answered, _) = read_until_closed(busy, Duration::from_secs(10)).await;
    let answered = String::from_utf8_lossy(&answered).into_owned();
    assert!(
        answered.starts_with("HTTP/1.1 "),
        "not answered: {answered:?}"
    );
    answered
}

/// Whether the service sends anything on `stream` within half a second.
async fn answered_within_half_a_second(stream: &mut tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 64];
    tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(stream, &mut first),
    )
    .await
    .is_ok()
}
