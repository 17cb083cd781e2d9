-- What this database runs on: plain PostgreSQL, or a Citus coordinator
-- (each tenant schema a distributed schema on one worker; `reference` as
-- Citus reference tables; the control plane local to the coordinator).
-- Bootstrap sets it when it finds the citus extension in the database.
ALTER TABLE tenantry.installation
    ADD COLUMN mode text NOT NULL DEFAULT 'postgres' CHECK (mode IN ('postgres', 'citus'));

-- On Citus the fleet writes a tenant's history after its templates, so its
-- claim passes no versions: nothing to write then, and the tenant's shards
-- stay untouched by the service until the templates have run.
CREATE OR REPLACE FUNCTION tenantry.record_history(
    p_schema text,
    p_versions integer[],
    p_names text[],
    p_checksums text[]
) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF cardinality(p_versions) = 0 THEN
        RETURN;
    END IF;
    EXECUTE format(
        'INSERT INTO %I.refinery_schema_history (version, name, applied_on, checksum)
         SELECT v, n, to_char(now() AT TIME ZONE ''UTC'', ''YYYY-MM-DD"T"HH24:MI:SS.US"Z"''), c
         FROM unnest($1, $2, $3) AS h(v, n, c)',
        p_schema)
    USING p_versions, p_names, p_checksums;
END
$$;

-- On Citus a fleet migration runs a tenant's templates as the service (a
-- transaction may not touch a tenant's shards as two roles in turn); what
-- they created is then given to the tenant's role, as if it had made it.
-- The history stays the service's. Names arrive as values and reach SQL
-- only through format('%I').
CREATE FUNCTION tenantry.give_to_tenant(p_schema text, p_role text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = p_schema
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND c.relname <> 'refinery_schema_history'
          AND pg_get_userbyid(c.relowner) <> p_role
    LOOP
        EXECUTE format('ALTER %s %I.%I OWNER TO %I',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
                       p_schema, r.relname, p_role);
    END LOOP;
END
$$;
