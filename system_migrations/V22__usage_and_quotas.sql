-- Usage and quotas (`tenancy::usage`).
--
-- What each tenant's schema takes on disk (its relations with their indexes
-- and TOAST), as last measured, in a table of its own: a measurement of the
-- whole fleet writes every row of it, and a table nobody else writes keeps
-- that from holding a lock a signup, an erasure or a fleet run waits on.
CREATE TABLE tenantry.tenant_usage (
    user_id      uuid PRIMARY KEY REFERENCES tenantry.tenants (user_id) ON DELETE CASCADE,
    bytes        bigint NOT NULL CHECK (bytes >= 0),
    measured_at  timestamptz NOT NULL
);

-- A tenant's own quota: NULL follows TENANTRY_TENANT_QUOTA_BYTES, 0 is none.
-- `over_quota_since` is set when a measurement finds the tenant over its
-- quota and cleared when one finds it back under: the tenant guard reads it
-- with the rest of the registry row (no extra read per request), and a
-- crossing is seen once.
ALTER TABLE tenantry.tenants
    ADD COLUMN quota_bytes bigint CHECK (quota_bytes >= 0),
    ADD COLUMN over_quota_since timestamptz;

-- What the guard raises for a write to a tenant over its quota (a 403
-- `quota_exceeded`), as `refuse_suspended` does for a suspended account.
CREATE FUNCTION tenantry.refuse_over_quota() RETURNS integer
    LANGUAGE plpgsql VOLATILE
    AS $$
BEGIN
    RAISE EXCEPTION 'the tenant is over its storage quota' USING ERRCODE = 'TQ403';
END
$$;
REVOKE EXECUTE ON FUNCTION tenantry.refuse_over_quota() FROM PUBLIC;
