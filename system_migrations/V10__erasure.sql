-- Erasure (ARCHITECTURE.md, "Erasure"). A tenant being erased is marked
-- 'deleting' first (its requests get 401 from then on); a fleet run skips
-- it like a tenant that is gone.
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
    PERFORM pg_advisory_xact_lock(1953395828, hashtext(p_user_id::text)); -- 'tnt' + id
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
