//! Strict input: every route meets malformed input — wrong content type, invalid JSON, wrong
//! types, unknown fields, oversized bodies, huge strings, unicode and NUL characters, bad
//! percent-encoding, non-UUID ids, bad enum values, unknown query parameters — and answers a
//! 4xx problem+json naming the problem, never a 5xx, never a hang. (NUL characters matter on
//! PostgreSQL, whose text and jsonb types cannot hold them: before they were refused at the
//! door, some of these cases were 500s there.)

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{sign_hs256, spawn_with_fake, TestApp};

const API: &str = "/api/v1/oauth";
const ID: &str = "0190a5b2-5c3e-7d4f-8a1b-2c3d4e5f6a7b";

/// One malformed request and the problem it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
}

fn case(name: &'static str, method: Method, path: &str, status: u16, code: &'static str) -> Case {
    Case {
        name,
        method,
        path: format!("{API}{path}"),
        content_type: None,
        body: None,
        status,
        code,
    }
}

impl Case {
    fn json(self, body: impl Into<Vec<u8>>) -> Case {
        self.body(Some("application/json"), body)
    }

    fn body(mut self, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Case {
        self.content_type = content_type;
        self.body = Some(body.into());
        self
    }
}

async fn send(
    app: &TestApp,
    http: &reqwest::Client,
    token: &str,
    case: &Case,
) -> reqwest::Response {
    let mut request = http
        .request(case.method.clone(), app.url(&case.path))
        .bearer_auth(token);
    if let Some(content_type) = case.content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = &case.body {
        request = request.body(body.clone());
    }
    request
        .send()
        .await
        .unwrap_or_else(|err| panic!("{}: no answer in time: {err}", case.name))
}

/// Whether the request answered `status` with a problem+json whose `code` is `code`.
async fn check_problem(
    response: reqwest::Response,
    name: &str,
    status: u16,
    code: &str,
) -> Result<(), String> {
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.unwrap_or_default();
    let problem: Value = serde_json::from_str(&body).unwrap_or_default();
    let answered = (got, content_type.as_str(), problem["code"].as_str());
    if got >= 500
        || answered != (status, "application/problem+json", Some(code))
        || problem["status"] != got
    {
        let shown: String = body.chars().take(300).collect();
        return Err(format!(
            "{name}: expected {status} {code}, got {answered:?}: {shown}"
        ));
    }
    Ok(())
}

async fn assert_problem(response: reqwest::Response, name: &str, status: u16, code: &str) {
    if let Err(failure) = check_problem(response, name, status, code).await {
        panic!("{failure}");
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Never a hang: every answer comes well within the service's own 30 s limit.
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[tokio::test]
async fn every_route_answers_malformed_input_with_a_4xx_problem() {
    let (app, _fake) = spawn_with_fake().await;
    let admin = app.token("admin", &["admin"]);
    let http = http();
    let huge = "x".repeat(20_000);
    let oversized = format!("{{\"scopes\": [\"{}\"]}}", "x".repeat(70 * 1024));
    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
    let authorize = "/providers/google/authorize";
    let scopes = "/providers/google/scopes";
    let refresh = format!("/integrations/{ID}/refresh");
    let scope_body = |extra: &str| {
        format!(
            "{{\"scope\": \"calendar\", \"description\": \"Read your calendar\", \"sensitivity\": \"sensitive\"{extra}}}"
        )
    };
    let cases = vec![
        // Routing.
        case("unknown route", get.clone(), "/nope", 404, "not_found"),
        case("wrong method", Method::PUT, "/integrations", 405, "method_not_allowed"),
        // POST /providers/{provider}/authorize
        case("authorize: not JSON", post.clone(), authorize, 415, "unsupported_media_type")
            .body(Some("text/plain"), "{\"scopes\": []}"),
        case("authorize: form body", post.clone(), authorize, 415, "unsupported_media_type")
            .body(Some("application/x-www-form-urlencoded"), "scopes=calendar"),
        case("authorize: no content type", post.clone(), authorize, 415, "unsupported_media_type")
            .body(None, "{}"),
        case("authorize: invalid JSON", post.clone(), authorize, 400, "invalid_body").json("{\"scopes\": ["),
        case("authorize: not an object", post.clone(), authorize, 400, "invalid_body").json("[1, 2]"),
        case("authorize: wrong type", post.clone(), authorize, 400, "invalid_body")
            .json("{\"scopes\": \"calendar\"}"),
        case("authorize: unknown field", post.clone(), authorize, 400, "invalid_body")
            .json("{\"scope\": [\"calendar\"]}"),
        case("authorize: integration_id not a UUID", post.clone(), authorize, 400, "invalid_body")
            .json("{\"integration_id\": \"42\"}"),
        case("authorize: NUL in a scope", post.clone(), authorize, 400, "invalid_body")
            .json("{\"scopes\": [\"cal\\u0000endar\"]}"),
        case("authorize: NUL in a key", post.clone(), authorize, 400, "invalid_body")
            .json("{\"sco\\u0000pes\": []}"),
        case("authorize: unicode scope", post.clone(), authorize, 400, "unknown_scope")
            .json("{\"scopes\": [\"日历📅\"]}"),
        case("authorize: huge return_to", post.clone(), authorize, 400, "return_to_not_allowed")
            .json(format!("{{\"return_to\": \"https://app.example.test/settings/{huge}\"}}")),
        case("authorize: oversized body", post.clone(), authorize, 413, "payload_too_large")
            .json(oversized.clone()),
        case("authorize: invalid UTF-8 body", post.clone(), authorize, 400, "invalid_body")
            .json(b"{\"scopes\": [\"\xff\xfe\"]}".to_vec()),
        case("authorize: overlong provider", post.clone(), &format!("/providers/{huge}/authorize"), 404, "unknown_provider")
            .json("{}"),
        case("authorize: NUL in provider", post.clone(), "/providers/goo%00gle/authorize", 400, "invalid_path")
            .json("{}"),
        case("authorize: provider not UTF-8", post.clone(), "/providers/%FF%FE/authorize", 400, "invalid_path")
            .json("{}"),
        case("authorize: bad percent-encoding", post.clone(), "/providers/%ZZ/authorize", 404, "unknown_provider")
            .json("{}"),
        // GET /integrations
        case("integrations: limit not a number", get.clone(), "/integrations?limit=abc", 400, "invalid_query"),
        case("integrations: negative limit", get.clone(), "/integrations?limit=-1", 400, "invalid_query"),
        case("integrations: limit overflows", get.clone(), "/integrations?limit=99999999999999999999", 400, "invalid_query"),
        case("integrations: limit zero", get.clone(), "/integrations?limit=0", 400, "invalid_limit"),
        case("integrations: limit too big", get.clone(), "/integrations?limit=201", 400, "invalid_limit"),
        case("integrations: bad status", get.clone(), "/integrations?status=sleeping", 400, "invalid_query"),
        case("integrations: unknown parameter", get.clone(), "/integrations?sort=asc", 400, "invalid_query"),
        case("integrations: repeated parameter", get.clone(), "/integrations?limit=1&limit=2", 400, "invalid_query"),
        case("integrations: bad cursor", get.clone(), "/integrations?cursor=%21%21%21", 400, "invalid_cursor"),
        case("integrations: NUL in user_id", get.clone(), "/integrations?user_id=al%00ice", 400, "invalid_query"),
        case("integrations: NUL in provider", get.clone(), "/integrations?provider=%00", 400, "invalid_query"),
        // /integrations/{id}
        case("integration: not a UUID", get.clone(), "/integrations/42", 400, "invalid_path"),
        case("integration: huge id", get.clone(), &format!("/integrations/{huge}"), 400, "invalid_path"),
        case("integration: NUL in id", get.clone(), "/integrations/%00", 400, "invalid_path"),
        case("integration: not UTF-8", get.clone(), "/integrations/%C3%28", 400, "invalid_path"),
        case("disconnect: not a UUID", delete.clone(), "/integrations/not-a-uuid", 400, "invalid_path"),
        case("token: not a UUID", get.clone(), "/integrations/xyz/token", 400, "invalid_path"),
        case("features: not a UUID", get.clone(), "/integrations/%F0%9F%92%A9/features", 400, "invalid_path"),
        // POST /integrations/{id}/refresh
        case("refresh: not a UUID", post.clone(), "/integrations/1/refresh", 400, "invalid_path").json("{}"),
        case("refresh: not JSON", post.clone(), &refresh, 415, "unsupported_media_type")
            .body(Some("text/plain"), "rejected"),
        case("refresh: invalid JSON", post.clone(), &refresh, 400, "invalid_body").json("{"),
        case("refresh: wrong type", post.clone(), &refresh, 400, "invalid_body")
            .json("{\"rejected_access_token\": 42}"),
        case("refresh: unknown field", post.clone(), &refresh, 400, "invalid_body")
            .json("{\"access_token\": \"x\"}"),
        case("refresh: NUL", post.clone(), &refresh, 400, "invalid_body")
            .json("{\"rejected_access_token\": \"\\u0000\"}"),
        case("refresh: oversized body", post.clone(), &refresh, 413, "payload_too_large").json(oversized.clone()),
        // /providers/{provider}/scopes
        case("scopes: overlong provider", get.clone(), &format!("/providers/{huge}/scopes"), 404, "unknown_provider"),
        case("scopes: NUL in provider", get.clone(), "/providers/%00/scopes", 400, "invalid_path"),
        case("put scope: no content type", post.clone(), scopes, 415, "unsupported_media_type").body(None, scope_body("")),
        case("put scope: invalid JSON", post.clone(), scopes, 400, "invalid_body").json("{\"scope\": "),
        case("put scope: missing field", post.clone(), scopes, 400, "invalid_body").json("{\"scope\": \"calendar\"}"),
        case("put scope: bad sensitivity", post.clone(), scopes, 400, "invalid_body")
            .json("{\"scope\": \"calendar\", \"description\": \"d\", \"sensitivity\": \"secret\"}"),
        case("put scope: unknown field", post.clone(), scopes, 400, "invalid_body").json(scope_body(", \"default\": true")),
        case("put scope: wrong type", post.clone(), scopes, 400, "invalid_body").json(scope_body(", \"features\": \"calendar.read\"")),
        case("put scope: NUL in description", post.clone(), scopes, 400, "invalid_body")
            .json("{\"scope\": \"calendar\", \"description\": \"Read\\u0000\", \"sensitivity\": \"basic\"}"),
        case("put scope: NUL in a feature", post.clone(), scopes, 400, "invalid_body")
            .json(scope_body(", \"features\": [\"\\u0000y\"]")),
        case("put scope: control character in scope", post.clone(), scopes, 400, "invalid_scope")
            .json("{\"scope\": \"cal\\u0007\", \"description\": \"Read\", \"sensitivity\": \"basic\"}"),
        case("put scope: huge description", post.clone(), scopes, 400, "invalid_description")
            .json(format!("{{\"scope\": \"calendar\", \"description\": \"{huge}\", \"sensitivity\": \"basic\"}}")),
        case("put scope: huge feature", post.clone(), scopes, 400, "invalid_feature")
            .json(scope_body(&format!(", \"features\": [\"{huge}\"]"))),
        case("put scope: too many features", post.clone(), scopes, 400, "invalid_feature")
            .json(scope_body(&format!(", \"features\": {}", json!((0..40).map(|n| format!("f{n}")).collect::<Vec<_>>())))),
        case("put scope: oversized body", post.clone(), scopes, 413, "payload_too_large").json(oversized.clone()),
        // GET /consents, POST /consents/{id}/withdraw
        case("consents: limit not a number", get.clone(), "/consents?limit=ten", 400, "invalid_query"),
        case("consents: unknown parameter", get.clone(), "/consents?provider=google", 400, "invalid_query"),
        case("consents: bad cursor", get.clone(), "/consents?cursor=AAAA", 400, "invalid_cursor"),
        case("consents: NUL in user_id", get.clone(), "/consents?user_id=%00", 400, "invalid_query"),
        case("withdraw: not a UUID", post.clone(), "/consents/abc/withdraw", 400, "invalid_path"),
        // GET /audit
        case("audit: from not a date", get.clone(), "/audit?from=yesterday", 400, "invalid_query"),
        case("audit: to out of range", get.clone(), "/audit?to=99999-01-01T00:00:00Z", 400, "invalid_query"),
        case("audit: integration_id not a UUID", get.clone(), "/audit?integration_id=7", 400, "invalid_query"),
        case("audit: NUL in action", get.clone(), "/audit?action=call%00back", 400, "invalid_query"),
        case("audit: unknown parameter", get.clone(), "/audit?outcome=success", 400, "invalid_query"),
        case("audit: bad cursor", get.clone(), "/audit?cursor=%25%25", 400, "invalid_cursor"),
        case("audit: limit too big", get.clone(), "/audit?limit=100000", 400, "invalid_limit"),
        // /users/{user_id}
        case("export: NUL in user id", get.clone(), "/users/al%00ice/export", 400, "invalid_path"),
        case("export: user id not UTF-8", get.clone(), "/users/%FF/export", 400, "invalid_path"),
        case("erase: NUL in user id", delete.clone(), "/users/%00", 400, "invalid_path"),
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let response = send(&app, &http, &admin, case).await;
        if let Err(failure) = check_problem(response, case.name, case.status, case.code).await {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases: {failures:#?}",
        failures.len(),
        cases.len()
    );
    // Nothing above was stored.
    let listed: Value = app
        .get(&format!("{API}/providers/google/scopes"), &admin)
        .await
        .json()
        .await
        .expect("json");
    assert!(
        listed["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|entry| !entry["description"]
                .as_str()
                .unwrap_or_default()
                .contains('\0')),
        "{listed}"
    );
}

#[tokio::test]
async fn a_jwt_whose_subject_holds_a_nul_is_refused_before_reaching_the_database() {
    let (app, _fake) = spawn_with_fake().await;
    let now = chrono::Utc::now().timestamp();
    let token = sign_hs256(&json!({"sub": "al\u{0}ice", "roles": ["admin"], "exp": now + 600}));
    for path in [
        "/integrations",
        "/consents",
        "/audit",
        "/users/al%00ice/export",
    ] {
        let response = app.get(&format!("{API}{path}"), &token).await;
        assert_problem(response, path, 401, "invalid_token").await;
    }
}

/// The callback answers in its own shape (JSON with `Accept: application/json`): a 400 with an
/// error code for anything that is not a pending request's redirect.
#[tokio::test]
async fn malformed_callbacks_are_400s_with_an_error_code() {
    let (app, _fake) = spawn_with_fake().await;
    let http = http();
    let long_state = "s".repeat(8_000);
    let cases = [
        ("no query", String::new(), "invalid_state"),
        ("empty state", "?state=&code=c".to_owned(), "invalid_state"),
        (
            "unknown state",
            "?state=abc&code=c".to_owned(),
            "invalid_state",
        ),
        (
            "bad percent-encoding",
            "?state=%ZZ%&code=%".to_owned(),
            "invalid_state",
        ),
        (
            "not UTF-8",
            "?state=%FF%FE&code=%C3%28".to_owned(),
            "invalid_state",
        ),
        (
            "huge state",
            format!("?state={long_state}&code=c"),
            "invalid_state",
        ),
        (
            "repeated state",
            "?state=a&state=b&code=c".to_owned(),
            "invalid_request",
        ),
        (
            "repeated code",
            "?state=a&code=b&code=c".to_owned(),
            "invalid_request",
        ),
        (
            "NUL in state",
            "?state=a%00b&code=c".to_owned(),
            "invalid_request",
        ),
        (
            "NUL in error",
            "?state=a&error=access%00denied".to_owned(),
            "invalid_request",
        ),
        (
            "extra parameters",
            "?state=a&code=c&authuser=0&prompt=consent&hd=x".to_owned(),
            "invalid_state",
        ),
        (
            "unicode",
            "?state=%F0%9F%94%91&code=%E2%9C%93".to_owned(),
            "invalid_state",
        ),
    ];
    for (name, query, code) in cases {
        for provider in ["google", "nope", "%00", "%FF"] {
            let response = http
                .get(app.url(&format!("{API}/callback/{provider}{query}")))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap_or_else(|err| panic!("{name}: {err}"));
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("json");
            assert_eq!(status, 400, "{name} ({provider}): {body}");
            if provider.starts_with('%') {
                // A path that cannot be a provider name is a problem, like anywhere else.
                assert_eq!(body["code"], "invalid_path", "{name}: {body}");
            } else {
                assert_eq!(body["oauth_status"], "error", "{name}: {body}");
                assert_eq!(body["error"], code, "{name}: {body}");
            }
        }
    }
}

/// Arbitrary query strings (raw text, and encoded pairs mixing the callback's parameters with
/// others) sent to the real callback route: always a 400 with an error code, never a 5xx.
#[test]
fn arbitrary_callback_queries_get_a_400_never_a_5xx() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (app, _fake) = runtime.block_on(spawn_with_fake());
    let http = http();
    let names = prop_oneof![
        Just("code".to_owned()),
        Just("state".to_owned()),
        Just("error".to_owned()),
        Just("error_description".to_owned()),
        Just("iss".to_owned()),
        "[a-z_]{0,12}",
    ];
    let pairs = proptest::collection::vec((names, ".{0,40}"), 0..6).prop_map(|pairs| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &pairs {
            query.append_pair(name, value);
        }
        query.finish()
    });
    let queries = prop_oneof![".{0,300}", pairs];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&queries, |query| {
        let Ok(url) = url::Url::parse(&app.url(&format!("{API}/callback/google?{query}"))) else {
            return Ok(());
        };
        let (status, body) = runtime.block_on(async {
            let response = http
                .get(url)
                .header("accept", "application/json")
                .send()
                .await
                .expect("an answer in time");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or_default())
        });
        prop_assert_eq!(status, 400, "{:?}: {}", query, body);
        prop_assert_eq!(&body["oauth_status"], "error", "{:?}: {}", query, body);
        prop_assert!(
            matches!(
                body["error"].as_str(),
                Some("invalid_state" | "invalid_request")
            ),
            "{:?}: {}",
            query,
            body
        );
        Ok(())
    });
    drop(app);
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
