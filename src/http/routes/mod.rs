//! Route handlers: thin adapters from HTTP to services.

pub mod audit;
pub mod catalog;
pub mod connect;
pub mod consents;
pub mod health;
pub mod integrations;
pub mod openapi;
pub mod providers;
pub mod tokens;
pub mod users;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use uuid::Uuid;

use super::error::ApiError;

/// Cursors are opaque to callers: base64url of the last row's id.
pub fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

pub fn decode_cursor(cursor: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    cursor
        .map(|text| {
            URL_SAFE_NO_PAD
                .decode(text)
                .ok()
                .and_then(|bytes| Uuid::from_slice(&bytes).ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_cursor", "cursor is not one this service issued")
                })
        })
        .transpose()
}
