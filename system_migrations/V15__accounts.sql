-- Accounts for production (ARCHITECTURE.md, "Accounts"): verified email,
-- password reset, email change, suspension, and the outbox their mail goes
-- through.

-- Accounts made before verification existed were never asked to verify:
-- they count as verified (nothing would otherwise stop the unverified-account
-- erasure from removing them).
ALTER TABLE tenantry.users
    ADD COLUMN email_verified_at  timestamptz,
    ADD COLUMN suspended_at       timestamptz,
    ADD COLUMN suspension_reason  text CHECK (length(suspension_reason) <= 500);
UPDATE tenantry.users SET email_verified_at = created_at;
-- The maintenance loop's search for accounts that never verified.
CREATE INDEX users_unverified_idx ON tenantry.users (created_at) WHERE email_verified_at IS NULL;

-- A suspended account (`suspended_at` set: restriction of processing) keeps
-- its data, its tenant's registry row and its sessions; the routing guard's
-- entry statement refuses it by calling this, so the refusal costs no round
-- trip of its own and carries an error of its own (SQLSTATE TS403, which
-- the service answers 403 `account_suspended`) instead of the 401 of a
-- token that enters nothing. VOLATILE, so it is only ever called, never
-- folded into a plan.
CREATE FUNCTION tenantry.refuse_suspended() RETURNS integer
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    RAISE EXCEPTION 'the account is suspended' USING ERRCODE = 'TS403';
END
$$;
REVOKE EXECUTE ON FUNCTION tenantry.refuse_suspended() FROM PUBLIC;

-- One-time tokens mailed to the user: email verification (for the address in
-- `email`, which is the account's own at signup and the new one for an
-- email change) and password reset. Stored only as SHA-256 hashes; single
-- use (`used_at`), short-lived (`expires_at`); purged once expired.
CREATE TABLE tenantry.account_tokens (
    token_hash  bytea PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id     uuid NOT NULL REFERENCES tenantry.users (id) ON DELETE CASCADE,
    purpose     text NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    email       text CHECK (email = lower(email)),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    CHECK ((purpose = 'verify_email') = (email IS NOT NULL))
);
CREATE INDEX account_tokens_user_idx ON tenantry.account_tokens (user_id, purpose);
CREATE INDEX account_tokens_expires_idx ON tenantry.account_tokens (expires_at);

-- The outbox: every message the service sends, written in the transaction of
-- the change that causes it and delivered by `serve` at least once. A sender
-- claims due rows (`claimed_by`, `claimed_until`) with SKIP LOCKED, so two
-- processes never send one row at the same time; a claim that outlives its
-- sender (killed mid-send) expires and the row is sent again. Each claim
-- counts an attempt; after the configured number the row is dead until
-- `tenantry outbox retry`. A delivered row loses its body (which may carry a
-- token) at once and the row itself after the retention period. The user's
-- rows go with the user (erasure).
CREATE TABLE tenantry.outbox (
    id               bigserial PRIMARY KEY,
    channel          text NOT NULL DEFAULT 'mail' CHECK (channel IN ('mail')),
    kind             text NOT NULL CHECK (kind ~ '^[a-z_.]{1,64}$'),
    user_id          uuid REFERENCES tenantry.users (id) ON DELETE CASCADE,
    recipient        text NOT NULL CHECK (length(recipient) <= 320),
    subject          text NOT NULL,
    body             text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claimed_until    timestamptz,
    last_error       text,
    delivered_at     timestamptz,
    dead_at          timestamptz,
    CHECK (delivered_at IS NULL OR dead_at IS NULL),
    CHECK (delivered_at IS NOT NULL OR body IS NOT NULL)
);
CREATE INDEX outbox_due_idx ON tenantry.outbox (channel, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX outbox_delivered_idx ON tenantry.outbox (delivered_at) WHERE delivered_at IS NOT NULL;
CREATE INDEX outbox_user_idx ON tenantry.outbox (user_id);
