//! Bringing a database up to date: the service role and database of the
//! embedded cluster (as its superuser, the only thing the superuser does),
//! then, as the service, the control plane, the group role and the layout
//! every tenant schema must have.

use postgres_protocol::escape::escape_identifier;
use tokio_postgres::error::SqlState;

use crate::db::{Connector, DbError, Dedicated};
use crate::domain::{InstallationId, RoleName, SchemaName};
use crate::embedded::{self, Cluster, Running};

mod system {
    refinery::embed_migrations!("system_migrations");
}

/// Key of the advisory lock that serialises bootstraps of one database (two
/// processes starting at once must not both run the migrations or race on
/// `CREATE SCHEMA IF NOT EXISTS`, which is not concurrency-safe).
pub const BOOTSTRAP_LOCK: i64 = 0x7465_6e61_6e74_7279; // "tenantry"

/// The embedded cluster's superuser, over its socket (its only use).
async fn superuser(
    cluster: &Cluster,
    running: &Running,
    dbname: &str,
) -> Result<crate::db::Connection, DbError> {
    Connector::embedded(cluster.pg_config(running, dbname), cluster.clone())
        .connect(Dedicated::Command)
        .await
}

/// As the embedded cluster's superuser: create the service role (LOGIN,
/// CREATEROLE, not a superuser) and the `tenantry` database it owns. A
/// database made by an older version, when everything ran as the
/// superuser, is handed over to the service role ([`ADOPT`]).
pub(crate) async fn prepare_embedded(cluster: &Cluster, running: &Running) -> Result<(), DbError> {
    let client = superuser(cluster, running, "postgres").await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    let service = escape_identifier(embedded::SERVICE_ROLE);
    let database = escape_identifier(embedded::DATABASE_NAME);
    let role_exists = client
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&embedded::SERVICE_ROLE],
        )
        .await?
        .is_some();
    if !role_exists {
        client
            .batch_execute(&format!(
                "CREATE ROLE {service} LOGIN CREATEROLE NOSUPERUSER NOCREATEDB"
            ))
            .await?;
    }
    let owner: Option<String> = client
        .query_opt(
            "SELECT datdba::regrole::text FROM pg_database WHERE datname = $1",
            &[&embedded::DATABASE_NAME],
        )
        .await?
        .map(|row| row.get(0));
    match owner {
        None => {
            client
                .batch_execute(&format!("CREATE DATABASE {database} OWNER {service}"))
                .await?
        }
        Some(owner) if owner != embedded::SERVICE_ROLE => {
            tracing::info!("handing the tenantry database over to the service role");
            client
                .batch_execute(&format!("ALTER DATABASE {database} OWNER TO {service}"))
                .await?;
            let tenantry = superuser(cluster, running, embedded::DATABASE_NAME).await?;
            tenantry.batch_execute(ADOPT).await?;
            // The superuser made each tenant's history table: hand them over
            // one by one (one transaction for all could run out of locks).
            let has_registry: bool = tenantry
                .query_one("SELECT to_regclass('tenantry.tenants') IS NOT NULL", &[])
                .await?
                .get(0);
            let schemas = if has_registry {
                tenantry
                    .query("SELECT schema_name FROM tenantry.tenants", &[])
                    .await?
            } else {
                Vec::new()
            };
            for row in schemas {
                if let Ok(schema) = SchemaName::parse(row.get(0)) {
                    tenantry
                        .batch_execute(&format!(
                            "ALTER TABLE IF EXISTS {s}.{h} OWNER TO {service}",
                            s = schema.quoted(),
                            h = crate::db::HISTORY_TABLE,
                        ))
                        .await?;
                }
            }
        }
        Some(_) => {}
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    Ok(())
}

/// Hand a database that an older version built as the superuser to the
/// service role: the control-plane and reference schemas with what is in
/// them, and membership (with ADMIN OPTION) in this installation's roles, so
/// that the service can act as each tenant and manage them. Tenant schemas
/// are then re-owned by the service's own bootstrap ([`adopt_tenant`]).
const ADOPT: &str = r#"
DO $$
DECLARE
    svc text := 'tenantry_service';
    r record;
BEGIN
    FOR r IN SELECT nspname FROM pg_namespace WHERE nspname IN ('tenantry', 'reference') LOOP
        EXECUTE format('ALTER SCHEMA %I OWNER TO %I', r.nspname, svc);
    END LOOP;
    -- Tables take their indexes and owned sequences with them.
    FOR r IN SELECT c.oid::regclass AS rel FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname IN ('tenantry', 'reference') AND c.relkind IN ('r', 'p', 'v', 'm') LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO %I', r.rel, svc);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'tenantry' LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %I', r.f, svc);
    END LOOP;
    IF to_regclass('tenantry.installation') IS NOT NULL THEN
        FOR r IN SELECT rolname FROM pg_roles
                 WHERE starts_with(rolname, 'tnt_' || (SELECT id FROM tenantry.installation) || '_') LOOP
            EXECUTE format('GRANT %I TO %I WITH ADMIN OPTION', r.rolname, svc);
        END LOOP;
    END IF;
END
$$;
"#;

/// What the bootstrap learnt about this database, needed to provision.
#[derive(Debug, Clone)]
pub struct Installation {
    pub id: InstallationId,
    /// Whether the service's own role is a superuser (then it needs no
    /// membership in tenant roles to act as them). Warned about at start.
    pub superuser: bool,
    /// Whether the database is a Citus coordinator (`tenantry.installation.
    /// mode`): tenant schemas are then distributed schemas, tenant roles can
    /// log in (Citus reaches the workers as the current role).
    pub citus: bool,
    /// How many router roles the request pool logs in as
    /// (`tenantry.installation.routers`, set by `serve`: `db::routers`);
    /// 0: none. A tenant role made now is granted to its router.
    pub routers: usize,
}

impl Installation {
    pub fn group_role(&self) -> RoleName {
        self.id.group_role()
    }
}

/// Bring the system schema up to date, make sure the tenants' group role
/// exists with read access to `reference`, and that every tenant schema has
/// today's layout. Idempotent; safe when several processes start at once.
/// Returns the installation and the names of the migrations applied now.
#[tracing::instrument(skip_all)]
pub async fn bootstrap(
    client: &mut tokio_postgres::Client,
) -> Result<(Installation, Vec<String>), DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    let result = bootstrap_locked(client).await;
    // Unlock even when the bootstrap failed; the connection may be reused.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&BOOTSTRAP_LOCK])
        .await;
    let installation = result?;
    unlock?;
    Ok(installation)
}

async fn bootstrap_locked(
    client: &mut tokio_postgres::Client,
) -> Result<(Installation, Vec<String>), DbError> {
    client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE SCHEMA IF NOT EXISTS tenantry;
             CREATE SCHEMA IF NOT EXISTS reference;",
        )
        .await?;
    let report = system::migrations::runner()
        .set_migration_table_name("tenantry.refinery_schema_history")
        .run_async(client)
        .await?;
    let mut applied = Vec::new();
    for m in report.applied_migrations() {
        tracing::info!(
            version = m.version(),
            name = m.name(),
            "applied system migration"
        );
        applied.push(format!("V{}__{}", m.version(), m.name()));
    }
    let row = client
        .query_one(
            "SELECT i.id, current_setting('is_superuser') = 'on', i.routers FROM tenantry.installation i",
            &[],
        )
        .await?;
    let id: String = row.get(0);
    let citus = crate::db::citus::prepare(client).await?;
    let installation = Installation {
        id: InstallationId::parse(&id)
            .map_err(|e| DbError::Corrupt(format!("bad tenantry.installation row: {e}")))?,
        superuser: row.get(1),
        citus,
        routers: if citus {
            0
        } else {
            usize::try_from(row.get::<_, i32>(2)).unwrap_or(0)
        },
    };
    let created = ensure_group(client, &installation).await?;
    if installation.citus {
        crate::db::citus::allow_tenant_connections(client, &installation).await?;
    }
    grant_reference(client, &installation, created || !applied.is_empty()).await?;
    adopt_tenants(client, &installation).await?;
    warn_about_privileges(client, &installation).await?;
    Ok((installation, applied))
}

/// The group role every tenant role joins (one role carries every shared
/// grant: per-tenant GRANTs on the same object from concurrent signups fail
/// with "tuple concurrently updated"). Its name, `tnt_<id>__tenants`, is one
/// that no username can produce (usernames have no `__`); an older
/// installation's `tnt_<id>_tenants`, which the username `tenants` would
/// have collided with, is renamed. Returns whether it was created now.
async fn ensure_group(
    client: &tokio_postgres::Client,
    installation: &Installation,
) -> Result<bool, DbError> {
    let group = installation.group_role();
    let exists = |name: String| async move {
        client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .map(|row| row.is_some())
    };
    if exists(group.as_str().to_owned()).await? {
        return Ok(false);
    }
    let legacy = format!("tnt_{}_tenants", installation.id.as_str());
    let legacy_is_group = exists(legacy.clone()).await?
        && client
            .query_opt(
                "SELECT 1 FROM tenantry.tenants WHERE role_name = $1",
                &[&legacy],
            )
            .await?
            .is_none();
    if legacy_is_group {
        client
            .batch_execute(&format!(
                "ALTER ROLE {} RENAME TO {}",
                escape_identifier(&legacy),
                group.quoted()
            ))
            .await?;
        return Ok(false);
    }
    match client
        .batch_execute(&format!("CREATE ROLE {} NOLOGIN", group.quoted()))
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Read access to `reference` for the group. Granted when the group is new,
/// a system migration ran (which may have added reference tables) or the
/// grant is missing, not on every start: a GRANT waits behind concurrent
/// signups (they hold a lock on the group role until they commit), and
/// checking every table's privileges costs a scan of pg_class, which grows
/// with every tenant.
///
/// `USAGE` on the schema (looking names up in it, not reading its tables)
/// also goes to `PUBLIC`: `reference` is on every tenant's search path, and
/// PostgreSQL checks `USAGE` on each schema of the path whenever the role
/// changes, that is at every routed request. Held only through the group,
/// that check walks the tenant role's memberships, which PostgreSQL 15
/// looks up by a linear search of a per-backend cache that grows with every
/// tenant role the connection has served: measured with pgbench at 2,000 tenants, 3,350
/// routed reads/s through the group, 4,350 with `PUBLIC`. Nobody gains
/// access by it: `PUBLIC` cannot connect to the database (V7, and
/// [`warn_about_privileges`] at every start) and the tables stay readable by
/// the group only.
async fn grant_reference(
    client: &tokio_postgres::Client,
    installation: &Installation,
    changed: bool,
) -> Result<(), DbError> {
    let group = installation.group_role();
    let usage: bool = client
        .query_one(
            "SELECT count(*) = 2 FROM pg_namespace n, aclexplode(n.nspacl) a
             WHERE n.nspname = 'reference' AND a.privilege_type = 'USAGE'
               AND a.grantee IN ($1::text::regrole, 0)",
            &[&group.as_str()],
        )
        .await?
        .get(0);
    if changed || !usage {
        client
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA reference TO {g}, PUBLIC;
                 GRANT SELECT ON ALL TABLES IN SCHEMA reference TO {g};",
                g = group.quoted()
            ))
            .await?;
    }
    Ok(())
}

/// Tenant schemas made by an older version belong to their tenant role,
/// which could then drop its own migration history (a schema's owner may
/// drop anything in it). Today the schema and its history belong to the
/// service and the tenant role has USAGE and CREATE on it; bring older ones
/// to that layout, one tenant per transaction. One indexed catalog query
/// when there is nothing to do.
async fn adopt_tenants(
    client: &mut tokio_postgres::Client,
    installation: &Installation,
) -> Result<(), DbError> {
    let rows = client
        .query(
            "SELECT t.schema_name, t.role_name FROM tenantry.tenants t
             JOIN pg_namespace n ON n.nspname = t.schema_name
             WHERE n.nspowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    for row in rows {
        let (Ok(schema), Ok(role)) = (SchemaName::parse(row.get(0)), RoleName::parse(row.get(1)))
        else {
            continue;
        };
        let membership = if installation.superuser {
            String::new()
        } else {
            format!("GRANT {r} TO CURRENT_USER;", r = role.quoted())
        };
        let tx = client.transaction().await?;
        let moved = tx
            .batch_execute(&format!(
                "{membership}
                 ALTER SCHEMA {s} OWNER TO CURRENT_USER;
                 GRANT USAGE, CREATE ON SCHEMA {s} TO {r};
                 ALTER TABLE {s}.{h} OWNER TO CURRENT_USER;
                 REVOKE ALL ON {s}.{h} FROM {r};",
                s = schema.quoted(),
                r = role.quoted(),
                h = crate::db::HISTORY_TABLE,
            ))
            .await;
        match moved {
            Ok(()) => {
                tx.commit().await?;
                tracing::info!(schema = %schema, "tenant schema handed to the service role");
            }
            // Made by a role we cannot act as (a superuser, say): the tenant
            // keeps working as before; say what to run.
            Err(e) => {
                tx.rollback().await?;
                tracing::warn!(
                    schema = %schema,
                    error = %e,
                    "cannot take over this tenant schema; as a superuser run: ALTER SCHEMA {s} OWNER TO <service role>; ALTER TABLE {s}.{h} OWNER TO <service role>; GRANT USAGE, CREATE ON SCHEMA {s} TO {r}",
                    s = schema.quoted(),
                    r = role.quoted(),
                    h = crate::db::HISTORY_TABLE,
                );
            }
        }
    }
    Ok(())
}

/// Say at every start what weakens isolation and what to run about it.
async fn warn_about_privileges(
    client: &tokio_postgres::Client,
    installation: &Installation,
) -> Result<(), DbError> {
    if installation.superuser {
        tracing::warn!(
            "connected as a superuser: tenant isolation does not depend on it, but a service \
             that is compromised could do anything; connect as a role with LOGIN CREATEROLE that \
             owns the database (README.md, \"Running on your own PostgreSQL\")"
        );
    }
    let row = client
        .query_one(
            "SELECT has_database_privilege('public', current_database(), 'TEMPORARY'),
                    has_database_privilege('public', current_database(), 'CONNECT'),
                    COALESCE(has_schema_privilege('public', to_regnamespace('public')::oid, 'CREATE'), false)",
            &[],
        )
        .await?;
    let (temp, connect, create): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if temp || connect || create {
        tracing::warn!(
            temporary = temp,
            connect,
            create_in_public = create,
            "PUBLIC keeps privileges that tenant roles should not have; as the database owner run: \
             REVOKE TEMPORARY, CONNECT ON DATABASE <db> FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        );
    }
    Ok(())
}
