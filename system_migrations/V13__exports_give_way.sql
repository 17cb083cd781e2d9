-- An export of a tenant gives way to an erasure or a fleet migration of it.
-- An export is one long read whose pace is its client's; it holds the
-- tenant's advisory lock (shared) and its tables' locks until it ends. What
-- needs the tenant exclusively takes it through lock_tenant, which ends the
-- tenant's exports (found by their session's application_name, set by
-- tenancy::export) instead of waiting for them, and keeps new ones out while
-- it waits: an export is admitted only through a second advisory lock, the
-- tenant's admission (class 1953395829), taken shared by the export until it
-- holds the tenant's lock, and exclusively by lock_tenant before it ends the
-- exports. Requests in flight are short and are waited for.
CREATE FUNCTION tenantry.lock_tenant(p_user_id uuid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_try_advisory_xact_lock(1953395828, hashtext(p_user_id::text)) THEN -- 'tnt' + id
        RETURN;
    END IF;
    -- No export is admitted from here on; those admitted already hold the
    -- tenant's lock (or wait for it) under their session's name.
    PERFORM pg_advisory_xact_lock(1953395829, hashtext(p_user_id::text));
    -- pg_stat_activity is read once per transaction unless told otherwise.
    PERFORM pg_stat_clear_snapshot();
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE application_name = 'tenantry export ' || p_user_id::text
      AND pid <> pg_backend_pid();
    PERFORM pg_advisory_xact_lock(1953395828, hashtext(p_user_id::text));
END
$$;
-- It ends sessions: the service's alone (tenant roles cannot reach the
-- schema either).
REVOKE EXECUTE ON FUNCTION tenantry.lock_tenant(uuid) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tenantry.fleet_claim(
    p_user_id uuid,
    p_from_version integer,
    p_to_version integer,
    p_run_id bigint,
    p_schema text,
    p_versions integer[],
    p_names text[],
    p_checksums text[]
) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current_version integer;
    current_username text;
    current_status text;
BEGIN
    PERFORM tenantry.lock_tenant(p_user_id);
    SELECT template_version, username, status INTO current_version, current_username, current_status
    FROM tenantry.tenants WHERE user_id = p_user_id;
    IF NOT FOUND OR current_status = 'deleting' THEN
        RAISE EXCEPTION 'the tenant no longer exists (or is being erased)' USING ERRCODE = 'TY002';
    END IF;
    IF current_version <> p_from_version THEN
        RAISE EXCEPTION 'the tenant is at version % already, not %', current_version, p_from_version
            USING ERRCODE = 'TY001';
    END IF;
    PERFORM tenantry.record_history(p_schema, p_versions, p_names, p_checksums);
    UPDATE tenantry.tenants SET template_version = p_to_version, updated_at = now()
    WHERE user_id = p_user_id;
    INSERT INTO tenantry.fleet_results (run_id, user_id, username, from_version, to_version, status)
    VALUES (p_run_id, p_user_id, current_username, p_from_version, p_to_version, 'succeeded');
END
$$;
