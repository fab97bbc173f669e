use super::*;
use crate::oauth::test_server::{FakeServer, Scripted};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const JWKS: &str = include_str!("../../tests/fixtures/jwks.json");
const EC_PRIVATE: &str = include_str!("../../tests/fixtures/jwt_ec_private.pem");
const EC_OTHER_PRIVATE: &str = include_str!("../../tests/fixtures/jwt_ec_other_private.pem");
const EC_PUBLIC: &str = include_str!("../../tests/fixtures/jwt_ec_public.pem");
const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/jwt_rsa_private.pem");

const CLIENT_ID: &str = "client-1.apps.example";
const GOOGLE: &str = "https://accounts.google.com";
const MS_TEMPLATE: &str = "https://login.microsoftonline.com/{tenantid}/v2.0";
const MS_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
const NONCE: &str = "n-0S6_WzA2Mj-fresh-nonce";

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).unwrap()
}

fn base_claims() -> Value {
    let now = now().timestamp();
    json!({
        "iss": GOOGLE,
        "sub": "110169484474386276334",
        "aud": CLIENT_ID,
        "exp": now + 3600,
        "iat": now - 10,
        "nonce": NONCE,
        "email": "jane@example.com",
        "email_verified": true,
        "name": "Jane Doe",
    })
}

fn with(changes: Value) -> Value {
    let mut claims = base_claims();
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

fn header(alg: Algorithm, kid: &str) -> Header {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    header
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    encode(&header(Algorithm::ES256, "ec-1"), claims, &key).unwrap()
}

fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"ec-1","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

struct Case {
    name: &'static str,
    token: String,
    issuer: IssuerRule,
    nonce: Option<&'static str>,
    expected: Result<(), IdTokenError>,
}

fn case(name: &'static str, token: String, expected: Result<(), IdTokenError>) -> Case {
    Case {
        name,
        token,
        issuer: IssuerRule::Exact(GOOGLE.to_owned()),
        nonce: Some(NONCE),
        expected,
    }
}

fn microsoft(name: &'static str, claims: Value, expected: Result<(), IdTokenError>) -> Case {
    Case {
        issuer: IssuerRule::TenantTemplate(MS_TEMPLATE.to_owned()),
        ..case(name, es256(&claims), expected)
    }
}

fn ms_claims(iss_tenant: &str, tid: Value) -> Value {
    with(json!({
        "iss": format!("https://login.microsoftonline.com/{iss_tenant}/v2.0"),
        "tid": tid,
        "oid": "00000000-0000-0000-66f3-3332eca7ea81",
        "preferred_username": "jane@contoso.example",
    }))
}

fn cases() -> Vec<Case> {
    use IdTokenError::*;
    let now = now().timestamp();
    let other_key = EncodingKey::from_ec_pem(EC_OTHER_PRIVATE.as_bytes()).unwrap();
    let hmac_with_public_key = EncodingKey::from_secret(EC_PUBLIC.as_bytes());
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    vec![
        case("valid", es256(&base_claims()), Ok(())),
        case(
            "valid RS256 with its own key",
            encode(&header(Algorithm::RS256, "rsa-1"), &base_claims(), &rsa_key).unwrap(),
            Ok(()),
        ),
        case(
            "valid within leeway after exp",
            es256(&with(json!({"exp": now - 30}))),
            Ok(()),
        ),
        case(
            "valid with several audiences and azp",
            es256(&with(
                json!({"aud": [CLIENT_ID, "other"], "azp": CLIENT_ID}),
            )),
            Ok(()),
        ),
        Case {
            nonce: None,
            ..case(
                "no nonce expected, none sent",
                es256(&with(json!({"nonce": null}))),
                Ok(()),
            )
        },
        case(
            "wrong signature (other key, same kid)",
            encode(
                &header(Algorithm::ES256, "ec-1"),
                &base_claims(),
                &other_key,
            )
            .unwrap(),
            Err(BadSignature),
        ),
        case("alg none", unsigned(&base_claims()), Err(BadSignature)),
        case(
            "HS256 signed with the public key as secret",
            encode(
                &header(Algorithm::HS256, "ec-1"),
                &base_claims(),
                &hmac_with_public_key,
            )
            .unwrap(),
            Err(BadSignature),
        ),
        case(
            "header alg differs from the key's",
            encode(&header(Algorithm::RS256, "ec-1"), &base_claims(), &rsa_key).unwrap(),
            Err(BadSignature),
        ),
        case(
            "unknown kid",
            encode(
                &header(Algorithm::ES256, "ec-2"),
                &base_claims(),
                &other_key,
            )
            .unwrap(),
            Err(UnknownKey),
        ),
        case("not a JWT", "not-a-jwt".to_owned(), Err(Malformed)),
        case("oversized", "a".repeat(MAX_TOKEN_BYTES + 1), Err(Malformed)),
        case(
            "wrong issuer",
            es256(&with(
                json!({"iss": "https://accounts.google.com.evil.example"}),
            )),
            Err(WrongIssuer),
        ),
        case(
            "missing issuer",
            es256(&with(json!({"iss": null}))),
            Err(WrongIssuer),
        ),
        microsoft(
            "microsoft tenant template",
            ms_claims(MS_TENANT, json!(MS_TENANT)),
            Ok(()),
        ),
        microsoft(
            "microsoft iss tenant differs from tid",
            ms_claims("72f988bf-86f1-41af-91ab-2d7cd011db47", json!(MS_TENANT)),
            Err(WrongIssuer),
        ),
        microsoft(
            "microsoft without tid",
            ms_claims(MS_TENANT, Value::Null),
            Err(WrongIssuer),
        ),
        microsoft(
            "microsoft tid with path characters",
            ms_claims("x/v2.0?y=", json!("x/v2.0?y=")),
            Err(WrongIssuer),
        ),
        Case {
            issuer: IssuerRule::Exact(MS_TEMPLATE.to_owned()),
            ..case(
                "literal template issuer is not a wildcard",
                es256(&ms_claims(MS_TENANT, json!(MS_TENANT))),
                Err(WrongIssuer),
            )
        },
        case(
            "wrong audience",
            es256(&with(json!({"aud": "someone-else"}))),
            Err(WrongAudience),
        ),
        case(
            "missing audience",
            es256(&with(json!({"aud": null}))),
            Err(WrongAudience),
        ),
        case(
            "multiple audiences without azp",
            es256(&with(json!({"aud": [CLIENT_ID, "other"]}))),
            Err(WrongAudience),
        ),
        case(
            "azp names another client",
            es256(&with(json!({"azp": "other"}))),
            Err(WrongAudience),
        ),
        case(
            "expired",
            es256(&with(json!({"exp": now - 600}))),
            Err(Expired),
        ),
        case(
            "missing exp",
            es256(&with(json!({"exp": null}))),
            Err(Malformed),
        ),
        case(
            "non-numeric exp",
            es256(&with(json!({"exp": "tomorrow"}))),
            Err(Malformed),
        ),
        case(
            "iat in the future",
            es256(&with(json!({"iat": now + 3600}))),
            Err(IssuedInFuture),
        ),
        case(
            "iat within leeway",
            es256(&with(json!({"iat": now + 60}))),
            Ok(()),
        ),
        case(
            "wrong nonce",
            es256(&with(json!({"nonce": "n-0S6_WzA2Mj-fresh-noncf"}))),
            Err(NonceMismatch),
        ),
        case(
            "missing nonce",
            es256(&with(json!({"nonce": null}))),
            Err(NonceMismatch),
        ),
        case(
            "a prefix of the nonce",
            es256(&with(json!({"nonce": &NONCE[..NONCE.len() - 1]}))),
            Err(NonceMismatch),
        ),
        case(
            "the nonce and more",
            es256(&with(json!({"nonce": format!("{NONCE}x")}))),
            Err(NonceMismatch),
        ),
        case(
            "a nonce that is not text",
            es256(&with(json!({"nonce": 42}))),
            Err(NonceMismatch),
        ),
        case(
            "missing sub",
            es256(&with(json!({"sub": null}))),
            Err(MissingSubject),
        ),
        case(
            "empty sub",
            es256(&with(json!({"sub": ""}))),
            Err(MissingSubject),
        ),
        case(
            "overlong sub",
            es256(&with(json!({"sub": "s".repeat(256)}))),
            Err(MissingSubject),
        ),
    ]
}

async fn jwks_server() -> (FakeServer, JwksCache) {
    let server = FakeServer::start(vec![Scripted::json(200, JWKS)]).await;
    let cache = JwksCache::new(server.url("/jwks")).unwrap();
    (server, cache)
}

#[tokio::test]
async fn table() {
    let (_server, cache) = jwks_server().await;
    for case in cases() {
        let expected = IdTokenExpectations {
            issuer: &case.issuer,
            client_id: CLIENT_ID,
            nonce: case.nonce,
            now: now(),
            leeway: Duration::minutes(2),
        };
        let result = validate_id_token(&case.token, &cache, &expected)
            .await
            .map(|_| ());
        assert_eq!(result, case.expected, "case: {}", case.name);
    }
}

#[tokio::test]
async fn claims_are_extracted() {
    let (_server, cache) = jwks_server().await;
    let issuer = IssuerRule::TenantTemplate(MS_TEMPLATE.to_owned());
    let expected = IdTokenExpectations {
        issuer: &issuer,
        client_id: CLIENT_ID,
        nonce: Some(NONCE),
        now: now(),
        leeway: Duration::minutes(5),
    };
    let mut claims = ms_claims(MS_TENANT, json!(MS_TENANT));
    claims["email_verified"] = json!("false");
    let validated = validate_id_token(&es256(&claims), &cache, &expected)
        .await
        .unwrap();
    assert_eq!(
        validated.issuer,
        format!("https://login.microsoftonline.com/{MS_TENANT}/v2.0")
    );
    assert_eq!(validated.subject, "110169484474386276334");
    assert_eq!(validated.audience, vec![CLIENT_ID.to_owned()]);
    assert_eq!(validated.tenant_id.as_deref(), Some(MS_TENANT));
    assert_eq!(
        validated.object_id.as_deref(),
        Some("00000000-0000-0000-66f3-3332eca7ea81")
    );
    assert_eq!(
        validated.preferred_username.as_deref(),
        Some("jane@contoso.example")
    );
    assert_eq!(validated.email.as_deref(), Some("jane@example.com"));
    assert_eq!(validated.email_verified, Some(false));
    assert_eq!(validated.name.as_deref(), Some("Jane Doe"));
    assert_eq!(validated.nonce.as_deref(), Some(NONCE));
    assert_eq!(validated.expires_at, now() + Duration::hours(1));
    assert_eq!(validated.issued_at, Some(now() - Duration::seconds(10)));
    assert_eq!(validated.authorized_party, None);
    assert!(validated.raw.contains_key("tid"));
}

#[tokio::test]
async fn unreachable_jwks_is_keys_unavailable() {
    let (socket, address) = crate::oauth::test_server::refusing_address();
    let cache =
        JwksCache::new(url::Url::parse(&format!("http://{address}/jwks")).unwrap()).unwrap();
    let issuer = IssuerRule::Exact(GOOGLE.to_owned());
    let expected = IdTokenExpectations {
        issuer: &issuer,
        client_id: CLIENT_ID,
        nonce: None,
        now: now(),
        leeway: Duration::minutes(2),
    };
    let err = validate_id_token(&es256(&base_claims()), &cache, &expected)
        .await
        .unwrap_err();
    assert!(matches!(err, IdTokenError::KeysUnavailable(_)), "{err:?}");
    assert_eq!(err.code(), "id_token_keys_unavailable");
    drop(socket);
}

#[test]
fn codes_are_stable_and_distinct() {
    use IdTokenError::*;
    let all = [
        Malformed,
        BadSignature,
        UnknownKey,
        KeysUnavailable(String::new()),
        WrongIssuer,
        WrongAudience,
        Expired,
        IssuedInFuture,
        NonceMismatch,
        MissingSubject,
    ];
    let codes: std::collections::HashSet<&str> = all.iter().map(IdTokenError::code).collect();
    assert_eq!(codes.len(), all.len());
    assert!(codes.iter().all(|code| code.starts_with("id_token_")));
    assert_eq!(BadSignature.code(), "id_token_bad_signature");
}
