//! Drift between the registry (`tenantry.tenants`, `tenantry.users`) and the
//! catalog (schemas, roles, each tenant's history). A crash cannot cause
//! drift (a tenant is created and changed in one transaction), but a hand
//! edit or an older tool can; `fleet check` finds it and `--repair` removes
//! the orphans — never a schema that a registry row names. A Citus signup's
//! head start (`tenantry.pending_tenants`, see `provisioning`) is not drift
//! while its signup runs; `--repair` sweeps those whose signup is gone.

use postgres_protocol::escape::escape_identifier;
use serde::Serialize;
use tokio_postgres::Client;

use crate::db::Installation;
use crate::domain::{RoleName, SchemaName};
use crate::tenancy::apply::HISTORY_TABLE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// A `tenant_…` schema no registry row names.
    OrphanSchema,
    /// A `tnt_<installation>_…` role no registry row names.
    OrphanRole,
    /// A registry row whose schema is gone.
    MissingSchema,
    /// A registry row whose role is gone.
    MissingRole,
    /// A tenant whose history's latest version is not the registry's.
    HistoryMismatch,
    /// A user account (role `user`) without a tenant.
    UserWithoutTenant,
}

impl DriftKind {
    /// Whether `--repair` removes it. The others need a person: the
    /// registry names data that is gone or disagrees with it.
    pub fn repairable(self) -> bool {
        matches!(
            self,
            DriftKind::OrphanSchema | DriftKind::OrphanRole | DriftKind::UserWithoutTenant
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub kind: DriftKind,
    /// The schema, role or username concerned.
    pub name: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    pub drift: Vec<Drift>,
    /// What `--repair` removed.
    pub repaired: Vec<Drift>,
    /// What is left after repair.
    pub remaining: usize,
    /// Killed Citus signups whose head start `--repair` removed.
    pub swept_signups: u64,
}

/// Everything `fleet check` compares, tenant histories included.
pub async fn find_drift(
    client: &Client,
    installation: &Installation,
) -> Result<Vec<Drift>, tokio_postgres::Error> {
    let mut drift = catalog_drift(client, installation).await?;
    drift.extend(history_drift(client).await?);
    Ok(drift)
}

/// The catalog-level part (a few queries, whatever the fleet's size): what
/// `fleet status` counts.
pub async fn catalog_drift(
    client: &Client,
    installation: &Installation,
) -> Result<Vec<Drift>, tokio_postgres::Error> {
    let prefix = format!("tnt_{}_", installation.id.as_str());
    let group = installation.group_role();
    let mut out = Vec::new();
    for row in client
        .query(
            "SELECT n.nspname::text FROM pg_namespace n
             WHERE n.nspname LIKE 'tenant\\_%'
               AND NOT EXISTS (SELECT 1 FROM tenantry.tenants t WHERE t.schema_name = n.nspname)
               AND NOT EXISTS (SELECT 1 FROM tenantry.pending_tenants p WHERE p.schema_name = n.nspname)
               AND NOT EXISTS (SELECT 1 FROM tenantry.spare_roles s WHERE s.schema_name = n.nspname)
             ORDER BY 1",
            &[],
        )
        .await?
    {
        out.push(Drift {
            kind: DriftKind::OrphanSchema,
            name: row.get(0),
            detail: "a tenant schema that no registry row names".into(),
        });
    }
    for row in client
        .query(
            "SELECT r.rolname::text FROM pg_roles r
             WHERE starts_with(r.rolname, $1) AND r.rolname <> $2
               AND NOT EXISTS (SELECT 1 FROM tenantry.tenants t WHERE t.role_name = r.rolname)
               AND NOT EXISTS (SELECT 1 FROM tenantry.pending_tenants p WHERE p.role_name = r.rolname)
               AND NOT EXISTS (SELECT 1 FROM tenantry.spare_roles s WHERE s.role_name = r.rolname)
               AND NOT starts_with(r.rolname, $3)
             ORDER BY 1",
            &[&prefix, &group.as_str(), &installation.id.router_prefix()],
        )
        .await?
    {
        out.push(Drift {
            kind: DriftKind::OrphanRole,
            name: row.get(0),
            detail: "a tenant role of this installation that no registry row names".into(),
        });
    }
    for row in client
        .query(
            "SELECT t.username, t.schema_name,
                    EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = t.schema_name),
                    t.role_name,
                    EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = t.role_name)
             FROM tenantry.tenants t
             WHERE NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = t.schema_name)
                OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = t.role_name)
             ORDER BY t.username",
            &[],
        )
        .await?
    {
        let username: String = row.get(0);
        if !row.get::<_, bool>(2) {
            out.push(Drift {
                kind: DriftKind::MissingSchema,
                name: row.get(1),
                detail: format!("tenant {username} is registered but its schema is gone"),
            });
        }
        if !row.get::<_, bool>(4) {
            out.push(Drift {
                kind: DriftKind::MissingRole,
                name: row.get(3),
                detail: format!("tenant {username} is registered but its role is gone"),
            });
        }
    }
    for row in client
        .query(
            "SELECT u.username FROM tenantry.users u
             WHERE u.role = 'user'
               AND NOT EXISTS (SELECT 1 FROM tenantry.tenants t WHERE t.user_id = u.id)
             ORDER BY 1",
            &[],
        )
        .await?
    {
        out.push(Drift {
            kind: DriftKind::UserWithoutTenant,
            name: row.get(0),
            detail: "a user account without a tenant (its username is blocked)".into(),
        });
    }
    Ok(out)
}

/// Tenants per history query: each statement is its own transaction, and
/// touching thousands of tenants' tables in one would run out of lock
/// table ("out of shared memory").
const HISTORY_CHUNK: usize = 200;

/// Compare every tenant's history with its registry version.
async fn history_drift(client: &Client) -> Result<Vec<Drift>, tokio_postgres::Error> {
    let tenants: Vec<(String, String, i32)> = client
        .query(
            "SELECT t.username, t.schema_name, t.template_version FROM tenantry.tenants t
             WHERE EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = t.schema_name AND c.relname = $1)
             ORDER BY t.username",
            &[&HISTORY_TABLE],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut out = Vec::new();
    for chunk in tenants.chunks(HISTORY_CHUNK) {
        let valid: Vec<(&(String, String, i32), SchemaName)> = chunk
            .iter()
            .filter_map(|t| SchemaName::parse(&t.1).ok().map(|s| (t, s)))
            .collect();
        if valid.is_empty() {
            continue;
        }
        // Schema names are validated and quoted; nothing else is interpolated.
        let sql = valid
            .iter()
            .enumerate()
            .map(|(i, (_, s))| {
                format!(
                    "SELECT {i} AS i, (SELECT max(version) FROM {}.{HISTORY_TABLE}) AS v",
                    s.quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        for row in client.query(&sql, &[]).await? {
            let i: i32 = row.get(0);
            let history: Option<i32> = row.get(1);
            let ((username, schema, registered), _) = &valid[i as usize];
            if history != Some(*registered) {
                out.push(Drift {
                    kind: DriftKind::HistoryMismatch,
                    name: schema.clone(),
                    detail: format!(
                        "tenant {username} is at V{registered} in the registry but its history ends at {}",
                        history.map_or("nothing".into(), |v| format!("V{v}"))
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// Remove the repairable orphans, each in a transaction of its own that
/// checks again, under a lock timeout, that no registry row names it.
/// Returns what was removed; one that cannot be removed (a role that owns
/// objects in another database, a busy schema) is logged and left.
pub async fn repair_drift(
    client: &mut Client,
    installation: &Installation,
    drift: &[Drift],
) -> Result<Vec<Drift>, tokio_postgres::Error> {
    let prefix = format!("tnt_{}_", installation.id.as_str());
    let mut repaired = Vec::new();
    for d in drift.iter().filter(|d| d.kind.repairable()) {
        match repair_one(client, &prefix, d).await {
            Ok(true) => {
                tracing::info!(kind = ?d.kind, name = %d.name, "drift repaired");
                repaired.push(d.clone());
            }
            Ok(false) => {}
            Err(e) if e.as_db_error().is_some() => {
                tracing::warn!(kind = ?d.kind, name = %d.name, error = %e, "cannot repair");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(repaired)
}

/// Remove one orphan; `false` when it turned out not to be one.
async fn repair_one(
    client: &mut Client,
    prefix: &str,
    d: &Drift,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
    let removed = match d.kind {
        DriftKind::OrphanSchema => {
            // Only a name a tenant could have had; quoted either way.
            let named: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tenantry.tenants WHERE schema_name = $1)
                         OR EXISTS (SELECT 1 FROM tenantry.spare_roles WHERE schema_name = $1)",
                    &[&d.name],
                )
                .await?
                .get(0);
            if named || !d.name.starts_with("tenant_") {
                false
            } else {
                tx.batch_execute(&format!(
                    "DROP SCHEMA {} CASCADE",
                    escape_identifier(&d.name)
                ))
                .await?;
                true
            }
        }
        DriftKind::OrphanRole => {
            let named: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM tenantry.tenants WHERE role_name = $1)
                         OR EXISTS (SELECT 1 FROM tenantry.spare_roles WHERE role_name = $1)",
                    &[&d.name],
                )
                .await?
                .get(0);
            match RoleName::parse(&d.name) {
                Ok(role) if !named && role.as_str().starts_with(prefix) => {
                    // DROP OWNED needs the role's privileges: a role left
                    // without the service's membership gets it first.
                    tx.batch_execute(&format!(
                        "SET LOCAL client_min_messages TO warning;
                         GRANT {r} TO CURRENT_USER; DROP OWNED BY {r}; DROP ROLE {r}",
                        r = role.quoted()
                    ))
                    .await?;
                    true
                }
                _ => false,
            }
        }
        DriftKind::UserWithoutTenant => {
            tx.query_one(
                "WITH gone AS (
                     DELETE FROM tenantry.users u WHERE u.username = $1 AND u.role = 'user'
                       AND NOT EXISTS (SELECT 1 FROM tenantry.tenants t WHERE t.user_id = u.id)
                     RETURNING u.id
                 ), results AS (
                     DELETE FROM tenantry.fleet_results r USING gone WHERE r.user_id = gone.id
                 )
                 SELECT count(*) FROM gone",
                &[&d.name],
            )
            .await?
            .get::<_, i64>(0)
                == 1
        }
        _ => false,
    };
    tx.commit().await?;
    Ok(removed)
}
