-- Sessions, abuse controls and the audit log (ARCHITECTURE.md, "Security").

-- An access token carries the generation it was issued at; changing the
-- password, disabling the account or signing out everywhere bumps it, and
-- every request compares (the tenant guard's entry statement, or the
-- registry check of the non-tenant routes): old tokens die at once.
ALTER TABLE tenantry.users
    ADD COLUMN token_generation     integer NOT NULL DEFAULT 0,
    ADD COLUMN disabled_at          timestamptz,
    ADD COLUMN password_changed_at  timestamptz;

-- Failed logins per presented username (existing or not: no enumeration).
-- After the configured number of failures within 15 minutes the name is
-- locked for a back-off that doubles with each lockout (1 minute up to 15)
-- and always expires. Rows older than a day are purged.
CREATE TABLE tenantry.login_throttle (
    username      text PRIMARY KEY CHECK (length(username) <= 64),
    failures      integer NOT NULL CHECK (failures >= 0),
    window_start  timestamptz NOT NULL,
    lockouts      integer NOT NULL DEFAULT 0 CHECK (lockouts >= 0),
    locked_until  timestamptz
);

-- `Idempotency-Key` of a signup: a retry with the same key and body gets the
-- original account's 201 for 24 hours (then the key is purged).
CREATE TABLE tenantry.idempotency_keys (
    key         text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    user_id     uuid NOT NULL REFERENCES tenantry.users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_idx ON tenantry.idempotency_keys (created_at);
CREATE INDEX refresh_tokens_expires_idx ON tenantry.refresh_tokens (expires_at);

-- The audit log: append-only and hash-chained. Entry n's hash is
-- sha256(hash(n-1) || int8send(n) || utf8(entry)), where `entry` is the
-- canonical JSON written by the service and stored verbatim; entry 0's hash
-- is 32 zero bytes. Appends take the one chain-head row (the last statement
-- of the action's transaction, so the lock is held only for the commit):
-- concurrent appends queue and never fork the chain.
CREATE TABLE tenantry.audit_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq        bigint NOT NULL CHECK (seq >= 0),
    hash       bytea NOT NULL CHECK (length(hash) = 32)
);
INSERT INTO tenantry.audit_head (seq, hash) VALUES (0, decode(repeat('00', 32), 'hex'));

CREATE TABLE tenantry.audit_log (
    seq      bigint PRIMARY KEY CHECK (seq >= 1),
    entry    text NOT NULL,
    hash     bytea NOT NULL CHECK (length(hash) = 32),
    -- For the filters of GET /admin/audit; derived from the hashed entry,
    -- so they cannot disagree with it.
    at       text GENERATED ALWAYS AS (entry::jsonb ->> 'at') STORED,
    action   text GENERATED ALWAYS AS (entry::jsonb ->> 'action') STORED,
    actor    text GENERATED ALWAYS AS (entry::jsonb ->> 'actor') STORED,
    subject  text GENERATED ALWAYS AS (entry::jsonb ->> 'subject') STORED
);
CREATE INDEX audit_log_action_idx ON tenantry.audit_log (action, seq);
CREATE INDEX audit_log_actor_idx ON tenantry.audit_log (actor, seq);
CREATE INDEX audit_log_subject_idx ON tenantry.audit_log (subject, seq);

CREATE FUNCTION tenantry.audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON tenantry.audit_log
    FOR EACH ROW EXECUTE FUNCTION tenantry.audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON tenantry.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry.audit_append_only();
CREATE TRIGGER audit_head_kept BEFORE DELETE ON tenantry.audit_head
    FOR EACH ROW EXECUTE FUNCTION tenantry.audit_append_only();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON tenantry.audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry.audit_append_only();

-- The head only moves forward, one entry at a time.
CREATE FUNCTION tenantry.audit_head_forward() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq <> OLD.seq + 1 THEN
        RAISE EXCEPTION 'the audit chain head only advances by one entry'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_head_forward BEFORE UPDATE ON tenantry.audit_head
    FOR EACH ROW EXECUTE FUNCTION tenantry.audit_head_forward();
