-- On Citus a signup commits its tenant's role and empty schema ahead of the
-- rest (Citus propagates a new schema's objects through connections of its
-- own, which cannot see a schema that is not committed yet; see
-- tenancy/provisioning.rs). Each such head start is written down here in
-- the same transaction, and deleted in the transaction that completes the
-- tenant. A row whose signup is gone (its session-level advisory lock is
-- free) is swept: its schema and role dropped, unless a registry row names
-- them. Unused on plain PostgreSQL, where a signup is one transaction.
CREATE TABLE tenantry.pending_tenants (
    username text PRIMARY KEY,
    schema_name text NOT NULL UNIQUE,
    role_name text NOT NULL UNIQUE,
    started_at timestamptz NOT NULL DEFAULT now()
);

-- A fleet migration on Citus runs a tenant's templates as the service; what
-- they made is then given to the tenant's role, as if it had made it:
-- tables, views, materialized views, foreign tables, sequences of their own
-- (a column's sequence follows its table), functions and procedures, and
-- types (enums, domains, composite and range types). The history stays the
-- service's. Names arrive as values and reach SQL only through format('%I')
-- or a regprocedure/regtype's own quoting.
CREATE OR REPLACE FUNCTION tenantry.give_to_tenant(p_schema text, p_role text)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    role_oid oid := to_regrole(quote_ident(p_role));
BEGIN
    FOR r IN
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = p_schema
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND c.relname <> 'refinery_schema_history'
          AND c.relowner <> role_oid
          -- A sequence that belongs to a column goes with its table.
          AND NOT (c.relkind = 'S' AND EXISTS (
              SELECT 1 FROM pg_depend d
              WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
    LOOP
        EXECUTE format('ALTER %s %I.%I OWNER TO %I',
                       CASE r.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                      WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE'
                                      ELSE 'TABLE' END,
                       p_schema, r.relname, p_role);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS routine FROM pg_proc p
        JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = p_schema AND p.proowner <> role_oid
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.routine, p_role);
    END LOOP;
    FOR r IN
        SELECT t.oid::regtype AS type FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = p_schema AND t.typowner <> role_oid
          AND t.typtype IN ('e', 'd', 'r', 'c')
          -- A table's row type goes with its table; a multirange with its range.
          AND (t.typrelid = 0 OR EXISTS (
              SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind = 'c'))
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO %I', r.type, p_role);
    END LOOP;
END
$$;
