//! Key rotation: re-seals every stored secret under the active key, so older keys can then
//! be removed from `OAUTH_ENCRYPTION_OLD_KEYS`.

use chrono::{DateTime, Utc};

use super::vault::{pkce_verifier_aad, TokenOwner, TokenVault};
use super::ServiceResult;
use crate::storage::Database;

const BATCH: i64 = 200;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    pub tokens_resealed: u64,
    pub pending_authorizations_resealed: u64,
    /// Rows changed by someone else while being re-sealed; they were re-read and re-sealed.
    pub retried: u64,
}

pub async fn rotate(
    db: &Database,
    vault: &TokenVault,
    now: DateTime<Utc>,
) -> ServiceResult<RotationReport> {
    let mut report = RotationReport::default();
    let active = vault.keyring().active_key_id().to_owned();
    loop {
        let batch = db.tokens_not_under_key(&active, BATCH).await?;
        if batch.is_empty() {
            break;
        }
        for row in batch {
            let tokens = vault.open(&row.user_id, &row.tokens)?;
            let owner = TokenOwner {
                integration_id: row.tokens.integration_id,
                user_id: &row.user_id,
            };
            let resealed = vault.seal(owner, &tokens, now)?;
            if db.reseal_tokens(&resealed, row.tokens.generation).await? {
                report.tokens_resealed += 1;
            } else {
                report.retried += 1;
            }
        }
    }
    loop {
        let batch = db
            .pending_authorizations_not_under_key(&active, BATCH)
            .await?;
        if batch.is_empty() {
            break;
        }
        for pending in batch {
            let Some(sealed) = pending.pkce_verifier.as_deref() else {
                continue;
            };
            let state_id = pending.id.to_string();
            let aad = pkce_verifier_aad(&state_id, &pending.user_id);
            let verifier = vault.keyring().open(&pending.key_id, sealed, aad)?;
            let resealed = vault.keyring().seal(&verifier, aad)?;
            if db
                .reseal_pending_authorization(pending.id, &pending.key_id, &active, &resealed)
                .await?
            {
                report.pending_authorizations_resealed += 1;
            } else {
                report.retried += 1;
            }
        }
    }
    Ok(report)
}
