-- Tamper-evident audit log: every row is chained to the previous row of its chain by a
-- SHA-256 hash (computed by the service, see services::audit). One chain per subject user
-- (keyed by a salted digest of the user id), "system" for events without a subject, and
-- "genesis" holding the single row that carries the salt.
-- Rows written before this migration have NULL chain columns; they are chained, in id order,
-- when the genesis row is created (first audit write after the upgrade).
ALTER TABLE oauth_audit_log ADD COLUMN chain TEXT;
ALTER TABLE oauth_audit_log ADD COLUMN chain_seq BIGINT;
ALTER TABLE oauth_audit_log ADD COLUMN prev_hash BYTEA;
ALTER TABLE oauth_audit_log ADD COLUMN row_hash BYTEA;
-- One row per position: even if a chain lock failed, two appenders could not fork a chain.
-- Also serves reading a chain's head and walking chains in order (audit verify).
CREATE UNIQUE INDEX oauth_audit_log_chain_idx ON oauth_audit_log (chain, chain_seq);
