//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi};

use crate::http::extract::Authenticated;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "oauth-manager",
        description = "Connect users' OAuth 2.0 / OpenID Connect accounts, keep their tokens \
                       encrypted and fresh. Every /api/v1/oauth route except the provider \
                       callback needs `Authorization: Bearer <JWT>`; errors are \
                       application/problem+json with a stable `code`. Every route but \
                       /healthz and /readyz may answer 429 `rate_limited` with `Retry-After` \
                       (seconds)."
    ),
    paths(
        super::health::healthz,
        super::health::readyz,
        openapi_json,
        super::providers::list,
        super::connect::authorize,
        super::connect::callback,
        super::integrations::list,
        super::integrations::get,
        super::tokens::disconnect,
        super::tokens::token,
        super::tokens::refresh,
        super::catalog::scopes,
        super::catalog::put_scope,
        super::catalog::features,
        super::catalog::integration_features,
        super::consents::list,
        super::consents::withdraw,
        super::audit::list,
        super::users::export,
        super::users::erase,
    ),
    components(schemas(crate::http::error::Problem)),
    modifiers(&BearerAuth, &ProblemResponses),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "providers", description = "OAuth providers this service knows"),
        (name = "connect", description = "The authorization-code flow that connects an account"),
        (name = "integrations", description = "Users' connected provider accounts"),
        (name = "tokens", description = "Access tokens for backends, kept fresh"),
        (name = "catalog", description = "Scopes, their meaning, and the features they serve"),
        (name = "consents", description = "What users granted, and withdrawing it"),
        (name = "privacy", description = "Data export and erasure"),
        (name = "audit", description = "The tamper-evident audit log"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

const PROBLEM_JSON: &str = crate::http::error::PROBLEM_JSON;

/// Makes the document say what the service answers, for every operation: error bodies are
/// `application/problem+json` (the handlers' annotations name the `Problem` schema, which
/// utoipa files under `application/json`), and the answers that any route can give are
/// listed where its annotation leaves them out: 400 for malformed path or query parameters
/// and bodies, 401 for routes needing a JWT, 413 and 415 for routes taking a body, 503 when
/// the database is unavailable or the request times out.
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let api = path.starts_with(crate::http::API_PREFIX);
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                complete_operation(operation, api);
            }
        }
    }
}

fn complete_operation(operation: &mut Operation, api: bool) {
    let responses = &mut operation.responses.responses;
    for response in responses.values_mut() {
        if let RefOr::T(response) = response {
            if let Some(content) = response.content.shift_remove("application/json") {
                let key = if refers_to_problem(&content) {
                    PROBLEM_JSON
                } else {
                    "application/json"
                };
                response.content.insert(key.to_owned(), content);
            }
        }
    }
    let has_parameters = operation
        .parameters
        .as_ref()
        .is_some_and(|parameters| !parameters.is_empty());
    let has_body = operation.request_body.is_some();
    let secured = operation
        .security
        .as_ref()
        .is_some_and(|security| !security.is_empty());
    let mut add = |status: &str, description: &str| {
        let entry = responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(Response::new(description)));
        if let RefOr::T(response) = entry {
            // A route documenting another body for this status (the callback's result) can
            // still answer a problem for a malformed request.
            response
                .content
                .entry(PROBLEM_JSON.to_owned())
                .or_insert_with(problem_content);
        }
    };
    if has_parameters || has_body {
        add(
            "400",
            "invalid_path, invalid_query or invalid_body: a parameter or the body is malformed",
        );
    }
    if secured {
        add(
            "401",
            "missing_token, invalid_token or token_expired (with WWW-Authenticate: Bearer)",
        );
    }
    if has_body {
        add("413", "payload_too_large: the body exceeds 64 KiB");
        add(
            "415",
            "unsupported_media_type: the body is not sent as application/json",
        );
    }
    if api {
        add(
            "429",
            "rate_limited: too many requests from this user or address (with Retry-After)",
        );
        add(
            "503",
            "database_unavailable or request_timeout (with Retry-After)",
        );
    }
}

fn refers_to_problem(content: &Content) -> bool {
    matches!(&content.schema, Some(RefOr::Ref(reference)) if reference.ref_location.ends_with("/Problem"))
}

fn problem_content() -> Content {
    Content::new(Some(Ref::from_schema_name("Problem")))
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/api/v1/oauth/openapi.json", tag = "meta",
    security(("bearer" = [])),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json(_caller: Authenticated) -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn every_error_answer_is_documented_as_problem_json() {
        let document = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        let paths = document["paths"].as_object().expect("paths");
        let operations: usize = paths
            .values()
            .map(|item| item.as_object().map_or(0, serde_json::Map::len))
            .sum();
        assert_eq!(operations, 20, "every route is documented");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("item") {
                let name = format!("{method} {path}");
                let responses = operation["responses"].as_object().expect("responses");
                for (status, response) in responses {
                    let content = response["content"].as_object().cloned().unwrap_or_default();
                    let json_problem = content.get("application/json").is_some_and(|json| {
                        json["schema"]["$ref"] == "#/components/schemas/Problem"
                    });
                    assert!(
                        !json_problem,
                        "{name} {status}: Problem under application/json"
                    );
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            content.contains_key(PROBLEM_JSON),
                            "{name} {status}: no problem+json body"
                        );
                    }
                }
                let has = |status: &str| responses.contains_key(status);
                let non_empty = |field: &str| {
                    operation[field]
                        .as_array()
                        .is_some_and(|items| !items.is_empty())
                };
                if non_empty("security") {
                    assert!(has("401"), "{name}: 401");
                }
                if non_empty("parameters") {
                    assert!(has("400"), "{name}: 400");
                }
                if operation
                    .get("requestBody")
                    .is_some_and(|body| body != &Value::Null)
                {
                    assert!(
                        has("400") && has("413") && has("415"),
                        "{name}: body errors"
                    );
                }
                if path.starts_with(crate::http::API_PREFIX) {
                    assert!(has("503"), "{name}: 503");
                    assert!(has("429"), "{name}: 429");
                }
            }
        }
        let callback = &document["paths"]["/api/v1/oauth/callback/{provider}"]["get"]["responses"];
        for status in ["200", "400"] {
            let content = callback[status]["content"].as_object().expect("content");
            assert!(content.contains_key("application/json") && content.contains_key("text/html"));
        }
    }
}
