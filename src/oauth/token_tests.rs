use super::*;
use crate::oauth::http_client;
use crate::oauth::test_server::{FakeServer, Scripted};
use base64::Engine;
use proptest::prelude::*;

const JSON: Option<&str> = Some("application/json; charset=utf-8");

fn parse_json(status: u16, body: &str) -> Result<TokenResponse, TokenError> {
    parse_token_response(status, JSON, None, body.as_bytes())
}

fn secret(value: &Option<SecretString>) -> Option<&str> {
    value.as_ref().map(ExposeSecret::expose_secret)
}

// ---- successful responses ----------------------------------------------------------------

#[test]
fn notion_success_keeps_workspace_fields_in_extra() {
    let body = r#"{
        "access_token": "ntn_secret_access",
        "token_type": "bearer",
        "refresh_token": "nrt_secret_refresh",
        "bot_id": "b7c2e1f0-0000-4000-8000-000000000001",
        "workspace_id": "w-1",
        "workspace_name": "Acme",
        "workspace_icon": "https://example.com/icon.png",
        "owner": {"type": "user", "user": {"object": "user", "id": "u-1", "person": {"email": "a@acme.test"}}},
        "duplicated_template_id": null,
        "request_id": "req-1"
    }"#;
    let response = parse_json(200, body).unwrap();
    assert_eq!(response.access_token.expose_secret(), "ntn_secret_access");
    assert_eq!(secret(&response.refresh_token), Some("nrt_secret_refresh"));
    assert_eq!(response.expires_in, None);
    assert_eq!(response.scope, None);
    assert_eq!(
        response.extra["bot_id"],
        "b7c2e1f0-0000-4000-8000-000000000001"
    );
    assert_eq!(response.extra["owner"]["user"]["id"], "u-1");
    assert!(response.extra.contains_key("duplicated_template_id"));
    assert!(response.extra.contains_key("request_id"));
    for field in TOKEN_FIELDS {
        assert!(
            !response.extra.contains_key(field),
            "{field} leaked into extra"
        );
    }
    let debug = format!("{response:?}");
    assert!(
        !debug.contains("ntn_secret_access") && !debug.contains("nrt_secret_refresh"),
        "{debug}"
    );
}

#[test]
fn notion_null_or_empty_refresh_token_is_none() {
    for refresh in ["null", "\"\""] {
        let body = format!(
            r#"{{"access_token":"a","token_type":"bearer","refresh_token":{refresh},"bot_id":"b"}}"#
        );
        assert!(
            parse_json(200, &body).unwrap().refresh_token.is_none(),
            "{refresh}"
        );
    }
}

#[test]
fn google_success_without_refresh_token() {
    let body = r#"{"access_token":"ya29.a0Af","expires_in":3599,"scope":"openid https://www.googleapis.com/auth/userinfo.email","token_type":"Bearer","id_token":"eyJhbGciOi.x.y"}"#;
    let response = parse_json(200, body).unwrap();
    assert_eq!(response.expires_in, Some(3599));
    assert!(response.refresh_token.is_none());
    assert_eq!(secret(&response.id_token), Some("eyJhbGciOi.x.y"));
    assert_eq!(
        response.scope.as_deref(),
        Some("openid https://www.googleapis.com/auth/userinfo.email")
    );
    assert!(response.extra.is_empty());
}

#[test]
fn microsoft_success_with_everything() {
    let body = r#"{"token_type":"Bearer","scope":"https://graph.microsoft.com/User.Read offline_access openid","expires_in":4467,"ext_expires_in":4467,"access_token":"eyJ0eXAi.ms.at","refresh_token":"0.AXEA.ms-rt","id_token":"eyJ.ms.id"}"#;
    let response = parse_json(200, body).unwrap();
    assert_eq!(response.expires_in, Some(4467));
    assert_eq!(secret(&response.refresh_token), Some("0.AXEA.ms-rt"));
    assert_eq!(secret(&response.id_token), Some("eyJ.ms.id"));
    assert_eq!(response.extra.len(), 1);
    assert_eq!(response.extra["ext_expires_in"], 4467);
}

#[test]
fn github_form_encoded_response() {
    let body = b"access_token=gho_16C7e42F292c6912E7710c838347Ae178B4a&scope=repo%2Cgist&token_type=bearer";
    for content_type in [
        Some("application/x-www-form-urlencoded; charset=utf-8"),
        Some("text/plain"),
        None,
    ] {
        let response = parse_token_response(200, content_type, None, body).unwrap();
        assert_eq!(
            response.access_token.expose_secret(),
            "gho_16C7e42F292c6912E7710c838347Ae178B4a"
        );
        assert_eq!(response.scope.as_deref(), Some("repo,gist"));
    }
}

#[test]
fn token_type_must_be_bearer_in_any_case() {
    for accepted in ["Bearer", "bearer", "BEARER"] {
        let body = format!(r#"{{"access_token":"a","token_type":"{accepted}"}}"#);
        assert_eq!(parse_json(200, &body).unwrap().token_type, accepted);
    }
    let rejected = [
        (r#"{"access_token":"a","token_type":"mac"}"#, "mac"),
        (r#"{"access_token":"a","token_type":"DPoP"}"#, "DPoP"),
        (r#"{"access_token":"a"}"#, ""),
        (r#"{"access_token":"a","token_type":7}"#, ""),
    ];
    for (body, shown) in rejected {
        assert_eq!(
            parse_json(200, body).unwrap_err(),
            TokenError::UnsupportedTokenType(shown.to_owned()),
            "{body}"
        );
    }
}

#[test]
fn access_token_is_required() {
    for body in [
        r#"{"token_type":"bearer"}"#,
        r#"{"access_token":"","token_type":"bearer"}"#,
        r#"{"access_token":null,"token_type":"bearer"}"#,
        r#"{"access_token":42,"token_type":"bearer"}"#,
    ] {
        assert!(
            matches!(parse_json(200, body), Err(TokenError::InvalidResponse(_))),
            "{body}"
        );
    }
}

#[test]
fn expires_in_forms() {
    let cases = [
        ("3600", Some(3600)),
        ("\"3600\"", Some(3600)),
        ("\" 60 \"", Some(60)),
        ("3600.9", Some(3600)),
        ("\"3600.5\"", Some(3600)),
        ("0", None),
        ("-5", None),
        ("\"soon\"", None),
        ("null", None),
        ("true", None),
        ("1e300", None),
        ("99999999999999", None),
    ];
    for (raw, expected) in cases {
        let body = format!(r#"{{"access_token":"a","token_type":"bearer","expires_in":{raw}}}"#);
        assert_eq!(
            parse_json(200, &body).unwrap().expires_in,
            expected,
            "{raw}"
        );
    }
}

#[test]
fn scope_array_is_joined() {
    let body = r#"{"access_token":"a","token_type":"bearer","scope":["read","write"]}"#;
    assert_eq!(
        parse_json(200, body).unwrap().scope.as_deref(),
        Some("read write")
    );
}

// ---- errors -----------------------------------------------------------------------------

fn provider(error: &str, description: Option<&str>, codes: &[i64], status: u16) -> TokenError {
    TokenError::Provider {
        error: error.to_owned(),
        description: description.map(str::to_owned),
        error_codes: codes.to_vec(),
        status,
    }
}

#[test]
fn realistic_error_bodies() {
    let microsoft = r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource. Trace ID: 0000 Correlation ID: 1111 Timestamp: 2024-01-01 00:00:00Z","error_codes":[70008],"timestamp":"2024-01-01 00:00:00Z","trace_id":"0000","correlation_id":"1111"}"#;
    let cases: Vec<(u16, &str, TokenError, FailureClass)> = vec![
        (
            400,
            r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
            provider(
                "invalid_grant",
                Some("Token has been expired or revoked."),
                &[],
                400,
            ),
            FailureClass::InvalidGrant,
        ),
        (
            400,
            r#"{"error":"invalid_grant","error_description":"Invalid code."}"#,
            provider("invalid_grant", Some("Invalid code."), &[], 400),
            FailureClass::InvalidGrant,
        ),
        (
            401,
            r#"{"error":"invalid_client","error_description":"The OAuth client was not found."}"#,
            provider(
                "invalid_client",
                Some("The OAuth client was not found."),
                &[],
                401,
            ),
            FailureClass::InvalidClient,
        ),
        (
            400,
            r#"{"error":"unauthorized_client"}"#,
            provider("unauthorized_client", None, &[], 400),
            FailureClass::InvalidClient,
        ),
        (
            200,
            r#"{"ok":false,"error":"invalid_code"}"#,
            provider("invalid_code", None, &[], 200),
            FailureClass::Other,
        ),
        (
            200,
            r#"{"ok":false,"error":""}"#,
            provider("request_failed", None, &[], 200),
            FailureClass::Other,
        ),
        (
            200,
            r#"{"ok":false}"#,
            provider("request_failed", None, &[], 200),
            FailureClass::Other,
        ),
        (
            503,
            r#"{"error":"temporarily_unavailable"}"#,
            provider("temporarily_unavailable", None, &[], 503),
            FailureClass::Transient,
        ),
        (
            500,
            r#"{"error":"server_error"}"#,
            provider("server_error", None, &[], 500),
            FailureClass::Transient,
        ),
        (
            400,
            r#"{"error":"slow_down"}"#,
            provider("slow_down", None, &[], 400),
            FailureClass::Transient,
        ),
        (
            400,
            r#"{"error":"invalid_scope"}"#,
            provider("invalid_scope", None, &[], 400),
            FailureClass::Other,
        ),
        (
            400,
            r#"{"error":{"code":400,"message":"bad thing"}}"#,
            provider("400", Some("bad thing"), &[], 400),
            FailureClass::Other,
        ),
    ];
    for (status, body, expected, class) in cases {
        let err = parse_json(status, body).unwrap_err();
        assert_eq!(err, expected, "{body}");
        assert_eq!(err.class(), class, "{body}");
    }
    let err = parse_json(400, microsoft).unwrap_err();
    assert!(
        matches!(&err, TokenError::Provider { error, error_codes, .. } if error == "invalid_grant" && error_codes == &[70008])
    );
    assert_eq!(err.class(), FailureClass::InvalidGrant);
}

#[test]
fn form_encoded_error() {
    let err = parse_token_response(
        200,
        Some("application/x-www-form-urlencoded"),
        None,
        b"error=bad_verification_code&error_description=The+code+passed+is+incorrect+or+expired.",
    )
    .unwrap_err();
    assert_eq!(
        err,
        provider(
            "bad_verification_code",
            Some("The code passed is incorrect or expired."),
            &[],
            200
        )
    );
}

#[test]
fn microsoft_classification_uses_codes_not_text() {
    for code in REAUTH_ERROR_CODES {
        for error in [
            "invalid_grant",
            "interaction_required",
            "invalid_request",
            "something_new",
        ] {
            let err = provider(error, None, &[code], 400);
            assert_eq!(err.class(), FailureClass::InvalidGrant, "{error} {code}");
        }
    }
    for error in [
        "interaction_required",
        "consent_required",
        "login_required",
        "INVALID_GRANT",
    ] {
        assert_eq!(
            provider(error, None, &[], 400).class(),
            FailureClass::InvalidGrant,
            "{error}"
        );
    }
    // A client-secret problem (AADSTS7000215) stays a client problem.
    assert_eq!(
        provider("invalid_client", None, &[7_000_215], 401).class(),
        FailureClass::InvalidClient
    );
    let body = r#"{"error":"invalid_request","error_description":"AADSTS50173: The provided grant has expired due to it being revoked.","error_codes":[50173]}"#;
    assert_eq!(
        parse_json(400, body).unwrap_err().class(),
        FailureClass::InvalidGrant
    );
}

#[test]
fn transient_statuses_without_an_oauth_error() {
    /// (status, Retry-After, body, expected delay in seconds)
    type Case<'a> = (u16, Option<&'a str>, &'a [u8], Option<u64>);
    let cases: [Case; 4] = [
        (
            503,
            Some("120"),
            b"<html>Service Unavailable</html>",
            Some(120),
        ),
        (429, None, b"", None),
        (502, Some("not a date"), b"Bad Gateway", None),
        (500, Some("Thu, 01 Jan 1970 00:00:00 GMT"), b"{}", Some(0)),
    ];
    for (status, retry_after, body, expected) in cases {
        let err = parse_token_response(status, Some("text/html"), retry_after, body).unwrap_err();
        assert_eq!(err.class(), FailureClass::Transient, "{status}");
        assert_eq!(
            err.retry_after().map(|delay| delay.as_secs()),
            expected,
            "{status}"
        );
    }
}

#[test]
fn garbage_and_odd_statuses_are_invalid_responses() {
    let cases: [(u16, &[u8]); 7] = [
        (200, b"<html>hello</html>"),
        (200, b""),
        (200, b"[1,2,3]"),
        (200, b"\xff\xfe\x00"),
        (400, b"Bad Request"),
        (302, b""),
        (404, b"{}"),
    ];
    for (status, body) in cases {
        let err = parse_token_response(status, JSON, None, body).unwrap_err();
        assert!(
            matches!(err, TokenError::InvalidResponse(_)),
            "{status} {err:?}"
        );
    }
}

#[test]
fn error_text_is_bounded_and_sanitized() {
    let long = "x".repeat(5000);
    let body =
        format!(r#"{{"error":"invalid_grant\r\nFAKE LOG LINE","error_description":"{long}"}}"#);
    let err = parse_json(400, &body).unwrap_err();
    let TokenError::Provider {
        error, description, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(!error.contains('\n') && !error.contains('\r'));
    assert!(description.as_ref().unwrap().chars().count() <= MAX_DESCRIPTION_CHARS + 1);
    assert!(err.to_string().len() < 1000);
}

#[test]
fn messages_never_contain_token_values() {
    let secret_body =
        r#"{"access_token":"SECRET-AT","token_type":"mac","refresh_token":"SECRET-RT"}"#;
    let err = parse_json(200, secret_body).unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains("SECRET"), "{text}");
    }
    let credentials = ClientCredentials {
        client_id: "id".to_owned(),
        client_secret: SecretString::from("SECRET-CS"),
    };
    assert!(!format!("{credentials:?}").contains("SECRET"));
    let refresh = SecretString::from("SECRET-RT");
    let grant = TokenGrant::RefreshToken {
        refresh_token: &refresh,
    };
    assert!(!format!("{grant:?}").contains("SECRET"));
}

#[test]
fn display_messages() {
    let err = provider("invalid_grant", Some("Invalid code."), &[70008], 400);
    assert_eq!(
        err.to_string(),
        "the provider answered invalid_grant (HTTP 400) codes [70008]: Invalid code."
    );
    let err = TokenError::Transient {
        reason: "HTTP 503".to_owned(),
        retry_after: Some(Duration::from_secs(30)),
    };
    assert_eq!(
        err.to_string(),
        "temporary failure: HTTP 503 (retry after 30s)"
    );
}

proptest! {
    #[test]
    fn parse_never_panics(
        status in 0u16..1000,
        body in proptest::collection::vec(any::<u8>(), 0..512),
        content_type in proptest::option::of(".{0,40}"),
        retry_after in proptest::option::of(".{0,40}"),
    ) {
        let _ = parse_token_response(status, content_type.as_deref(), retry_after.as_deref(), &body);
    }

    #[test]
    fn parse_never_panics_on_json_like_bodies(
        status in 0u16..1000,
        access in proptest::option::of(".{0,20}"),
        token_type in ".{0,10}",
        expires in any::<f64>(),
        error in proptest::option::of(".{0,20}"),
    ) {
        let mut object = serde_json::Map::new();
        if let Some(access) = access { object.insert("access_token".into(), access.into()); }
        object.insert("token_type".into(), token_type.into());
        object.insert("expires_in".into(), serde_json::json!(expires));
        if let Some(error) = error { object.insert("error".into(), error.into()); }
        let body = serde_json::Value::Object(object).to_string();
        if let Ok(response) = parse_token_response(status, None, None, body.as_bytes()) {
            prop_assert!((200..300).contains(&status));
            prop_assert!(response.token_type.eq_ignore_ascii_case("bearer"));
        }
    }
}

// ---- against a local server ---------------------------------------------------------------

const OK_BODY: &str =
    r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-1"}"#;

fn credentials() -> ClientCredentials {
    ClientCredentials {
        client_id: "client-123".to_owned(),
        client_secret: SecretString::from("s3cr3t:with/odd~chars"),
    }
}

fn endpoint(
    server: &FakeServer,
    auth: ClientAuth,
    body: BodyFormat,
    headers: Vec<(String, String)>,
) -> TokenEndpoint {
    TokenEndpoint {
        url: server.url("/token"),
        auth,
        body,
        headers,
    }
}

fn basic_credentials(header: &str) -> String {
    let encoded = header.strip_prefix("Basic ").unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn code_exchange_with_client_secret_basic() {
    let server = FakeServer::start(vec![Scripted::json(200, OK_BODY)]).await;
    let verifier = SecretString::from("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
    let grant = TokenGrant::AuthorizationCode {
        code: "code-abc",
        redirect_uri: "https://vault.example/callback/google",
        code_verifier: Some(&verifier),
    };
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretBasic,
        BodyFormat::Form,
        vec![],
    );
    let response = request_token(&http_client().unwrap(), &target, &credentials(), grant)
        .await
        .unwrap();
    assert_eq!(response.access_token.expose_secret(), "at-1");

    let seen = &server.requests()[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/token")
    );
    assert_eq!(seen.header("accept").as_deref(), Some("application/json"));
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(seen.header_count("authorization"), 1);
    assert_eq!(
        basic_credentials(&seen.header("authorization").unwrap()),
        "client-123:s3cr3t%3Awith%2Fodd%7Echars"
    );
    let form = seen.form();
    let keys: Vec<&str> = form.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["code", "code_verifier", "grant_type", "redirect_uri"]
    );
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["code"], "code-abc");
    assert_eq!(
        form["redirect_uri"],
        "https://vault.example/callback/google"
    );
    assert_eq!(
        form["code_verifier"],
        "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    );
}

#[tokio::test]
async fn refresh_with_client_secret_post() {
    let server = FakeServer::start(vec![Scripted::json(200, OK_BODY)]).await;
    let refresh = SecretString::from("old-rt");
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretPost,
        BodyFormat::Form,
        vec![],
    );
    let grant = TokenGrant::RefreshToken {
        refresh_token: &refresh,
    };
    request_token(&http_client().unwrap(), &target, &credentials(), grant)
        .await
        .unwrap();

    let seen = &server.requests()[0];
    assert_eq!(seen.header_count("authorization"), 0);
    let form = seen.form();
    let keys: Vec<&str> = form.keys().map(String::as_str).collect();
    // No `scope`: a refresh can never ask for more than was granted.
    assert_eq!(
        keys,
        ["client_id", "client_secret", "grant_type", "refresh_token"]
    );
    assert_eq!(form["client_id"], "client-123");
    assert_eq!(form["client_secret"], "s3cr3t:with/odd~chars");
    assert_eq!(form["refresh_token"], "old-rt");
}

#[tokio::test]
async fn notion_json_body_with_basic_auth_and_version_header() {
    let notion_ok = r#"{"access_token":"ntn_x","token_type":"bearer","refresh_token":null,"bot_id":"bot-1","workspace_id":"w","owner":{"type":"user"},"duplicated_template_id":null,"request_id":"r"}"#;
    let server = FakeServer::start(vec![Scripted::json(200, notion_ok)]).await;
    let headers = vec![("Notion-Version".to_owned(), "2022-06-28".to_owned())];
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretBasic,
        BodyFormat::Json,
        headers,
    );
    let grant = TokenGrant::AuthorizationCode {
        code: "notion-code",
        redirect_uri: "https://vault.example/callback/notion",
        code_verifier: None,
    };
    let response = request_token(&http_client().unwrap(), &target, &credentials(), grant)
        .await
        .unwrap();
    assert!(response.refresh_token.is_none());
    assert_eq!(response.extra["bot_id"], "bot-1");

    let seen = &server.requests()[0];
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(seen.header("notion-version").as_deref(), Some("2022-06-28"));
    assert_eq!(seen.header_count("authorization"), 1);
    assert!(seen.header("authorization").unwrap().starts_with("Basic "));
    assert_eq!(
        seen.json(),
        serde_json::json!({
            "grant_type": "authorization_code",
            "code": "notion-code",
            "redirect_uri": "https://vault.example/callback/notion",
        })
    );
}

#[tokio::test]
async fn redirect_from_the_token_endpoint_is_not_followed() {
    let server = FakeServer::start(vec![
        Scripted::text(302, "").with_header("location", "/elsewhere"),
        Scripted::json(200, OK_BODY),
    ])
    .await;
    let refresh = SecretString::from("old-rt");
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretPost,
        BodyFormat::Form,
        vec![],
    );
    let grant = TokenGrant::RefreshToken {
        refresh_token: &refresh,
    };
    let err = request_token(&http_client().unwrap(), &target, &credentials(), grant)
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::InvalidResponse(_)), "{err:?}");
    assert_eq!(
        server.requests().len(),
        1,
        "the redirect must not be followed"
    );
}

#[tokio::test]
async fn server_errors_over_the_wire() {
    let server = FakeServer::start(vec![
        Scripted::text(503, "down").with_header("retry-after", "42"),
        Scripted::json(
            400,
            r#"{"error":"invalid_grant","error_description":"Bad Request"}"#,
        ),
    ])
    .await;
    let refresh = SecretString::from("rt");
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretPost,
        BodyFormat::Form,
        vec![],
    );
    let http = http_client().unwrap();
    let first = request_token(
        &http,
        &target,
        &credentials(),
        TokenGrant::RefreshToken {
            refresh_token: &refresh,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(first.retry_after(), Some(Duration::from_secs(42)));
    let second = request_token(
        &http,
        &target,
        &credentials(),
        TokenGrant::RefreshToken {
            refresh_token: &refresh,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(second.class(), FailureClass::InvalidGrant);
}

#[tokio::test]
async fn invalid_configured_header_is_not_transient() {
    let server = FakeServer::start(vec![Scripted::json(200, OK_BODY)]).await;
    let headers = vec![("Bad Header".to_owned(), "x".to_owned())];
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretPost,
        BodyFormat::Form,
        headers,
    );
    let refresh = SecretString::from("rt");
    let err = request_token(
        &http_client().unwrap(),
        &target,
        &credentials(),
        TokenGrant::RefreshToken {
            refresh_token: &refresh,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.class(), FailureClass::Other, "{err:?}");
    assert!(server.requests().is_empty());
}

// ---- secrets repeated by the provider -----------------------------------------------------

#[tokio::test]
async fn provider_errors_never_repeat_the_secrets_of_the_request() {
    // Some servers repeat what they refuse ("Invalid authorization code: …"); that text ends up
    // in logs, `last_error` and API responses, so the request's secrets are cut out of it.
    let echo = "Invalid code code-abc (verifier dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk) \
                from client-123:s3cr3t%3Awith%2Fodd%7Echars / s3cr3t:with/odd~chars \
                Basic Y2xpZW50LTEyMzpzM2NyM3QlM0F3aXRoJTJGb2RkJTdFY2hhcnM=";
    let body = serde_json::json!({"error": "invalid_grant: code-abc", "error_description": echo});
    for auth in [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost] {
        let server = FakeServer::start(vec![Scripted::json(400, &body.to_string())]).await;
        let verifier = SecretString::from("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
        let grant = TokenGrant::AuthorizationCode {
            code: "code-abc",
            redirect_uri: "https://vault.example/callback/google",
            code_verifier: Some(&verifier),
        };
        let target = endpoint(&server, auth, BodyFormat::Form, vec![]);
        let err = request_token(&http_client().unwrap(), &target, &credentials(), grant)
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        for secret in [
            "code-abc",
            "dBjftJeZ4CVP",
            "s3cr3t",
            "Y2xpZW50LTEyMzpzM2NyM3QlM0F3aXRoJTJGb2RkJTdFY2hhcnM",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("Invalid code [redacted] (verifier [redacted])"),
            "{shown}"
        );
    }

    // A refresh token repeated near the end of a long description is cut out before the text
    // is bounded, so not even a prefix of it survives.
    let refresh = SecretString::from("1//0gLongRefreshTokenValue-abcdefghijklmnopqrstuvwxyz");
    let description = format!(
        "{}Invalid refresh token: {}",
        "x".repeat(280),
        refresh.expose_secret()
    );
    let body = serde_json::json!({"error": "invalid_grant", "error_description": description});
    let server = FakeServer::start(vec![Scripted::json(400, &body.to_string())]).await;
    let target = endpoint(
        &server,
        ClientAuth::ClientSecretPost,
        BodyFormat::Form,
        vec![],
    );
    let grant = TokenGrant::RefreshToken {
        refresh_token: &refresh,
    };
    let err = request_token(&http_client().unwrap(), &target, &credentials(), grant)
        .await
        .unwrap_err();
    assert!(!format!("{err:?}").contains("1//0gLong"), "{err:?}");
}

#[test]
fn redact_removes_every_secret_longest_first() {
    let secrets = vec!["abc".to_owned(), "abcdef".to_owned(), String::new()];
    assert_eq!(
        redact("x abcdef y abc z", &secrets),
        "x [redacted] y [redacted] z"
    );
    assert_eq!(redact("nothing here", &secrets), "nothing here");
}

proptest! {
    #[test]
    fn redacted_text_holds_no_secret(
        text in ".{0,200}",
        secrets in proptest::collection::vec("[A-Za-z0-9._~/+=-]{8,40}", 1..4),
        positions in proptest::collection::vec(0usize..200, 1..4),
    ) {
        // Secrets planted anywhere in arbitrary text, then redacted.
        let mut planted = text.clone();
        for (secret, position) in secrets.iter().zip(&positions) {
            let at = planted
                .char_indices()
                .map(|(index, _)| index)
                .nth(*position)
                .unwrap_or(planted.len());
            planted.insert_str(at, secret);
        }
        let clean = redact(&planted, &secrets);
        for secret in &secrets {
            prop_assert!(!clean.contains(secret.as_str()), "{} in {}", secret, clean);
        }
    }
}

/// A successful response as a provider might send it: JSON or form-encoded, `expires_in` as a
/// number or a numeric string, optional members, unknown members.
#[derive(Debug, Clone)]
struct Sent {
    access_token: String,
    token_type: String,
    expires_in: Option<(i64, bool)>,
    refresh_token: Option<String>,
    scope: Option<String>,
    extra: Vec<(String, String)>,
    form: bool,
}

fn sent_response() -> impl Strategy<Value = Sent> {
    let token = "[A-Za-z0-9._~+/=-]{1,80}";
    (
        token,
        prop_oneof![Just("Bearer"), Just("bearer"), Just("BEARER")],
        proptest::option::of((1i64..=MAX_EXPIRES_IN, any::<bool>())),
        proptest::option::of(token),
        proptest::option::of("[a-z.:/ ]{0,40}"),
        // Distinct names: a member sent twice is one the parser may take either of.
        proptest::collection::btree_map("x_[a-z]{1,8}", "[ -~]{0,20}", 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(access_token, token_type, expires_in, refresh_token, scope, extra, form)| Sent {
                access_token,
                token_type: token_type.to_owned(),
                expires_in,
                refresh_token,
                scope,
                extra: extra.into_iter().collect(),
                form,
            },
        )
}

fn encode(sent: &Sent) -> (Option<&'static str>, Vec<u8>) {
    let mut pairs: Vec<(String, serde_json::Value)> = vec![
        ("access_token".into(), sent.access_token.clone().into()),
        ("token_type".into(), sent.token_type.clone().into()),
    ];
    if let Some((seconds, quoted)) = sent.expires_in {
        let value = if quoted || sent.form {
            serde_json::Value::String(seconds.to_string())
        } else {
            seconds.into()
        };
        pairs.push(("expires_in".into(), value));
    }
    if let Some(refresh) = &sent.refresh_token {
        pairs.push(("refresh_token".into(), refresh.clone().into()));
    }
    if let Some(scope) = &sent.scope {
        pairs.push(("scope".into(), scope.clone().into()));
    }
    for (name, value) in &sent.extra {
        pairs.push((name.clone(), value.clone().into()));
    }
    if sent.form {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in &pairs {
            form.append_pair(name, value.as_str().unwrap_or_default());
        }
        (
            Some("application/x-www-form-urlencoded"),
            form.finish().into_bytes(),
        )
    } else {
        let object: serde_json::Map<String, serde_json::Value> = pairs.into_iter().collect();
        (
            JSON,
            serde_json::Value::Object(object).to_string().into_bytes(),
        )
    }
}

proptest! {
    /// Whatever shape a valid response takes, it parses back to what was sent.
    #[test]
    fn valid_responses_parse_back_to_what_was_sent(sent in sent_response(), status in 200u16..300) {
        let (content_type, body) = encode(&sent);
        let parsed = parse_token_response(status, content_type, None, &body)
            .map_err(|err| TestCaseError::fail(format!("{err:?}")))?;
        prop_assert_eq!(parsed.access_token.expose_secret(), sent.access_token.as_str());
        prop_assert_eq!(&parsed.token_type, &sent.token_type);
        prop_assert_eq!(parsed.expires_in, sent.expires_in.map(|(seconds, _)| seconds));
        prop_assert_eq!(secret(&parsed.refresh_token), sent.refresh_token.as_deref());
        prop_assert_eq!(parsed.scope.as_deref(), sent.scope.as_deref());
        for (name, value) in &sent.extra {
            prop_assert_eq!(parsed.extra.get(name).and_then(|v| v.as_str()), Some(value.as_str()));
        }
    }

    /// An `error` member means failure at any status, in JSON or form encoding (F6), and its
    /// text is bounded.
    #[test]
    fn an_error_member_is_a_failure_at_any_status(
        status in 100u16..600,
        error in "[a-z_]{1,30}",
        description in proptest::option::of(".{0,600}"),
        form in any::<bool>(),
    ) {
        let (content_type, body) = if form {
            let mut encoded = url::form_urlencoded::Serializer::new(String::new());
            encoded.append_pair("error", &error);
            if let Some(description) = &description {
                encoded.append_pair("error_description", description);
            }
            (Some("application/x-www-form-urlencoded"), encoded.finish().into_bytes())
        } else {
            let body = serde_json::json!({"error": error, "error_description": description});
            (JSON, body.to_string().into_bytes())
        };
        match parse_token_response(status, content_type, None, &body) {
            Err(TokenError::Provider { error: got, description: shown, .. }) => {
                prop_assert_eq!(got, error);
                if let Some(shown) = shown {
                    prop_assert!(shown.chars().count() <= MAX_DESCRIPTION_CHARS + 1);
                    prop_assert!(!shown.chars().any(char::is_control));
                }
            }
            other => prop_assert!(false, "expected a provider error, got {:?}", other),
        }
    }
}
