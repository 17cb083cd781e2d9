//! Citus: a database that is a Citus coordinator (the `citus` extension is
//! installed in it) runs Tenantry scaled out. Each tenant schema becomes a
//! distributed schema (one colocated unit on one worker), the `reference`
//! tables become Citus reference tables (a copy on every node, so a
//! tenant's shard joins them locally), and the control plane (`tenantry`)
//! stays in local tables on the coordinator. Plain PostgreSQL is untouched.
//!
//! Citus reaches the workers as the current role, so on Citus tenant roles
//! are `LOGIN` roles without a password: they are usable only where the
//! nodes trust each other's connections (see docs/scaling-out.md).

use postgres_protocol::escape::escape_identifier;

use crate::db::{DbError, Installation};

/// Whether the database has Citus (a coordinator: Tenantry connects to no
/// other node).
pub async fn is_coordinator(
    client: &tokio_postgres::Client,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0))
}

/// Whether the database is a Citus coordinator. If it is: make every
/// `reference` table a reference table (referenced tables first, as Citus
/// requires) and record the mode. Idempotent; runs inside bootstrap's lock.
pub(crate) async fn prepare(client: &tokio_postgres::Client) -> Result<bool, DbError> {
    if !is_coordinator(client).await? {
        return Ok(false);
    }
    // Rounds: each takes the tables whose references (other than to
    // themselves) are all reference tables already. Making a table a
    // reference table turns the local tables that reference it into Citus
    // local tables (`partmethod 'n'`, `repmodel 's'`); they are converted
    // in a later round like the rest.
    loop {
        let ready = client
            .query(
                "SELECT c.oid FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'reference' AND c.relkind = 'r'
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                   WHERE p.logicalrelid = c.oid AND p.repmodel = 't')
                   AND NOT EXISTS (
                       SELECT 1 FROM pg_catalog.pg_constraint f
                       WHERE f.conrelid = c.oid AND f.contype = 'f' AND f.confrelid <> c.oid
                         AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                         WHERE p.logicalrelid = f.confrelid AND p.repmodel = 't'))
                 ORDER BY c.relname",
                &[],
            )
            .await?;
        if ready.is_empty() {
            break;
        }
        for row in ready {
            let oid: u32 = row.get(0);
            client
                .execute(
                    "SELECT pg_catalog.create_reference_table($1::oid::regclass)",
                    &[&oid],
                )
                .await?;
        }
    }
    prepare_guard(client).await?;
    client
        .execute(
            "UPDATE tenantry.installation SET mode = 'citus' WHERE mode <> 'citus'",
            &[],
        )
        .await?;
    Ok(true)
}

/// What the tenant guard reads on a worker ([`enter_on_node`]),
/// present on every node: two Citus reference tables in the schema
/// `tenantry_guard`, kept by triggers on the registry in the same
/// transaction as it (so a worker never lets in a request the coordinator
/// would refuse, once that transaction has committed):
/// - `entries`: one row per user with an active tenant and an enabled
///   account: its token generation, schema, role, and whether it is
///   suspended or over its storage quota;
/// - `revoked`: the sessions (refresh-token families) with a revoked token.
///
/// Its functions (`refuse_suspended`, `refuse_over_quota`, `holds`) are
/// created after the tables, so Citus makes them on every node too. A
/// schema of its own, not `tenantry`: a schema that holds a reference table
/// is one Citus copies to every node with every function made in it, and
/// `tenantry`'s functions read tables that live on the coordinator only.
/// The service owns it; tenant roles have no access (the guard reads it
/// before it takes the tenant's role). Idempotent.
const GUARD: &str = r#"
SET client_min_messages TO warning;
CREATE SCHEMA IF NOT EXISTS tenantry_guard;
REVOKE ALL ON SCHEMA tenantry_guard FROM PUBLIC;
CREATE TABLE IF NOT EXISTS tenantry_guard.entries (
    user_id          uuid PRIMARY KEY,
    token_generation integer NOT NULL,
    schema_name      text NOT NULL,
    role_name        text NOT NULL,
    suspended        boolean NOT NULL,
    over_quota       boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS tenantry_guard.revoked (
    family_id uuid PRIMARY KEY
);
REVOKE ALL ON tenantry_guard.entries, tenantry_guard.revoked FROM PUBLIC;

-- The guard's row of one user, made to agree with the registry: written
-- only when it differs (each write is a transaction on every node).
CREATE OR REPLACE FUNCTION tenantry.guard_sync(uid uuid) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    want tenantry_guard.entries;
    have tenantry_guard.entries;
BEGIN
    -- Its reads must see what committed while it waited for the lock.
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'the registry changes in READ COMMITTED transactions only (the Citus guard''s copy)';
    END IF;
    -- One writer of the copy at a time ('grd'), each reading (a
    -- statement's snapshot, after the lock) what the one before it
    -- committed: two transactions that change different rows of one user
    -- never write a view that misses the other's change. One key for the
    -- whole copy: every write to a reference table locks all of it until
    -- commit anyway, and a key per user would let two transactions take
    -- the two locks in opposite orders.
    PERFORM pg_catalog.pg_advisory_xact_lock(6779492);
    SELECT u.id, u.token_generation, t.schema_name, t.role_name,
           u.suspended_at IS NOT NULL, t.over_quota_since IS NOT NULL
      INTO want
      FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
     WHERE t.user_id = uid AND t.status = 'active' AND u.disabled_at IS NULL;
    SELECT * INTO have FROM tenantry_guard.entries WHERE user_id = uid;
    IF want.user_id IS NULL THEN
        IF have.user_id IS NOT NULL THEN
            DELETE FROM tenantry_guard.entries WHERE user_id = uid;
        END IF;
    ELSIF have.user_id IS NULL OR want IS DISTINCT FROM have THEN
        INSERT INTO tenantry_guard.entries VALUES (want.*)
            ON CONFLICT (user_id) DO UPDATE
            SET token_generation = EXCLUDED.token_generation,
                schema_name = EXCLUDED.schema_name,
                role_name = EXCLUDED.role_name,
                suspended = EXCLUDED.suspended,
                over_quota = EXCLUDED.over_quota;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION tenantry.guard_user_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tenantry.guard_sync(CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tenantry.guard_tenant_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM tenantry.guard_sync(OLD.user_id);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND (TG_OP = 'INSERT' OR NEW.user_id <> OLD.user_id) THEN
        PERFORM tenantry.guard_sync(NEW.user_id);
    END IF;
    RETURN NULL;
END $$;

-- A session revoked: its family joins `revoked`, for good (a revocation is
-- never undone; the rows of families whose tokens are all gone are
-- removed by the purge, `db::citus::forget_revoked`). Logins and purges
-- fire nothing; a family already in (a revoke-all's many tokens) writes
-- nothing. Under the copy's one lock, as `guard_sync`: every writer of
-- the copy takes it first, so none waits for another's table lock while
-- holding its own.
CREATE OR REPLACE FUNCTION tenantry.guard_session_revoked() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM tenantry_guard.revoked WHERE family_id = NEW.family_id) THEN
        PERFORM pg_catalog.pg_advisory_xact_lock(6779492);
        INSERT INTO tenantry_guard.revoked VALUES (NEW.family_id) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
DROP FUNCTION IF EXISTS tenantry.guard_session_changed() CASCADE;

-- At commit (deferred): the copy is written from the transaction's final
-- state, and the reference table's lock (every write to it takes one for
-- the whole table, until commit) is held only while the transaction
-- commits, not through a signup's templates or an erasure's counts. Only
-- changes that matter fire.
DROP TRIGGER IF EXISTS guard ON tenantry.users;
CREATE CONSTRAINT TRIGGER guard AFTER UPDATE OF token_generation, disabled_at, suspended_at
    ON tenantry.users DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.token_generation IS DISTINCT FROM NEW.token_generation
          OR (OLD.disabled_at IS NULL) <> (NEW.disabled_at IS NULL)
          OR (OLD.suspended_at IS NULL) <> (NEW.suspended_at IS NULL))
    EXECUTE FUNCTION tenantry.guard_user_changed();
DROP TRIGGER IF EXISTS guard_deleted ON tenantry.users;
CREATE CONSTRAINT TRIGGER guard_deleted AFTER DELETE
    ON tenantry.users DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION tenantry.guard_user_changed();
DROP TRIGGER IF EXISTS guard ON tenantry.tenants;
CREATE CONSTRAINT TRIGGER guard AFTER UPDATE OF user_id, status, schema_name, role_name, over_quota_since
    ON tenantry.tenants DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.status IS DISTINCT FROM NEW.status
          OR OLD.schema_name IS DISTINCT FROM NEW.schema_name OR OLD.role_name IS DISTINCT FROM NEW.role_name
          OR (OLD.over_quota_since IS NULL) <> (NEW.over_quota_since IS NULL))
    EXECUTE FUNCTION tenantry.guard_tenant_changed();
DROP TRIGGER IF EXISTS guard_made ON tenantry.tenants;
CREATE CONSTRAINT TRIGGER guard_made AFTER INSERT OR DELETE
    ON tenantry.tenants DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION tenantry.guard_tenant_changed();
DROP TRIGGER IF EXISTS guard ON tenantry.refresh_tokens;
CREATE CONSTRAINT TRIGGER guard AFTER UPDATE OF revoked_at
    ON tenantry.refresh_tokens DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION tenantry.guard_session_revoked();
DROP TRIGGER IF EXISTS guard_revoked ON tenantry.refresh_tokens;
CREATE CONSTRAINT TRIGGER guard_revoked AFTER INSERT
    ON tenantry.refresh_tokens DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION tenantry.guard_session_revoked();
"#;

/// `routing`'s ENTER on a Citus worker (`db::direct`): the tenant guard's
/// checks on the registry's copy every node has ([`GUARD`], kept in the
/// registry's own transactions), with its own functions raising the same
/// errors. First of all it checks that this node (Citus group `group`)
/// still holds the shard `$6` the placement map gave for the tenant (a
/// shard keeps its id when it moves): a node that does not is refused
/// (`refuse_elsewhere`, SQLSTATE `TR421`) before anything read from its
/// copy is used (a node taken out of the cluster keeps a copy nobody
/// writes); the service reads the map again and sends the request where
/// the tenant is. It reads the copy before the role changes (the tenant's
/// role may not use `tenantry_guard`).
///
/// `shards`: the node's own placements of `entries` and `revoked`
/// ([`GUARD_SHARDS`]), read by name. A reference table read through Citus
/// is planned by Citus on every execution, which on a worker cost more
/// than the rest of the guard (`scripts/bench-scale`); its placement on
/// a node of the cluster is the same rows (every write reaches every
/// placement in one two-phase commit), read as Citus itself would read
/// them there. Citus removes no node that holds shards, so the check
/// above keeps out the copy of every node whose own metadata was told its
/// tenants left (not that of a node cut off without being told:
/// SECURITY.md, limits). `None` (a node without them yet): the tables,
/// through Citus.
pub fn enter_on_node(group: i32, shards: Option<&(String, String)>) -> String {
    let (entries, revoked) = match shards {
        Some((entries, revoked)) => (entries.as_str(), revoked.as_str()),
        None => ("tenantry_guard.entries", "tenantry_guard.revoked"),
    };
    format!(
        "SELECT CASE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_dist_placement pl
                                WHERE pl.shardid = $6 AND pl.groupid = {group})
                    THEN tenantry_guard.refuse_elsewhere()
                    ELSE 1 / count(*) END AS entered,
        CASE WHEN bool_or(g.suspended) THEN tenantry_guard.refuse_suspended() END AS suspended,
        CASE WHEN $5 AND bool_or(g.over_quota) THEN tenantry_guard.refuse_over_quota() END AS over_quota,
        pg_catalog.set_config('search_path', pg_catalog.quote_ident(max(g.schema_name)) || ', reference', true),
        pg_catalog.set_config('role', max(g.role_name), true),
        pg_catalog.set_config('statement_timeout', $3, true)
 FROM {entries} g
 WHERE g.user_id = $1 AND g.token_generation = $2
   AND NOT EXISTS (SELECT FROM {revoked} r WHERE r.family_id = $4)"
    )
}

/// Each active primary worker, with its placements of the guard's two
/// tables when it has both (`tenantry_guard.entries_<shard id>`: one shard
/// each, the same name on every node) and its Citus group. Never dropped (only emptied and
/// refilled), so the names last as long as the guard.
pub(crate) const GUARD_SHARDS: &str = "SELECT d.nodename::text, d.nodeport,
    (SELECT pg_catalog.shard_name(s.logicalrelid, s.shardid)
       FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
      WHERE s.logicalrelid = pg_catalog.to_regclass('tenantry_guard.entries') AND p.groupid = d.groupid
      LIMIT 1),
    (SELECT pg_catalog.shard_name(s.logicalrelid, s.shardid)
       FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
      WHERE s.logicalrelid = pg_catalog.to_regclass('tenantry_guard.revoked') AND p.groupid = d.groupid
      LIMIT 1)
,
    d.groupid
 FROM pg_catalog.pg_dist_node d
 WHERE d.noderole = 'primary' AND d.isactive AND d.groupid <> 0
 ORDER BY 1, 2";

/// A guard shard's name as [`GUARD_SHARDS`] reads it, if it is one
/// (`tenantry_guard.<table>_<digits>`): nothing else reaches SQL.
pub(crate) fn guard_shard(name: Option<String>, table: &str) -> Option<String> {
    let name = name?;
    let id = name.strip_prefix(&format!("tenantry_guard.{table}_"))?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// What [`GUARD`] is at now: written last (a comment on the schema,
/// `tenantry guard <N>`), so a start cut off half-way, or an older guard,
/// is made again (every step is idempotent); a newer one is left as it is
/// (an older process starting during a rolling upgrade).
const GUARD_VERSION: i32 = 5;

/// The guard's functions on every node (after its tables: see [`GUARD`]).
const GUARD_FUNCTIONS: &str = r#"
SET client_min_messages TO warning;
CREATE OR REPLACE FUNCTION tenantry_guard.refuse_suspended() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'the account is suspended' USING ERRCODE = 'TS403';
END $$;
CREATE OR REPLACE FUNCTION tenantry_guard.refuse_over_quota() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'the tenant is over its storage quota' USING ERRCODE = 'TQ403';
END $$;
-- A request that reached a node that does not hold its tenant (the
-- service's placement map was stale): sent again where the tenant is.
CREATE OR REPLACE FUNCTION tenantry_guard.refuse_elsewhere() RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'this node does not hold the tenant' USING ERRCODE = 'TR421';
END $$;
-- Whether this node holds the tables of the tenant schema `schema` (from
-- Citus's metadata, on every node). Unused since the guard checks one
-- shard instead (cheaper); kept for a process of an earlier release while
-- an upgrade rolls.
CREATE OR REPLACE FUNCTION tenantry_guard.holds(schema text) RETURNS boolean
    LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (
        SELECT FROM pg_catalog.pg_dist_schema ds
          JOIN pg_catalog.pg_dist_partition dp ON dp.colocationid = ds.colocationid
          JOIN pg_catalog.pg_dist_shard sh ON sh.logicalrelid = dp.logicalrelid
          JOIN pg_catalog.pg_dist_placement pl ON pl.shardid = sh.shardid
         WHERE ds.schemaid = pg_catalog.to_regnamespace(schema)
           AND pl.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group));
END $$;
REVOKE ALL ON FUNCTION tenantry_guard.refuse_suspended(), tenantry_guard.refuse_over_quota(),
    tenantry_guard.refuse_elsewhere(), tenantry_guard.holds(text) FROM PUBLIC;
"#;

/// Makes [`GUARD`] (and fills it from the registry) unless it is there.
async fn prepare_guard(client: &tokio_postgres::Client) -> Result<(), DbError> {
    let ready: bool = client
        .query_one(
            "SELECT coalesce(pg_catalog.substring(
                        pg_catalog.obj_description(pg_catalog.to_regnamespace('tenantry_guard'), 'pg_namespace'),
                        '^tenantry guard ([0-9]{1,9})$')::integer, 0) >= $1",
            &[&GUARD_VERSION],
        )
        .await?
        .get(0);
    if ready {
        return Ok(());
    }
    client.batch_execute(GUARD).await?;
    for table in ["tenantry_guard.entries", "tenantry_guard.revoked"] {
        client
            .execute(
                "SELECT pg_catalog.create_reference_table($1::text::regclass)
                 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_dist_partition
                                   WHERE logicalrelid = $1::text::regclass)",
                &[&table],
            )
            .await?;
    }
    client.batch_execute(GUARD_FUNCTIONS).await?;
    // Made again from the registry, whole, in one transaction with the
    // registry's writers held off (SHARE: they wait; readers do not) and
    // the copy's lock taken: rows an older guard left stale go too.
    client
        .batch_execute(
            "BEGIN;
             LOCK TABLE tenantry.users, tenantry.tenants, tenantry.refresh_tokens IN SHARE MODE;
             SELECT pg_catalog.pg_advisory_xact_lock(6779492);
             TRUNCATE tenantry_guard.entries, tenantry_guard.revoked;
             INSERT INTO tenantry_guard.entries
                 SELECT u.id, u.token_generation, t.schema_name, t.role_name,
                        u.suspended_at IS NOT NULL, t.over_quota_since IS NOT NULL
                 FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
                 WHERE t.status = 'active' AND u.disabled_at IS NULL;
             INSERT INTO tenantry_guard.revoked
                 SELECT DISTINCT family_id FROM tenantry.refresh_tokens WHERE revoked_at IS NOT NULL;
             COMMIT;",
        )
        .await?;
    client
        .batch_execute(&format!(
            "COMMENT ON SCHEMA tenantry_guard IS {}",
            postgres_protocol::escape::escape_literal(&format!("tenantry guard {GUARD_VERSION}"))
        ))
        .await?;
    Ok(())
}

/// Citus reaches a tenant's shards on its worker as the tenant's role, so
/// tenant roles (through their group) may connect to the database — on the
/// coordinator that changes nothing (their routes never log in there), on
/// the workers it is what Citus needs. PUBLIC still may not (V7).
/// Propagated to every node by Citus.
pub(crate) async fn allow_tenant_connections(
    client: &tokio_postgres::Client,
    installation: &Installation,
) -> Result<(), DbError> {
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    client
        .batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {} TO {}",
            escape_identifier(&database),
            installation.group_role().quoted()
        ))
        .await?;
    Ok(())
}

/// The guard's `revoked` rows of sessions whose tokens are all gone
/// (purged after they expired): removed, in batches. Nothing on plain
/// PostgreSQL. Returns how many.
pub async fn forget_revoked(
    client: &impl tokio_postgres::GenericClient,
) -> Result<u64, tokio_postgres::Error> {
    let on_citus: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass('tenantry_guard.revoked') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !on_citus {
        return Ok(0);
    }
    let gone: Vec<uuid::Uuid> = client
        .query(
            "SELECT r.family_id FROM tenantry_guard.revoked r
             WHERE NOT EXISTS (SELECT FROM tenantry.refresh_tokens t WHERE t.family_id = r.family_id)
             LIMIT 10000",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if gone.is_empty() {
        return Ok(0);
    }
    client
        .execute(
            "DELETE FROM tenantry_guard.revoked WHERE family_id = ANY($1)",
            &[&gone],
        )
        .await
}

/// Each serial column's sequence of `schema`'s tables moved, on every
/// worker, past the largest value in that worker's range (Citus gives each
/// node a range of its own for inserts made there, which is where direct
/// routing makes them): after an import, whose rows keep their ids, a new
/// row made on a worker never takes an id that a loaded row has. Ids below
/// the range's maximum only: Citus's ranges meet there (a worker's maximum
/// is the next worker's first id).
pub async fn advance_worker_sequences(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<(), String> {
    let columns = client
        .query(
            "SELECT c.relname::text, a.attname::text,
                    pg_catalog.pg_get_serial_sequence(pg_catalog.format('%I.%I', n.nspname, c.relname), a.attname)
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
               AND pg_catalog.pg_get_serial_sequence(pg_catalog.format('%I.%I', n.nspname, c.relname), a.attname) IS NOT NULL",
            &[&schema],
        )
        .await
        .map_err(|e| e.to_string())?;
    for column in &columns {
        let (table, name, sequence): (String, String, String) =
            (column.get(0), column.get(1), column.get(2));
        let failed = client
            .query(
                "SELECT nodename::text || ':' || nodeport || ': ' || result
                 FROM pg_catalog.run_command_on_workers(pg_catalog.format(
                     'DO $advance$ DECLARE lo int8; hi int8; loaded int8; BEGIN
                          SELECT seqmin, seqmax INTO lo, hi FROM pg_catalog.pg_sequence
                           WHERE seqrelid = %L::regclass;
                          SELECT max(t.%I) INTO loaded FROM %I.%I t WHERE t.%I >= lo AND t.%I < hi;
                          IF loaded IS NOT NULL THEN
                              PERFORM pg_catalog.setval(%L::regclass, greatest(loaded, (SELECT last_value FROM %s)));
                          END IF;
                      END $advance$',
                     $4::text, $2::text, $1::text, $3::text, $2::text, $2::text, $4::text, $4::text))
                 WHERE NOT success",
                &[&schema, &name, &table, &sequence],
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(row) = failed.first() {
            return Err(format!(
                "cannot move the sequence {sequence} past the loaded ids on a worker: {}",
                row.get::<_, String>(0)
            ));
        }
    }
    Ok(())
}

/// One node of the cluster, with the tenants it holds.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NodeStatus {
    pub host: String,
    pub port: i32,
    /// `coordinator` or `worker`.
    pub role: &'static str,
    pub active: bool,
    /// Tenant schemas with their tables on this node.
    pub tenants: i64,
    /// The size of those tables' shards.
    pub bytes: i64,
}

/// The nodes of a Citus coordinator's cluster, coordinator first (the
/// caller knows the database is one: `Installation::citus`).
pub async fn cluster_status(
    client: &tokio_postgres::Client,
) -> Result<Vec<NodeStatus>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH placed AS (
                 SELECT sh.nodename, sh.nodeport, n.nspname, sh.shard_size
                 FROM pg_catalog.citus_shards sh
                 JOIN pg_catalog.pg_class c ON c.oid = sh.table_name
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 JOIN tenantry.tenants t ON t.schema_name = n.nspname)
             SELECT d.nodename::text, d.nodeport, d.groupid = 0, d.isactive,
                    count(DISTINCT p.nspname), coalesce(sum(p.shard_size), 0)::int8
             FROM pg_catalog.pg_dist_node d
             LEFT JOIN placed p ON p.nodename = d.nodename AND p.nodeport = d.nodeport
             WHERE d.noderole = 'primary'
             GROUP BY 1, 2, 3, 4
             ORDER BY 3 DESC, 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| NodeStatus {
            host: r.get(0),
            port: r.get(1),
            role: if r.get(2) { "coordinator" } else { "worker" },
            active: r.get(3),
            tenants: r.get(4),
            bytes: r.get(5),
        })
        .collect())
}

/// The node that holds a tenant schema's tables (one colocated unit), if
/// any is placed: from Citus's metadata alone (no shard sizes asked of the
/// workers).
pub async fn placement(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<Option<(String, i32)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT d.nodename::text, d.nodeport
             FROM pg_catalog.pg_dist_shard s
             JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
             JOIN pg_catalog.pg_dist_node d ON d.groupid = p.groupid AND d.noderole = 'primary'
             JOIN pg_catalog.pg_class c ON c.oid = s.logicalrelid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 LIMIT 1",
            &[&schema],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// `HOST:PORT`, as `cluster status` shows a node.
pub fn parse_node(node: &str) -> Option<(String, i32)> {
    let (host, port) = node.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?)).filter(|(h, _)| !h.is_empty())
}

/// How moves go: `force_logical` (online, writes continue) when
/// `wal_level` is `logical`, else `block_writes` (the moving tenant's only).
pub async fn move_mode(
    client: &tokio_postgres::Client,
) -> Result<&'static str, tokio_postgres::Error> {
    let level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?
        .get(0);
    Ok(if level == "logical" {
        "force_logical"
    } else {
        "block_writes"
    })
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}:{1} is not a worker of this cluster")]
    NotAWorker(String, i32),
    #[error("{0} has no tables placed")]
    NotPlaced(String),
    #[error("tenant {0} is {1}, not active: it is not moved")]
    NotActive(String, String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// A tenant's move, checked and ready: where its tables are, where they
/// go, and whether it goes online. The CLI says this before it starts.
#[derive(Debug)]
pub struct MovePlan {
    pub user_id: uuid::Uuid,
    pub username: String,
    pub schema: String,
    pub from: (String, i32),
    pub to: (String, i32),
    pub online: bool,
}

impl MovePlan {
    /// `to` must be a worker; the tenant's tables are found where they are.
    pub async fn new(
        client: &tokio_postgres::Client,
        tenant: &crate::tenants::TenantInfo,
        to: (String, i32),
    ) -> Result<MovePlan, MoveError> {
        let schema = tenant.schema.as_str();
        let nodes = cluster_status(client).await?;
        if !nodes
            .iter()
            .any(|n| n.role == "worker" && n.host == to.0 && n.port == to.1)
        {
            return Err(MoveError::NotAWorker(to.0, to.1));
        }
        let from = placement(client, schema)
            .await?
            .ok_or_else(|| MoveError::NotPlaced(schema.to_owned()))?;
        Ok(MovePlan {
            user_id: tenant.user_id,
            username: tenant.username.clone(),
            schema: schema.to_owned(),
            from,
            to,
            online: move_mode(client).await? == "force_logical",
        })
    }

    /// Whether the tenant is there already.
    pub fn done_already(&self) -> bool {
        self.from == self.to
    }

    /// Move the schema (all its tables, one colocated unit): Citus copies
    /// it and switches over; requests keep routing through the coordinator.
    ///
    /// Under the tenant's advisory lock, shared (`db::TENANT_LOCK_CLASS`,
    /// session-level, for the whole move): requests, which take it shared
    /// too, go on; a fleet migration or an erasure of the tenant, which take
    /// it exclusively, wait for the move, and the move waits for them. A
    /// tenant that is not active (being erased) is not moved.
    pub async fn execute(&self, client: &tokio_postgres::Client) -> Result<(), MoveError> {
        if self.done_already() {
            return Ok(());
        }
        let key = self.user_id.to_string();
        client
            .execute(
                "SELECT pg_catalog.pg_advisory_lock_shared($1, pg_catalog.hashtext($2))",
                &[&crate::db::TENANT_LOCK_CLASS, &key],
            )
            .await?;
        let moved = self.execute_locked(client).await;
        client
            .execute(
                "SELECT pg_catalog.pg_advisory_unlock_shared($1, pg_catalog.hashtext($2))",
                &[&crate::db::TENANT_LOCK_CLASS, &key],
            )
            .await?;
        moved
    }

    async fn execute_locked(&self, client: &tokio_postgres::Client) -> Result<(), MoveError> {
        let status: Option<String> = client
            .query_opt(
                "SELECT status FROM tenantry.tenants WHERE user_id = $1",
                &[&self.user_id],
            )
            .await?
            .map(|r| r.get(0));
        match status.as_deref() {
            Some("active") => {}
            other => {
                return Err(MoveError::NotActive(
                    self.username.clone(),
                    other.unwrap_or("gone").to_owned(),
                ))
            }
        }
        let mode = if self.online {
            "force_logical"
        } else {
            "block_writes"
        };
        client
            .execute(
                &format!(
                    "SELECT pg_catalog.citus_schema_move($1::text::regnamespace, $2::text, $3::int4,
                                                         shard_transfer_mode => {})",
                    mode_literal(mode)
                ),
                &[&self.schema, &self.to.0, &self.to.1],
            )
            .await?;
        Ok(())
    }
}

/// How a rebalance ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rebalance {
    /// Citus's background job (none when nothing needed moving).
    pub job: Option<i64>,
    /// Tenant moves (shard-group moves) the job made.
    pub moves: i64,
    /// `finished`, `failed`, `cancelled`, or `balanced` when there was nothing to do.
    pub state: String,
}

/// Start Citus's rebalancer (whole tenants move, in the background); the
/// job's id, or `None` when nothing needs moving.
pub async fn rebalance_start(
    client: &tokio_postgres::Client,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let mode = move_mode(client).await?;
    Ok(client
        .query_one(
            &format!(
                "SELECT pg_catalog.citus_rebalance_start(shard_transfer_mode => {})",
                mode_literal(mode)
            ),
            &[],
        )
        .await?
        .get(0))
}

/// A transfer mode as an untyped SQL literal, which takes the type of the
/// function's parameter: naming that type (`citus.shard_transfer_mode`)
/// needs USAGE on schema `citus`, which a service role that is not a
/// superuser does not have.
fn mode_literal(mode: &str) -> &'static str {
    match mode {
        "force_logical" => "'force_logical'",
        _ => "'block_writes'",
    }
}

/// A rebalance job's progress.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RebalanceProgress {
    pub job_id: i64,
    /// Citus's job state: `scheduled`, `running`, `finished`, `failed`, …
    pub state: String,
    /// Moves done and planned.
    pub done: i64,
    pub total: i64,
}

impl RebalanceProgress {
    pub fn ended(&self) -> bool {
        matches!(self.state.as_str(), "finished" | "failed" | "cancelled")
    }
}

/// Where a rebalance job is; `None` for an unknown job.
pub async fn rebalance_progress(
    client: &tokio_postgres::Client,
    job: i64,
) -> Result<Option<RebalanceProgress>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT j.state::text,
                    (SELECT count(*) FROM pg_catalog.pg_dist_background_task t
                     WHERE t.job_id = j.job_id AND t.status = 'done'),
                    (SELECT count(*) FROM pg_catalog.pg_dist_background_task t
                     WHERE t.job_id = j.job_id)
             FROM pg_catalog.pg_dist_background_job j
             WHERE j.job_id = $1 AND j.job_type = 'rebalance'",
            &[&job],
        )
        .await?
        .map(|row| RebalanceProgress {
            job_id: job,
            state: row.get(0),
            done: row.get(1),
            total: row.get(2),
        }))
}

/// Even out the tenants over the workers and wait for it, calling
/// `progress(done, total)` as moves complete.
pub async fn rebalance(
    client: &tokio_postgres::Client,
    progress: &(dyn Fn(i64, i64) + Sync),
) -> Result<Rebalance, tokio_postgres::Error> {
    let Some(job) = rebalance_start(client).await? else {
        return Ok(Rebalance {
            job: None,
            moves: 0,
            state: "balanced".into(),
        });
    };
    let mut last = (-1, -1);
    loop {
        let Some(now) = rebalance_progress(client, job).await? else {
            return Ok(Rebalance {
                job: Some(job),
                moves: last.0.max(0),
                state: "vanished".into(),
            });
        };
        if (now.done, now.total) != last {
            progress(now.done, now.total);
            last = (now.done, now.total);
        }
        if now.ended() {
            return Ok(Rebalance {
                job: Some(job),
                moves: now.done,
                state: now.state,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_guard_shards_name_reaches_the_guards_sql() {
        let ok = |name: &str, table| guard_shard(Some(name.into()), table);
        assert_eq!(
            ok("tenantry_guard.entries_102014", "entries").as_deref(),
            Some("tenantry_guard.entries_102014")
        );
        for (name, table) in [
            ("tenantry_guard.entries_102014", "revoked"),
            ("tenantry_guard.entries_", "entries"),
            ("tenantry_guard.entries_1; DROP TABLE x", "entries"),
            ("\"tenantry_guard\".entries_1", "entries"),
            ("public.entries_1", "entries"),
            ("tenantry_guard.entries_1x", "entries"),
        ] {
            assert_eq!(ok(name, table), None, "{name}");
        }
        assert_eq!(guard_shard(None, "entries"), None);
    }

    #[test]
    fn a_node_without_the_guards_placements_reads_its_tables_through_citus() {
        let sql = enter_on_node(3, None);
        assert!(sql.contains("FROM tenantry_guard.entries g"), "{sql}");
        assert!(sql.contains("FROM tenantry_guard.revoked r"), "{sql}");
        assert!(sql.contains("pl.groupid = 3"), "{sql}");
        let shards = (
            "tenantry_guard.entries_7".into(),
            "tenantry_guard.revoked_8".into(),
        );
        let sql = enter_on_node(3, Some(&shards));
        assert!(sql.contains("FROM tenantry_guard.entries_7 g"), "{sql}");
        assert!(sql.contains("FROM tenantry_guard.revoked_8 r"), "{sql}");
    }
}
