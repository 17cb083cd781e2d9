//! Erasure (GDPR art. 17): a tenant's schema, role, account and sessions
//! removed for good, with a receipt and a pseudonymous audit entry.
//!
//! 1. Mark: under the tenant's advisory lock, the tenant becomes `deleting`,
//!    its token generation moves on and its sessions are revoked: from this
//!    commit on, no request routes to it (401) and no fleet run claims it.
//!    What is there is counted for the receipt (rows per table).
//! 2. Only for a tenant with more relations than one transaction can lock
//!    (`max_locks_per_transaction`): its tables are dropped in batches, a
//!    transaction each. The tenant is already invisible; a crash here leaves
//!    it `deleting`, and erasing it again finishes the job.
//! 3. Drop, in ONE transaction with a `lock_timeout`: take the tenant's
//!    advisory lock exclusively (so requests already routed to it finish
//!    first), `DROP SCHEMA … CASCADE`, `DROP OWNED BY` and `DROP ROLE`, the
//!    user and its registry rows (sessions and keys cascade), its fleet
//!    results and throttle rows (under its name and its email), its name
//!    in fleet runs (replaced by its pseudonym), and the audit entry, last.
//! 4. Verify: no schema, role, owned object, privilege or row of it remains.

use std::time::Duration;

use postgres_protocol::escape::escape_identifier;
use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::audit::{Action, Entry, Pseudonyms};
use crate::domain::{RoleName, SchemaName, Username};

/// Relations dropped per transaction when a tenant is too large for one.
/// At most this many tables per batch; fewer when `max_locks_per_transaction`
/// is small (a table brings its indexes, sequences and TOAST along).
pub const DROP_BATCH: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error("no tenant named {0}")]
    NoSuchTenant(String),
    #[error("the tenant is busy (locked by a running request or migration); nothing was removed, try again")]
    Busy,
    #[error("erasure failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("erasure left objects behind: {0}")]
    Incomplete(String),
    /// A Citus worker could not be asked to wait for the tenant's requests
    /// (it is down): nothing was dropped; try again when it is back.
    #[error("the worker {0} is unavailable; nothing was removed, try again when it is back")]
    NodeUnavailable(String),
    /// The account verified its address or was suspended meanwhile.
    #[error("the account is no longer an unverified one; kept")]
    Kept,
}

/// What was removed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Receipt {
    pub username: String,
    pub schema: String,
    pub role: String,
    pub template_version: i32,
    pub erased_at: chrono::DateTime<chrono::Utc>,
    /// Each table with the rows it held just before removal.
    pub tables: Vec<TableCount>,
    pub rows: i64,
    pub sessions_revoked: u64,
    /// The audit log entry (`seq`) that records the erasure.
    pub audit_entry: i64,
    /// What was checked afterwards, all absent.
    pub verified_absent: Vec<&'static str>,
    pub duration_ms: f64,
    /// The outbox rows of the user that the erasure removed (their ids), so
    /// that mail written as files can be removed too
    /// (`mail::Letters::forget_files`).
    #[serde(skip)]
    pub mail: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TableCount {
    pub table: String,
    pub rows: i64,
}

/// Who asks: the user themselves (self-service) or an admin/operator.
#[derive(Debug, Clone)]
pub struct Requester {
    /// Audit actor: a user pseudonym, or `cli`.
    pub actor: String,
    pub client: Option<String>,
    pub reason: &'static str,
    /// Erase only an account that is still unverified and not suspended
    /// (the `TENANTRY_UNVERIFIED_TTL` erasure), checked under the account's
    /// row lock; otherwise [`ErasureError::Kept`].
    pub only_unverified: bool,
}

/// Erase `username`'s tenant. `client` must be a dedicated connection (its
/// session settings change).
pub async fn erase(
    client: &mut Client,
    username: &Username,
    pseudonyms: &Pseudonyms,
    requester: &Requester,
    lock_timeout: Duration,
) -> Result<Receipt, ErasureError> {
    let started = std::time::Instant::now();
    let timeout = format!("{}ms", lock_timeout.as_millis().max(1));

    // 1. Mark.
    let tx = client.transaction().await?;
    tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&timeout])
        .await?;
    let row = tx
        .query_opt(
            "SELECT t.user_id, t.schema_name, t.role_name, t.template_version, u.email,
                    u.email_verified_at IS NULL AND u.suspended_at IS NULL
             FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
             WHERE t.username = $1
             FOR UPDATE OF u",
            &[&username.as_str()],
        )
        .await?
        .ok_or_else(|| ErasureError::NoSuchTenant(username.to_string()))?;
    if requester.only_unverified && !row.get::<_, bool>(5) {
        return Err(ErasureError::Kept);
    }
    let user_id: Uuid = row.get(0);
    let schema = SchemaName::parse(row.get::<_, &str>(1))
        .map_err(|e| ErasureError::Incomplete(e.to_string()))?;
    let role = RoleName::parse(row.get::<_, &str>(2))
        .map_err(|e| ErasureError::Incomplete(e.to_string()))?;
    let template_version: i32 = row.get(3);
    let email: String = row.get(4);
    let locked = tx
        .execute(
            // Exports of the tenant are ended, not waited for.
            "SELECT tenantry.lock_tenant($1)",
            &[&user_id],
        )
        .await;
    busy_or(locked)?;
    busy_or(
        tx.execute(
            "UPDATE tenantry.tenants SET status = 'deleting', updated_at = now() WHERE user_id = $1",
            &[&user_id],
        )
        .await,
    )?;
    tx.execute(
        "UPDATE tenantry.users SET token_generation = token_generation + 1 WHERE id = $1",
        &[&user_id],
    )
    .await?;
    let sessions_revoked = tx
        .execute(crate::auth::REVOKE_ALL_SESSIONS, &[&user_id])
        .await?;
    let tables: Vec<String> = tx
        .query(
            "SELECT c.relname FROM pg_catalog.pg_class c
             WHERE c.relnamespace = to_regnamespace($1) AND c.relkind IN ('r', 'p')
               AND c.relname <> 'refinery_schema_history'
             ORDER BY c.relname",
            &[&schema.as_str()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut counts = Vec::with_capacity(tables.len());
    for table in &tables {
        // A name read from the catalog, quoted as an identifier.
        let rows: i64 = tx
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.{}",
                    schema.quoted(),
                    escape_identifier(table)
                ),
                &[],
            )
            .await?
            .get(0);
        counts.push(TableCount {
            table: table.clone(),
            rows,
        });
    }
    let relations: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = to_regnamespace($1)",
            &[&schema.as_str()],
        )
        .await?
        .get(0);
    let per_transaction: i64 = tx
        .query_one(
            "SELECT current_setting('max_locks_per_transaction')::int8",
            &[],
        )
        .await?
        .get(0);
    tx.commit().await?;

    // On Citus, requests routed straight to a worker (`db::direct`) take
    // the tenant's lock there, not here: wait for those in flight on every
    // worker. Those that come after find the tenant gone (the mark above
    // reached every node's copy of the registry in its transaction).
    wait_for_workers(client, user_id, &timeout).await?;

    // 2. A tenant larger than one transaction's share of the lock table
    //    loses its tables in batches first.
    if relations > per_transaction {
        let per_batch = usize::try_from(per_transaction / 8)
            .unwrap_or(1)
            .clamp(1, DROP_BATCH);
        for batch in tables.chunks(per_batch) {
            let names: Vec<String> = batch
                .iter()
                .map(|t| format!("{}.{}", schema.quoted(), escape_identifier(t)))
                .collect();
            let tx = client.transaction().await?;
            tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&timeout])
                .await?;
            busy_or(
                tx.batch_execute(&format!(
                    "DROP TABLE IF EXISTS {} CASCADE",
                    names.join(", ")
                ))
                .await,
            )?;
            tx.commit().await?;
        }
    }

    // 3. Drop, in one transaction; the audit entry last.
    let rows: i64 = counts.iter().map(|c| c.rows).sum();
    let entry = Entry::new(Action::TenantErased)
        .actor(requester.actor.clone())
        .subject(pseudonyms.user(user_id))
        .client(requester.client.clone())
        .detail("reason", requester.reason)
        .detail("tables", counts.len())
        .detail("rows", rows)
        .detail("template_version", template_version);
    let tx = client.transaction().await?;
    tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&timeout])
        .await?;
    busy_or(
        tx.execute(
            // Exports of the tenant are ended, not waited for.
            "SELECT tenantry.lock_tenant($1)",
            &[&user_id],
        )
        .await,
    )?;
    // Not while `serve` hands tenants to their routers (`db::routers`),
    // which would grant the role it is dropping.
    busy_or(
        tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, 0)",
            &[&crate::db::routers::ROUTERS_LOCK_CLASS],
        )
        .await,
    )?;
    busy_or(
        tx.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE; DROP OWNED BY {r}; DROP ROLE {r};",
            s = schema.quoted(),
            r = role.quoted()
        ))
        .await,
    )?;
    forget_the_name(&tx, username, &email, user_id, pseudonyms).await?;
    // Its mail goes with the user (a cascade); what was written as files
    // is the caller's to remove.
    let mail: Vec<i64> = tx
        .query(
            "SELECT id FROM tenantry.outbox WHERE user_id = $1",
            &[&user_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The registry row, sessions and idempotency keys go with the user.
    tx.execute("DELETE FROM tenantry.users WHERE id = $1", &[&user_id])
        .await?;
    // What integrators need to delete their own copies; the outbox forgets
    // it once delivered and past its retention.
    crate::webhooks::record(
        &tx,
        &crate::webhooks::Event::tenant(
            crate::webhooks::EventType::TenantErased,
            user_id,
            username.as_str(),
            serde_json::json!({ "reason": requester.reason }),
        ),
    )
    .await?;
    let audit_entry: i64 = tx
        .query_one(
            &format!("{} RETURNING seq", crate::audit::APPEND),
            &[&entry.text()],
        )
        .await?
        .get(0);
    tx.commit().await?;
    let erased_at = chrono::Utc::now();

    // 4. Verify. (The role's owned objects and privileges are gone because
    // DROP ROLE succeeded: PostgreSQL refuses it while any remain.)
    let left = client
        .query_one(
            "SELECT to_regnamespace($1) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $2),
                    EXISTS (SELECT 1 FROM tenantry.users WHERE id = $3)
                    OR EXISTS (SELECT 1 FROM tenantry.tenants WHERE user_id = $3)
                    OR EXISTS (SELECT 1 FROM tenantry.refresh_tokens WHERE user_id = $3)",
            &[&schema.as_str(), &role.as_str(), &user_id],
        )
        .await?;
    let remaining: Vec<&str> = ["schema", "role", "account rows"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| left.get::<_, bool>(*i))
        .map(|(_, name)| name)
        .collect();
    if !remaining.is_empty() {
        return Err(ErasureError::Incomplete(remaining.join(", ")));
    }
    tracing::info!(audit_entry, tables = counts.len(), rows, "tenant erased");
    Ok(Receipt {
        username: username.to_string(),
        schema: schema.to_string(),
        role: role.to_string(),
        template_version,
        erased_at,
        tables: counts,
        rows,
        sessions_revoked,
        audit_entry,
        verified_absent: vec![
            "schema",
            "role",
            "owned objects and privileges",
            "account rows",
        ],
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        mail,
    })
}

/// The registry rows that name the user without being theirs: runs that
/// were filtered to the tenant or stopped on it keep the run but show the
/// audit pseudonym instead of the name; the user's fleet results and the
/// failed-login counts under the name and the email go.
async fn forget_the_name(
    tx: &tokio_postgres::Transaction<'_>,
    username: &Username,
    email: &str,
    user_id: Uuid,
    pseudonyms: &Pseudonyms,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        FORGET_IN_FLEET_RUNS,
        &[&username.as_str(), &pseudonyms.user(user_id), &user_id],
    )
    .await?;
    tx.execute(
        "DELETE FROM tenantry.fleet_results WHERE user_id = $1",
        &[&user_id],
    )
    .await?;
    let throttle_keys =
        [username.as_str(), email].map(|k| crate::auth::throttle_key(pseudonyms, k));
    tx.execute(
        "DELETE FROM tenantry.login_throttle WHERE username = ANY($1)",
        &[&throttle_keys.as_slice()],
    )
    .await?;
    Ok(())
}

/// `$1` the name, `$2` its pseudonym, `$3` the user id. A run's reason
/// names the first tenant that failed, also inside its schema and role
/// names (`tenant_<name>`, `tnt_<id>_<name>`): every occurrence that stands
/// alone or ends such a name is replaced, and no other name that merely
/// contains it (`joe_ann` is not `ann`). A username is `[a-z0-9_]` only, so
/// it is a literal pattern.
const FORGET_IN_FLEET_RUNS: &str = "\
UPDATE tenantry.fleet_runs r
SET only_tenant = CASE WHEN r.only_tenant = $1 THEN $2 ELSE r.only_tenant END,
    reason = regexp_replace(r.reason,
        '(^|[^a-z0-9_]|tenant_|tnt_[0-9a-z]+_)' || $1 || '(?![a-z0-9_])', '\\1' || $2, 'g')
WHERE r.only_tenant = $1
   OR EXISTS (SELECT 1 FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.user_id = $3)";

/// Take and release the tenant's lock (`db::TENANT_LOCK_CLASS`) on every
/// Citus worker: it waits for the requests that hold it there. Nothing on
/// plain PostgreSQL (no copy of the registry on other nodes).
async fn wait_for_workers(
    client: &Client,
    user_id: Uuid,
    timeout: &str,
) -> Result<(), ErasureError> {
    let on_citus: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass('tenantry_guard.entries') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !on_citus {
        return Ok(());
    }
    // Each worker answers whether its copy of the guard has let the
    // tenant go (a commit Citus could not deliver there yet would leave
    // it in): `t`, or the erasure is tried again later.
    let failed = client
        .query(
            "SELECT nodename::text || ':' || nodeport, success, result
             FROM pg_catalog.run_command_on_workers(pg_catalog.format(
                 'SELECT NOT EXISTS (SELECT FROM tenantry_guard.entries WHERE user_id = %L::uuid)
                  FROM (SELECT pg_catalog.set_config(''lock_timeout'', %L, true)) s (t)
                  CROSS JOIN LATERAL (SELECT pg_catalog.pg_advisory_xact_lock(%s, pg_catalog.hashtext(%L))
                                      WHERE s.t IS NOT NULL) l',
                 $3::text, $1::text, $2::int4, $3::text))
             WHERE NOT success OR result <> 't'",
            &[&timeout, &crate::db::TENANT_LOCK_CLASS, &user_id.to_string()],
        )
        .await?;
    match failed.first() {
        None => Ok(()),
        Some(row) if row.get::<_, bool>(1) => Err(ErasureError::Busy),
        Some(row) if row.get::<_, String>(2).contains("lock timeout") => Err(ErasureError::Busy),
        Some(row) => Err(ErasureError::NodeUnavailable(row.get(0))),
    }
}

/// A lock timeout means something else holds the tenant: say so.
fn busy_or<T>(result: Result<T, tokio_postgres::Error>) -> Result<T, ErasureError> {
    result.map_err(|e| match e.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE => {
            ErasureError::Busy
        }
        _ => e.into(),
    })
}
