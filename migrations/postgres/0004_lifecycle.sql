-- Token lifecycle.
-- Refresh lease: one refresher per integration across every replica. Taken by an atomic
-- UPDATE ... WHERE lease_until IS NULL OR lease_until < now, released after the new tokens are
-- committed; a crashed holder's lease simply expires.
ALTER TABLE oauth_tokens ADD COLUMN lease_owner TEXT;
ALTER TABLE oauth_tokens ADD COLUMN lease_until TIMESTAMPTZ;
-- Background refresh back-off after transient failures.
ALTER TABLE oauth_tokens ADD COLUMN refresh_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE oauth_tokens ADD COLUMN refresh_not_before TIMESTAMPTZ;
-- Durable provider-revocation queue: after a disconnect the sealed row stays only until the
-- provider confirms the revocation (RFC 7009), then it is deleted.
ALTER TABLE oauth_tokens ADD COLUMN revoke_requested_at TIMESTAMPTZ;
ALTER TABLE oauth_tokens ADD COLUMN revoke_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE oauth_tokens ADD COLUMN revoke_not_before TIMESTAMPTZ;
ALTER TABLE oauth_tokens ADD COLUMN revoke_last_error TEXT;
CREATE INDEX oauth_tokens_revoke_idx ON oauth_tokens (revoke_not_before);
