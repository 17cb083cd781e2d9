-- Request routing and the isolation the database enforces (ARCHITECTURE.md,
-- "Routing").

-- Every tenant request's first statement, in the same round trip as its
-- BEGIN: the tenant's schema and role, read from the registry (never from
-- the token), set transaction-locally, so nothing survives the transaction.
-- No active tenant for the user raises TY401 (the request gets a 401), which
-- also aborts the transaction, so statements pipelined behind this one never
-- run as the service. No SET clause on the function: it would undo the
-- set_config calls on exit; every name is qualified instead.
CREATE FUNCTION tenantry.enter_tenant(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t record;
BEGIN
    SELECT schema_name, role_name, template_version INTO t
    FROM tenantry.tenants
    WHERE user_id = p_user_id AND status = 'active';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no active tenant for this user' USING ERRCODE = 'TY401';
    END IF;
    PERFORM pg_catalog.set_config('search_path',
                                  pg_catalog.quote_ident(t.schema_name) || ', reference', true),
            pg_catalog.set_config('role', t.role_name, true);
    RETURN t.template_version;
END
$$;

-- Close what PUBLIC may do in this database when the service owns it (the
-- embedded default, and the documented DATABASE_URL setup): tenant roles get
-- only what is granted to them. TEMPORARY: a temp table is searched before
-- the tenant's schema and would outlive the request. CONNECT: tenant roles
-- never log in. Schema public: no tenant object belongs there. Otherwise the
-- service says at every start what the database owner should run.
DO $$
BEGIN
    IF pg_catalog.pg_has_role(current_user,
           (SELECT datdba FROM pg_catalog.pg_database WHERE datname = current_database()),
           'MEMBER') THEN
        EXECUTE format('REVOKE TEMPORARY, CONNECT ON DATABASE %I FROM PUBLIC', current_database());
        IF to_regnamespace('public') IS NOT NULL
           AND pg_catalog.pg_has_role(current_user,
                   (SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = 'public'),
                   'MEMBER') THEN
            REVOKE ALL ON SCHEMA public FROM PUBLIC;
        END IF;
    END IF;
END
$$;
