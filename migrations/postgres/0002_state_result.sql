-- The outcome of a completed authorization, so a replayed callback (double submit, reload)
-- answers with the first result instead of exchanging the code twice.
ALTER TABLE oauth_state ADD COLUMN result_integration_id UUID;
ALTER TABLE oauth_state ADD COLUMN result_error TEXT;
