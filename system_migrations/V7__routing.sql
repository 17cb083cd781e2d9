-- The isolation the database enforces (ARCHITECTURE.md, "Routing").

-- Close what PUBLIC may do in this database when the service owns it (the
-- embedded default, and the documented DATABASE_URL setup): tenant roles get
-- only what is granted to them. TEMPORARY: a temp table is searched before
-- the tenant's schema and would outlive the request. CONNECT: tenant roles
-- never log in. CREATE on schema public: no tenant object belongs there.
-- USAGE on public stays (the schema holds nothing of ours): without it,
-- every role switch makes the service's next name lookup check its
-- membership in pg_database_owner by walking every role it belongs to, one
-- per tenant (measured: 80 instead of 7,000 transactions/s at 2,200
-- tenants). Otherwise the service says at every start what the database
-- owner should run.
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
            REVOKE CREATE ON SCHEMA public FROM PUBLIC;
        END IF;
    END IF;
END
$$;
