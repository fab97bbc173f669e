//! Self-tests of the fake authorization server, driven by hand with reqwest (no service).

use std::collections::HashMap;

use crate::support::fake_provider::{Consent, Endpoint, FakeProvider, Fault};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use url::Url;

const CALLBACK: &str = "https://vault.example/api/v1/oauth/callback";

fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn authorization_url(fake: &FakeProvider, path: &str, params: &[(&str, &str)]) -> String {
    let mut url = Url::parse(&format!("{}{path}", fake.base_url())).unwrap();
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

fn callback_params(location: &str) -> HashMap<String, String> {
    Url::parse(location)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// Runs the authorization step for `provider` and returns the code.
async fn code_for(
    fake: &FakeProvider,
    provider: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> String {
    let client_id = fake.client_id(provider);
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", CALLBACK),
        ("state", "st4te"),
    ];
    params.extend_from_slice(extra);
    let location = fake
        .authorize(&authorization_url(fake, path, &params))
        .await;
    callback_params(&location)["code"].clone()
}

async fn notion_token(fake: &FakeProvider, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/notion/token", fake.base_url()))
        .basic_auth(fake.client_id("notion"), Some(fake.client_secret("notion")))
        .header("Notion-Version", "2022-06-28")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn form_token(
    fake: &FakeProvider,
    path: &str,
    provider: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let id = fake.client_id(provider);
    let secret = fake.client_secret(provider);
    let mut form = form.to_vec();
    form.extend([
        ("client_id", id.as_str()),
        ("client_secret", secret.as_str()),
    ]);
    reqwest::Client::new()
        .post(format!("{}{path}", fake.base_url()))
        .form(&form)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn google_code_flow_with_pkce_then_refresh_without_a_new_refresh_token() {
    let fake = FakeProvider::start().await;
    fake.push_consent("google", Consent::user("alice"));
    let (verifier, challenge) = pkce();
    let location = fake
        .authorize(&authorization_url(
            &fake,
            "/google/authorize",
            &[
                ("response_type", "code"),
                ("client_id", "google-client-id"),
                ("redirect_uri", CALLBACK),
                ("scope", "openid email profile"),
                ("state", "xyz"),
                ("nonce", "n-1"),
                ("access_type", "offline"),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        ))
        .await;
    assert!(location.starts_with(CALLBACK));
    let params = callback_params(&location);
    assert_eq!(params["state"], "xyz");
    assert!(
        !params.contains_key("iss"),
        "Google does not send RFC 9207 iss"
    );

    let token_form = [
        ("grant_type", "authorization_code"),
        ("code", params["code"].as_str()),
        ("redirect_uri", CALLBACK),
    ];
    let wrong_verifier = "x".repeat(43);
    let wrong = [
        token_form.as_slice(),
        &[("code_verifier", wrong_verifier.as_str())],
    ]
    .concat();
    let response = form_token(&fake, "/google/token", "google", &wrong).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );

    let good = [
        token_form.as_slice(),
        &[("code_verifier", verifier.as_str())],
    ]
    .concat();
    let response = form_token(&fake, "/google/token", "google", &good).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let tokens: Value = response.json().await.unwrap();
    assert_eq!(tokens["expires_in"], 3599);
    assert_eq!(tokens["scope"], "openid email profile");
    assert!(tokens["access_token"]
        .as_str()
        .unwrap()
        .starts_with("ya29."));
    let refresh_token = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert!(refresh_token.starts_with("1//"));
    let claims = jwt_claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(claims["iss"], format!("{}/google", fake.base_url()));
    assert_eq!(claims["aud"], "google-client-id");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["nonce"], "n-1");
    assert_eq!(claims["email"], "alice@example.com");

    let userinfo: Value = reqwest::Client::new()
        .get(format!("{}/google/userinfo", fake.base_url()))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(userinfo["sub"], "alice");

    let refresh = [
        ("grant_type", "refresh_token"),
        ("refresh_token", &refresh_token),
    ];
    let refreshed: Value = form_token(&fake, "/google/token", "google", &refresh)
        .await
        .json()
        .await
        .unwrap();
    assert!(refreshed["access_token"].is_string());
    assert!(
        refreshed.get("refresh_token").is_none(),
        "Google keeps the old RT"
    );
    assert!(fake.is_token_active(&refresh_token));
    assert_eq!(fake.count_grant("google", "refresh_token"), 1);
    assert_eq!(fake.count("google", Endpoint::Token), 3);

    // Reconnecting the same user without prompt=consent gets no refresh token.
    fake.push_consent("google", Consent::user("alice"));
    let code = code_for(
        &fake,
        "google",
        "/google/authorize",
        &[("scope", "openid"), ("access_type", "offline")],
    )
    .await;
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
    ];
    let second: Value = form_token(&fake, "/google/token", "google", &exchange)
        .await
        .json()
        .await
        .unwrap();
    assert!(second.get("refresh_token").is_none());
}

#[tokio::test]
async fn double_code_use_is_invalid_grant_and_revokes_the_first_tokens() {
    let fake = FakeProvider::start().await;
    let code = code_for(
        &fake,
        "google",
        "/google/authorize",
        &[("scope", "openid"), ("access_type", "offline")],
    )
    .await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
    ];
    let first: Value = form_token(&fake, "/google/token", "google", &form)
        .await
        .json()
        .await
        .unwrap();
    let access_token = first["access_token"].as_str().unwrap();
    assert!(fake.is_token_active(access_token));
    let again = form_token(&fake, "/google/token", "google", &form).await;
    assert_eq!(again.status(), 400);
    assert_eq!(
        again.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    assert!(!fake.is_token_active(access_token));
    assert!(!fake.is_token_active(first["refresh_token"].as_str().unwrap()));
}

#[tokio::test]
async fn notion_requires_basic_auth_a_json_body_and_rotates_strictly() {
    let fake = FakeProvider::start().await;
    let code = code_for(&fake, "notion", "/notion/authorize", &[("owner", "user")]).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
    ];
    // A form body (with client_secret_post) is refused.
    let response = reqwest::Client::new()
        .post(format!("{}/notion/token", fake.base_url()))
        .header("Notion-Version", "2022-06-28")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "invalid_request"
    );
    // JSON without Basic is refused.
    let response = reqwest::Client::new()
        .post(format!("{}/notion/token", fake.base_url()))
        .header("Notion-Version", "2022-06-28")
        .json(
            &json!({"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
                       "client_id": "notion-client-id", "client_secret": "notion-client-secret"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let body = json!({"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK});
    let tokens: Value = notion_token(&fake, body).await.json().await.unwrap();
    assert_eq!(tokens["token_type"], "bearer");
    assert!(tokens.get("expires_in").is_none());
    assert_eq!(
        tokens["owner"]["user"]["id"],
        crate::support::fake_provider::DEFAULT_SUBJECT
    );
    let first_rt = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert!(first_rt.starts_with("nrt_"));

    let refreshed: Value = notion_token(
        &fake,
        json!({"grant_type": "refresh_token", "refresh_token": first_rt}),
    )
    .await
    .json()
    .await
    .unwrap();
    let newest_rt = refreshed["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(newest_rt, first_rt);
    assert!(fake.is_token_active(&newest_rt));

    // Reusing the spent RT is reuse: the whole grant dies, the newest RT included.
    let reuse = notion_token(
        &fake,
        json!({"grant_type": "refresh_token", "refresh_token": first_rt}),
    )
    .await;
    assert_eq!(reuse.status(), 400);
    assert_eq!(
        reuse.json::<Value>().await.unwrap()["error"],
        "invalid_grant"
    );
    assert!(!fake.is_token_active(&newest_rt));
    assert!(!fake.is_token_active(refreshed["access_token"].as_str().unwrap()));
    let newest = notion_token(
        &fake,
        json!({"grant_type": "refresh_token", "refresh_token": newest_rt}),
    )
    .await;
    assert_eq!(newest.status(), 400);
}

#[tokio::test]
async fn microsoft_rotation_keeps_the_old_refresh_token_usable() {
    let fake = FakeProvider::start().await;
    fake.push_consent("microsoft", Consent::user("oid-1"));
    let (verifier, challenge) = pkce();
    let path = "/microsoft/common/oauth2/v2.0/authorize";
    let code = code_for(
        &fake,
        "microsoft",
        path,
        &[
            ("scope", "openid profile email offline_access User.Read"),
            ("nonce", "n-2"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    let token_path = "/microsoft/common/oauth2/v2.0/token";
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", CALLBACK),
        ("code_verifier", verifier.as_str()),
    ];
    let tokens: Value = form_token(&fake, token_path, "microsoft", &form)
        .await
        .json()
        .await
        .unwrap();
    let claims = jwt_claims(tokens["id_token"].as_str().unwrap());
    let tid = crate::support::fake_provider::DEFAULT_TENANT_ID;
    assert_eq!(
        claims["iss"],
        format!("{}/microsoft/{tid}/v2.0", fake.base_url())
    );
    assert_eq!(claims["oid"], "oid-1");
    assert_eq!(claims["sub"], fake.microsoft_sub("oid-1"));
    assert_ne!(claims["sub"], "oid-1");

    let old_rt = tokens["refresh_token"].as_str().unwrap().to_owned();
    let refresh = [
        ("grant_type", "refresh_token"),
        ("refresh_token", old_rt.as_str()),
    ];
    let rotated: Value = form_token(&fake, token_path, "microsoft", &refresh)
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(rotated["refresh_token"], tokens["refresh_token"]);
    assert!(fake.is_token_active(&old_rt));
    let again = form_token(&fake, token_path, "microsoft", &refresh).await;
    assert_eq!(again.status(), 200);

    fake.revoke_all_grants("microsoft", "oid-1");
    let revoked: Value = form_token(&fake, token_path, "microsoft", &refresh)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["error"], "invalid_grant");
    assert_eq!(revoked["error_codes"], json!([70008]));
}

#[tokio::test]
async fn faults_are_consumed_in_order_then_normal_handling_resumes() {
    let fake = FakeProvider::start().await;
    fake.push_fault("acme", Endpoint::Jwks, Fault::RetryAfter503(7));
    fake.push_fault("acme", Endpoint::Jwks, Fault::Malformed);
    fake.push_fault(
        "acme",
        Endpoint::Jwks,
        Fault::Status(418, "{\"x\":1}".to_owned()),
    );
    let url = format!("{}/acme/jwks", fake.base_url());
    let get = || reqwest::get(url.clone());

    let first = get().await.unwrap();
    assert_eq!(first.status(), 503);
    assert_eq!(first.headers()["retry-after"], "7");
    let second = get().await.unwrap();
    assert_eq!(second.status(), 200);
    assert!(second.json::<Value>().await.is_err());
    assert_eq!(get().await.unwrap().status(), 418);
    let jwks: Value = get().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "fake-1");
    assert_eq!(fake.count("acme", Endpoint::Jwks), 4);
}

#[tokio::test]
async fn youtube_channels_list_returns_the_picked_channel_or_nothing() {
    let fake = FakeProvider::start().await;
    let with_channel = Consent::user("bob");
    let (channel_id, _) = with_channel.channel.clone().unwrap();
    fake.push_consent("youtube", with_channel);
    fake.push_consent(
        "youtube",
        Consent {
            channel: None,
            ..Consent::user("carol")
        },
    );

    let mut channels = Vec::new();
    for _ in 0..2 {
        let code = code_for(
            &fake,
            "youtube",
            "/youtube/authorize",
            &[(
                "scope",
                "openid https://www.googleapis.com/auth/youtube.readonly",
            )],
        )
        .await;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", CALLBACK),
        ];
        let tokens: Value = form_token(&fake, "/youtube/token", "youtube", &form)
            .await
            .json()
            .await
            .unwrap();
        let list: Value = reqwest::Client::new()
            .get(format!(
                "{}/youtube/v3/channels?part=id,snippet&mine=true",
                fake.base_url()
            ))
            .bearer_auth(tokens["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        channels.push(list);
    }
    assert_eq!(channels[0]["items"][0]["id"], channel_id.as_str());
    assert!(channels[0]["items"][0]["snippet"]["title"].is_string());
    assert_eq!(channels[1]["items"], json!([]));

    let unauthenticated = reqwest::Client::new()
        .get(format!(
            "{}/youtube/v3/channels?part=id&mine=true",
            fake.base_url()
        ))
        .bearer_auth("ya29.unknown")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

#[tokio::test]
async fn acme_publishes_discovery_and_sends_iss_in_the_authorization_response() {
    let fake = FakeProvider::start().await;
    let base = fake.base_url();
    let document: Value = reqwest::get(format!("{base}/acme/.well-known/openid-configuration"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["issuer"], format!("{base}/acme"));
    assert_eq!(
        document["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(
        document["authorization_response_iss_parameter_supported"],
        true
    );

    let (_, challenge) = pkce();
    let params = [
        ("response_type", "code"),
        ("client_id", "acme-client-id"),
        ("redirect_uri", CALLBACK),
        ("scope", "openid email offline_access"),
        ("state", "s"),
        ("code_challenge", challenge.as_str()),
    ];
    // A challenge without method means `plain`, which the fake refuses.
    let location = fake
        .authorize(&authorization_url(&fake, "/acme/authorize", &params))
        .await;
    assert_eq!(callback_params(&location)["error"], "invalid_request");
    let params = [params.as_slice(), &[("code_challenge_method", "S256")]].concat();
    let location = fake
        .authorize(&authorization_url(&fake, "/acme/authorize", &params))
        .await;
    let callback = callback_params(&location);
    assert_eq!(callback["iss"], format!("{base}/acme"));
    assert!(callback.contains_key("code"));
    assert!(fake
        .providers_toml()
        .contains(&format!("issuer = \"{base}/acme\"")));
}

#[tokio::test]
async fn id_tokens_verify_with_the_jwks_and_revoke_hang_behave() {
    use jsonwebtoken::{decode, jwk::JwkSet, Algorithm, DecodingKey, Validation};

    let fake = FakeProvider::start().await;
    fake.push_consent("google", Consent::user("dave"));
    fake.push_consent(
        "google",
        Consent {
            sign_with_wrong_key: true,
            ..Consent::user("dave")
        },
    );
    let jwks: JwkSet = serde_json::from_str(fake.jwks_json()).unwrap();
    let key = DecodingKey::from_jwk(jwks.find("fake-1").unwrap()).unwrap();
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&["google-client-id"]);
    validation.set_issuer(&[fake.issuer("google")]);

    let mut tokens = Vec::new();
    for _ in 0..2 {
        let code = code_for(
            &fake,
            "google",
            "/google/authorize",
            &[
                ("scope", "openid"),
                ("access_type", "offline"),
                ("prompt", "consent"),
            ],
        )
        .await;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", CALLBACK),
        ];
        let body: Value = form_token(&fake, "/google/token", "google", &form)
            .await
            .json()
            .await
            .unwrap();
        tokens.push(body);
    }
    assert!(decode::<Value>(tokens[0]["id_token"].as_str().unwrap(), &key, &validation).is_ok());
    assert!(decode::<Value>(tokens[1]["id_token"].as_str().unwrap(), &key, &validation).is_err());

    // Revoking one access token at Google revokes the user's whole authorization of the client.
    let revoke = |token: String| {
        let url = format!("{}/google/revoke", fake.base_url());
        async move {
            reqwest::Client::new()
                .post(url)
                .form(&[("token", token)])
                .send()
                .await
                .unwrap()
        }
    };
    let first_rt = tokens[0]["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(
        revoke(tokens[1]["access_token"].as_str().unwrap().to_owned())
            .await
            .status(),
        200
    );
    assert!(!fake.is_token_active(&first_rt));
    assert_eq!(revoke(first_rt).await.status(), 400);

    fake.push_fault("google", Endpoint::Userinfo, Fault::Hang);
    let hung = reqwest::Client::new()
        .get(format!("{}/google/userinfo", fake.base_url()))
        .timeout(std::time::Duration::from_millis(200))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
}
