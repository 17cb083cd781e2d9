-- Fleet migrations: the template set this database has applied, the runs
-- that rolled versions out, and each tenant's result in each run.

-- The applied template set. `serve` and `fleet migrate` refuse a binary
-- whose templates disagree with it (a changed checksum, a missing version).
CREATE TABLE tenantry.templates (
    version      integer PRIMARY KEY CHECK (version >= 1),
    name         text NOT NULL,
    checksum     text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per `fleet migrate` (or POST /admin/fleet/migrations). Only one
-- runs at a time: the runner holds a session-level advisory lock for the
-- whole run, so a crashed runner's lock dies with it; a row still
-- 'running' whose lock is free was interrupted.
CREATE TABLE tenantry.fleet_runs (
    id              bigserial PRIMARY KEY,
    started_by      text NOT NULL,
    target_version  integer NOT NULL CHECK (target_version >= 1),
    concurrency     integer NOT NULL CHECK (concurrency >= 1),
    canary          integer NOT NULL CHECK (canary >= 0),
    max_failures    integer CHECK (max_failures >= 1),
    only_tenant     text,
    status          text NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'succeeded', 'failed', 'aborted', 'interrupted')),
    reason          text,
    planned         integer NOT NULL CHECK (planned >= 0),
    succeeded       integer NOT NULL DEFAULT 0,
    failed          integer NOT NULL DEFAULT 0,
    skipped         integer NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX fleet_runs_started_at_idx ON tenantry.fleet_runs (started_at DESC);

-- A tenant's result in a run. A success is written in the tenant's own
-- migration transaction (so it exists exactly when the tenant moved); a
-- failure after that transaction rolled back.
CREATE TABLE tenantry.fleet_results (
    run_id        bigint NOT NULL REFERENCES tenantry.fleet_runs (id) ON DELETE CASCADE,
    user_id       uuid NOT NULL REFERENCES tenantry.users (id) ON DELETE CASCADE,
    username      text NOT NULL,
    from_version  integer NOT NULL,
    to_version    integer NOT NULL,
    status        text NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped')),
    error         text,
    duration_ms   double precision NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, user_id)
);
CREATE INDEX fleet_results_user_idx ON tenantry.fleet_results (user_id);

-- The first statement of every tenant's migration transaction: per-tenant
-- timeouts, then a transaction-scoped advisory lock on the tenant (so no two
-- runners, nor a runner and an erasure, work on one tenant at once), then a
-- check, under that lock, that the tenant is still at the version the plan
-- was made for. SQLSTATE TY001: moved on already; TY002: gone.
CREATE FUNCTION tenantry.fleet_claim(
    p_user_id uuid,
    p_from_version integer,
    p_lock_timeout text,
    p_statement_timeout text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    current_version integer;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM set_config('statement_timeout', p_statement_timeout, true);
    PERFORM pg_advisory_xact_lock(1953395828, hashtext(p_user_id::text)); -- 'tnt' + id
    SELECT template_version INTO current_version
    FROM tenantry.tenants WHERE user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the tenant no longer exists' USING ERRCODE = 'TY002';
    END IF;
    IF current_version <> p_from_version THEN
        RAISE EXCEPTION 'the tenant is at version % already, not %', current_version, p_from_version
            USING ERRCODE = 'TY001';
    END IF;
END
$$;
