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
-- failure after that transaction rolled back. Written once per tenant per
-- run, on the fleet's hot path, so it carries no foreign keys (each check
-- locks a row: the one run row, shared by every tenant transaction of a run,
-- or the user's) and only the indexes its readers need. Whoever deletes a
-- user deletes its results (`fleet check --repair` does).
CREATE TABLE tenantry.fleet_results (
    run_id        bigint NOT NULL,
    user_id       uuid NOT NULL,
    username      text NOT NULL,
    from_version  integer NOT NULL,
    to_version    integer NOT NULL,
    status        text NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped')),
    error         text,
    -- Filled in by the runner once the tenant committed (NULL if it died first).
    duration_ms   double precision,
    finished_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, user_id)
);
-- `fleet status` counts the pending tenants whose latest attempt failed.
CREATE INDEX fleet_results_failed_idx ON tenantry.fleet_results (user_id, finished_at)
    WHERE status = 'failed';

-- A tenant's history rows, in refinery's format, in its schema. Signup and
-- the fleet both record history through this one function. The schema name
-- arrives as a value and reaches the SQL only through format('%I'). A fixed
-- search_path keeps the callers' cached plans valid from one tenant to the
-- next (a search path change re-plans every cached statement).
CREATE FUNCTION tenantry.record_history(
    p_schema text,
    p_versions integer[],
    p_names text[],
    p_checksums text[]
) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO %I.refinery_schema_history (version, name, applied_on, checksum)
         SELECT v, n, to_char(now() AT TIME ZONE ''UTC'', ''YYYY-MM-DD"T"HH24:MI:SS.US"Z"''), c
         FROM unnest($1, $2, $3) AS h(v, n, c)',
        p_schema)
    USING p_versions, p_names, p_checksums;
END
$$;

-- The first statement of every tenant's migration transaction, after the
-- per-tenant timeouts. A transaction-scoped advisory lock on the tenant (so
-- no two runners, nor a runner and an erasure, work on one tenant at once);
-- under it, a check that the tenant is still at the version the plan was
-- made for (SQLSTATE TY001: moved on already; TY002: gone); then the
-- tenant's history, its registry row and the run's result for it. They are
-- written before the templates run, in the same transaction, so all of it
-- commits or rolls back with the templates: everything exists exactly when
-- the tenant moved. The runner fills in the durations after the run.
CREATE FUNCTION tenantry.fleet_claim(
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
BEGIN
    PERFORM pg_advisory_xact_lock(1953395828, hashtext(p_user_id::text)); -- 'tnt' + id
    SELECT template_version, username INTO current_version, current_username
    FROM tenantry.tenants WHERE user_id = p_user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the tenant no longer exists' USING ERRCODE = 'TY002';
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
