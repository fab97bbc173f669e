//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
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
    modifiers(&BearerAuth),
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

/// This OpenAPI document.
#[utoipa::path(get, path = "/api/v1/oauth/openapi.json", tag = "meta",
    security(("bearer" = [])),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi_json(_caller: Authenticated) -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
