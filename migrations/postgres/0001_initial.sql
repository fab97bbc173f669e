-- oauth-manager schema (PostgreSQL). Timestamps are always written by the service from its
-- injected clock, never by column defaults, so both backends hold identical values.

CREATE TABLE oauth_integrations (
    id                   UUID PRIMARY KEY,
    user_id              TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_account_id  TEXT NOT NULL,
    account_email        TEXT,
    account_name         TEXT,
    account_metadata     JSONB NOT NULL DEFAULT '{}'::jsonb,
    status               TEXT NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked', 'error')),
    granted_scopes       JSONB NOT NULL DEFAULT '[]'::jsonb,
    requested_scopes     JSONB NOT NULL DEFAULT '[]'::jsonb,
    created_at           TIMESTAMPTZ NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL,
    last_refreshed_at    TIMESTAMPTZ,
    last_error           TEXT,
    last_error_at        TIMESTAMPTZ
);
-- One integration per (user, provider account): reconnecting updates it.
CREATE UNIQUE INDEX oauth_integrations_account_key
    ON oauth_integrations (user_id, provider, provider_account_id);
-- Listing a user's integrations, newest id last (ids are time-ordered UUIDv7: cursor pagination).
CREATE INDEX oauth_integrations_user_idx ON oauth_integrations (user_id, id);
CREATE INDEX oauth_integrations_status_idx ON oauth_integrations (status, id);

CREATE TABLE oauth_tokens (
    integration_id            UUID PRIMARY KEY REFERENCES oauth_integrations (id) ON DELETE CASCADE,
    key_id                    TEXT NOT NULL,
    access_token              BYTEA NOT NULL,
    refresh_token             BYTEA,
    id_token                  BYTEA,
    token_type                TEXT NOT NULL,
    expires_at                TIMESTAMPTZ,
    refresh_token_expires_at  TIMESTAMPTZ,
    generation                BIGINT NOT NULL DEFAULT 1,
    created_at                TIMESTAMPTZ NOT NULL,
    updated_at                TIMESTAMPTZ NOT NULL
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
    features     JSONB NOT NULL DEFAULT '[]'::jsonb,
    is_default   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, scope)
);

CREATE TABLE oauth_consents (
    id                  UUID PRIMARY KEY,
    user_id             TEXT NOT NULL,
    provider            TEXT NOT NULL,
    integration_id      UUID REFERENCES oauth_integrations (id) ON DELETE SET NULL,
    scopes_granted      JSONB NOT NULL DEFAULT '[]'::jsonb,
    scopes_denied       JSONB NOT NULL DEFAULT '[]'::jsonb,
    descriptions_shown  JSONB NOT NULL DEFAULT '[]'::jsonb,
    client_ip           TEXT,
    user_agent          TEXT,
    granted_at          TIMESTAMPTZ NOT NULL,
    withdrawn_at        TIMESTAMPTZ
);
CREATE INDEX oauth_consents_user_idx ON oauth_consents (user_id, id);
CREATE INDEX oauth_consents_integration_idx ON oauth_consents (integration_id);

CREATE TABLE oauth_state (
    id               UUID PRIMARY KEY,
    -- SHA-256 of the state value: a database reader cannot complete someone's pending flow.
    state_hash       BYTEA NOT NULL UNIQUE,
    user_id          TEXT NOT NULL,
    provider         TEXT NOT NULL,
    redirect_uri     TEXT NOT NULL,
    requested_scopes JSONB NOT NULL DEFAULT '[]'::jsonb,
    integration_id   UUID REFERENCES oauth_integrations (id) ON DELETE CASCADE,
    return_to        TEXT,
    key_id           TEXT NOT NULL,
    pkce_verifier    BYTEA,
    nonce            TEXT,
    client_ip        TEXT,
    user_agent       TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    expires_at       TIMESTAMPTZ NOT NULL,
    used_at          TIMESTAMPTZ
);
CREATE INDEX oauth_state_expires_idx ON oauth_state (expires_at);
CREATE INDEX oauth_state_key_idx ON oauth_state (key_id);

CREATE TABLE oauth_audit_log (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at      TIMESTAMPTZ NOT NULL,
    actor_user_id    TEXT,
    subject_user_id  TEXT,
    -- No foreign key: the log outlives the integrations it describes.
    integration_id   UUID,
    provider         TEXT,
    action           TEXT NOT NULL,
    outcome          TEXT NOT NULL CHECK (outcome IN ('success', 'failure', 'denied')),
    reason           TEXT,
    request_id       TEXT,
    client_ip        TEXT,
    user_agent       TEXT,
    details          JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX oauth_audit_log_subject_idx ON oauth_audit_log (subject_user_id, id);
CREATE INDEX oauth_audit_log_integration_idx ON oauth_audit_log (integration_id, id);
CREATE INDEX oauth_audit_log_time_idx ON oauth_audit_log (occurred_at);
