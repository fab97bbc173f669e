//! Seals token sets for storage and opens them again, binding every value to its row.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::crypto::{Aad, CryptoError, Keyring};
use crate::storage::tokens::SealedTokens;

const TOKENS_TABLE: &str = "oauth_tokens";

/// A provider's tokens for one integration, in the clear (in memory only).
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub id_token: Option<SecretString>,
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
}

/// Which integration (row) and user (owner) a token set belongs to.
#[derive(Debug, Clone, Copy)]
pub struct TokenOwner<'a> {
    pub integration_id: uuid::Uuid,
    pub user_id: &'a str,
}

#[derive(Debug, Clone)]
pub struct TokenVault {
    keyring: Arc<Keyring>,
}

impl TokenVault {
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self { keyring }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    pub fn seal(
        &self,
        owner: TokenOwner<'_>,
        tokens: &TokenSet,
        now: DateTime<Utc>,
    ) -> Result<SealedTokens, CryptoError> {
        let row_id = owner.integration_id.to_string();
        let seal = |column, value: &SecretString| {
            self.keyring
                .seal(value, aad(column, &row_id, owner.user_id))
        };
        let seal_optional = |column, value: &Option<SecretString>| {
            value.as_ref().map(|v| seal(column, v)).transpose()
        };
        Ok(SealedTokens {
            integration_id: owner.integration_id,
            key_id: self.keyring.active_key_id().to_owned(),
            access_token: seal("access_token", &tokens.access_token)?,
            refresh_token: seal_optional("refresh_token", &tokens.refresh_token)?,
            id_token: seal_optional("id_token", &tokens.id_token)?,
            token_type: tokens.token_type.clone(),
            expires_at: tokens.expires_at,
            refresh_token_expires_at: tokens.refresh_token_expires_at,
            generation: 0,
            created_at: now,
            updated_at: now,
            refresh_failures: 0,
            refresh_not_before: None,
        })
    }

    pub fn open(&self, user_id: &str, sealed: &SealedTokens) -> Result<TokenSet, CryptoError> {
        let row_id = sealed.integration_id.to_string();
        let open = |column, value: &[u8]| {
            self.keyring
                .open(&sealed.key_id, value, aad(column, &row_id, user_id))
        };
        let open_optional =
            |column, value: &Option<Vec<u8>>| value.as_deref().map(|v| open(column, v)).transpose();
        Ok(TokenSet {
            access_token: open("access_token", &sealed.access_token)?,
            refresh_token: open_optional("refresh_token", &sealed.refresh_token)?,
            id_token: open_optional("id_token", &sealed.id_token)?,
            token_type: sealed.token_type.clone(),
            expires_at: sealed.expires_at,
            refresh_token_expires_at: sealed.refresh_token_expires_at,
        })
    }
}

fn aad<'a>(column: &'static str, row_id: &'a str, owner: &'a str) -> Aad<'a> {
    Aad {
        table: TOKENS_TABLE,
        column,
        row_id,
        owner,
    }
}

/// The place a PKCE verifier is sealed at (table `oauth_state`).
pub fn pkce_verifier_aad<'a>(state_id: &'a str, user_id: &'a str) -> Aad<'a> {
    Aad {
        table: "oauth_state",
        column: "pkce_verifier",
        row_id: state_id,
        owner: user_id,
    }
}
