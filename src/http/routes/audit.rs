//! The audit log.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::storage::audit::AuditEvent;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    /// Who acted (a user id, `system:…`, or `erased:…` after erasure).
    pub actor_user_id: Option<String>,
    /// Whose data it concerns.
    pub subject_user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    pub provider: Option<String>,
    pub action: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl From<AuditEvent> for AuditEventView {
    fn from(event: AuditEvent) -> Self {
        Self {
            id: event.id,
            occurred_at: event.occurred_at,
            actor_user_id: event.actor_user_id,
            subject_user_id: event.subject_user_id,
            integration_id: event.integration_id,
            provider: event.provider,
            action: event.action,
            outcome: event.outcome,
            reason: event.reason,
            request_id: event.request_id,
            client_ip: event.client_ip,
            user_agent: event.user_agent,
            details: event.details.0,
        }
    }
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Another user's events (admin only).
    pub user_id: Option<String>,
    pub integration_id: Option<Uuid>,
    /// An action such as `callback`, `token_handed_out`, `disconnect`.
    pub action: Option<String>,
    /// Events at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditEventView>,
    pub next_cursor: Option<String>,
}

/// Audit events, oldest first: the caller's own (events about their data), or with `admin`
/// any user's (`user_id`) or all.
#[utoipa::path(get, path = "/api/v1/oauth/audit", tag = "audit", security(("bearer" = [])),
    params(AuditParams),
    responses((status = 200, body = AuditList), (status = 400, body = crate::http::error::Problem),
              (status = 401, body = crate::http::error::Problem), (status = 403, body = crate::http::error::Problem)))]
pub async fn list(
    axum::extract::State(state): axum::extract::State<crate::http::AppState>,
    crate::http::extract::Authenticated(principal): crate::http::extract::Authenticated,
    crate::http::extract::ApiQuery(params): crate::http::extract::ApiQuery<AuditParams>,
    crate::http::extract::ClientInfo(client): crate::http::extract::ClientInfo,
) -> Result<axum::Json<AuditList>, crate::http::error::ApiError> {
    let query = crate::services::audit_log::AuditQuery {
        user_id: params.user_id,
        integration_id: params.integration_id,
        action: params.action,
        from: params.from,
        to: params.to,
        after: decode_event_cursor(params.cursor.as_deref())?,
        limit: params.limit,
    };
    let page =
        crate::services::audit_log::list(&state.services, &principal, query, &client).await?;
    Ok(axum::Json(AuditList {
        items: page.items.into_iter().map(AuditEventView::from).collect(),
        next_cursor: page.next.map(|id| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.to_be_bytes())
        }),
    }))
}

fn decode_event_cursor(cursor: Option<&str>) -> Result<Option<i64>, crate::http::error::ApiError> {
    use base64::Engine;
    cursor
        .map(|text| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .ok()
                .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| {
                    crate::http::error::ApiError::bad_request(
                        "invalid_cursor",
                        "cursor is not one this service issued",
                    )
                })
        })
        .transpose()
}
