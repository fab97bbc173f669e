-- Looking an account up by provider identity (callbacks, provider webhooks) without the user
-- id: the unique (user_id, provider, provider_account_id) index cannot serve that.
CREATE INDEX oauth_integrations_provider_account_idx
    ON oauth_integrations (provider, provider_account_id);
-- The ON DELETE CASCADE from oauth_integrations (and per-integration lookups) would otherwise
-- scan every pending authorization.
CREATE INDEX oauth_state_integration_idx ON oauth_state (integration_id);
