-- oauth-manager schema (SQLite), the same tables as migrations/postgres. Types differ only where
-- SQLite lacks them: UUIDs are 16-byte BLOBs, timestamps are RFC 3339 TEXT written by sqlx (so
-- they compare in time order), JSON is TEXT. Timestamps are always written by the service from
-- its injected clock, never by column defaults, so both backends hold identical values.

CREATE TABLE oauth_integrations (
    id                   BLOB PRIMARY KEY,
    user_id              TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_account_id  TEXT NOT NULL,
    account_email        TEXT,
    account_name         TEXT,
    account_metadata     TEXT NOT NULL DEFAULT '{}',
    status               TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked', 'error')),
    granted_scopes       TEXT NOT NULL DEFAULT '[]',
    requested_scopes     TEXT NOT NULL DEFAULT '[]',
    created_at           TEXT NOT NULL,
    updated_at           TEXT NOT NULL,
    last_refreshed_at    TEXT,
    last_error           TEXT,
    last_error_at        TEXT
);
-- One integration per (user, provider account): reconnecting updates it.
CREATE UNIQUE INDEX oauth_integrations_account_key
    ON oauth_integrations (user_id, provider, provider_account_id);
-- Listing a user's integrations, newest id last (ids are time-ordered UUIDv7: cursor pagination).
CREATE INDEX oauth_integrations_user_idx ON oauth_integrations (user_id, id);
CREATE INDEX oauth_integrations_status_idx ON oauth_integrations (status, id);

CREATE TABLE oauth_tokens (
    integration_id            BLOB PRIMARY KEY REFERENCES oauth_integrations (id) ON DELETE CASCADE,
    key_id                    TEXT NOT NULL,
    access_token              BLOB NOT NULL,
    refresh_token             BLOB,
    id_token                  BLOB,
    token_type                TEXT NOT NULL,
    expires_at                TEXT,
    refresh_token_expires_at  TEXT,
    generation                INTEGER NOT NULL DEFAULT 1,
    created_at                TEXT NOT NULL,
    updated_at                TEXT NOT NULL
);
-- The background refresher scans for tokens expiring soon.
CREATE INDEX oauth_tokens_expires_idx ON oauth_tokens (expires_at);
-- `keys rotate` finds values sealed under older keys.
CREATE INDEX oauth_tokens_key_idx ON oauth_tokens (key_id);

CREATE TABLE oauth_scopes (
    provider     TEXT NOT NULL,
    scope        TEXT NOT NULL,
    description  TEXT NOT NULL,
    sensitivity  TEXT NOT NULL CHECK (sensitivity IN ('basic', 'sensitive', 'restricted')),
    features     TEXT NOT NULL DEFAULT '[]',
    is_default   INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (provider, scope)
);

CREATE TABLE oauth_consents (
    id                  BLOB PRIMARY KEY,
    user_id             TEXT NOT NULL,
    provider            TEXT NOT NULL,
    integration_id      BLOB REFERENCES oauth_integrations (id) ON DELETE SET NULL,
    scopes_granted      TEXT NOT NULL DEFAULT '[]',
    scopes_denied       TEXT NOT NULL DEFAULT '[]',
    descriptions_shown  TEXT NOT NULL DEFAULT '[]',
    client_ip           TEXT,
    user_agent          TEXT,
    granted_at          TEXT NOT NULL,
    withdrawn_at        TEXT
);
CREATE INDEX oauth_consents_user_idx ON oauth_consents (user_id, id);
CREATE INDEX oauth_consents_integration_idx ON oauth_consents (integration_id);

CREATE TABLE oauth_state (
    id               BLOB PRIMARY KEY,
    -- SHA-256 of the state value: a database reader cannot complete someone's pending flow.
    state_hash       BLOB NOT NULL UNIQUE,
    user_id          TEXT NOT NULL,
    provider         TEXT NOT NULL,
    redirect_uri     TEXT NOT NULL,
    requested_scopes TEXT NOT NULL DEFAULT '[]',
    integration_id   BLOB REFERENCES oauth_integrations (id) ON DELETE CASCADE,
    return_to        TEXT,
    key_id           TEXT NOT NULL,
    pkce_verifier    BLOB,
    nonce            TEXT,
    client_ip        TEXT,
    user_agent       TEXT,
    created_at       TEXT NOT NULL,
    expires_at       TEXT NOT NULL,
    used_at          TEXT
);
CREATE INDEX oauth_state_expires_idx ON oauth_state (expires_at);
CREATE INDEX oauth_state_key_idx ON oauth_state (key_id);

CREATE TABLE oauth_audit_log (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at      TEXT NOT NULL,
    actor_user_id    TEXT,
    subject_user_id  TEXT,
    -- No foreign key: the log outlives the integrations it describes.
    integration_id   BLOB,
    provider         TEXT,
    action           TEXT NOT NULL,
    outcome          TEXT NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    reason           TEXT,
    request_id       TEXT,
    client_ip        TEXT,
    user_agent       TEXT,
    details          TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX oauth_audit_log_subject_idx ON oauth_audit_log (subject_user_id, id);
CREATE INDEX oauth_audit_log_integration_idx ON oauth_audit_log (integration_id, id);
CREATE INDEX oauth_audit_log_time_idx ON oauth_audit_log (occurred_at);
