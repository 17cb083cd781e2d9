//! Tenant roles made ahead of their tenants (issue 28).
//!
//! PostgreSQL caches, per session, the roles its login role is a member of
//! (what `SET ROLE` checks), and every backend throws that cache away on any
//! change to `pg_authid` or `pg_auth_members`. The service is a member of
//! every tenant role, so with one role per tenant the list is as long as the
//! fleet, and PostgreSQL 15 rebuilds it in time quadratic in its length
//! (16 added a Bloom filter: linear). A signup that made its own role made
//! every pooled connection pay that rebuild on its next request: 0.24 s per
//! connection at 10,000 tenants (docs/benchmarks.md, `scripts/bench-roles`).
//!
//! So roles are made in batches ([`refill`]: one transaction, one cache
//! reset everywhere for a whole batch), each `NOLOGIN`, in the tenants'
//! group and with the service a member, named `tnt_<id>__t<16 hex>`
//! (no username: a role cannot be renamed without the same reset). A signup
//! takes one inside its own transaction ([`claim`]: `DELETE … FOR UPDATE
//! SKIP LOCKED`), and then changes no role at all: a failed or killed
//! signup rolls the `DELETE` back and the role is a spare again. With no
//! spare left a signup makes its role as before. `serve` keeps the stock
//! between half of `TENANTRY_SPARE_ROLES` and all of it ([`Keeper`]).
//!
//! A session's membership cache can miss a batch: PostgreSQL (15.20 here)
//! rebuilds the list one catalog lookup per role, each of which may take in
//! invalidation messages, and a batch committed during a rebuild can leave
//! a list that lacks it marked valid until the next role change anywhere
//! (reproduced with plain SQL: docs/benchmarks.md). A signup refused its
//! spare so makes its role in its transaction instead
//! (`provisioning::provision`), which resets every session's list.
//!
//! On Citus only spares with their schema built are taken ([`claim_built`]):
//! a signup without one makes its role and schema in a head start
//! (`provisioning::Reservation`). Its spare roles are `LOGIN` roles in the
//! tenants' group, as a head start's (Citus reaches the workers as them),
//! and the stock is no larger than the schemas to build. A schema is built
//! in two transactions ([`build_one_citus`]): Citus distributes only a
//! schema that is committed, so the empty schema goes first, then the
//! templates and `citus_schema_distribute` together; only then is the
//! spare's version written, and only a spare with a version is taken. A
//! build killed between the two is finished by the next.
//!
//! Some spares also have their schema built ahead ([`build_one`],
//! `TENANTRY_SPARE_SCHEMAS`): `tenant__s<16 hex>`, the templates applied as
//! the spare's role and recorded in its history, in one transaction holding
//! the spare's row. A signup that takes such a spare renames the schema to
//! the tenant's and applies only the versions published since (usually
//! none), so it runs no template DDL; a rollback leaves the spare and its
//! schema as they were. The builder works one schema at a time on a
//! connection of its own, pausing after each as long as it took; while a
//! quarter of the stock or more is built it builds only once the request
//! pool has had no connection in use for a moment ([`LOW_WATER`],
//! `its_turn`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::db::{Connector, Dedicated, Installation, RequestPool};
use crate::domain::{RoleName, SchemaName};
use crate::tenancy::apply::TemplateApplication;
use crate::tenancy::publication::Templates;

/// The class of the transaction-level advisory lock a refill holds: two
/// processes refilling at once make one batch between them.
pub const REFILL_LOCK_CLASS: i32 = crate::db::REFILL_LOCK_CLASS;

/// A spare taken by a signup ([`claim`]).
#[derive(Debug)]
pub struct Claimed {
    pub role: RoleName,
    /// How many spares there were besides it (of its router's, with
    /// routers).
    pub left: i64,
    /// Its schema, built ahead ([`build_one`]), and the template version it
    /// is at: the signup renames it and applies only what is newer. `None`:
    /// a role only.
    pub schema: Option<(SchemaName, i32)>,
}

/// Take one spare (the first one no other transaction holds) inside the
/// caller's transaction, preferring one whose schema is built, at the
/// newest version up to `up_to` (a spare whose schema is at a newer
/// version is left: an import builds its tenant at its export's version).
/// With router roles (`db::routers`), one of `router`'s. `None`: none left.
pub async fn claim(
    tx: &impl tokio_postgres::GenericClient,
    router: Option<usize>,
    up_to: i32,
) -> Result<Option<Claimed>, tokio_postgres::Error> {
    // With routers, the index on (router, template_version, made_at)
    // gives the order; without, the one on (template_version, made_at).
    let (sql, key) = match router {
        Some(k) => (&*CLAIM_OF_ROUTER, i32::try_from(k).unwrap_or(i32::MAX)),
        None => (&*CLAIM_ANY, -1),
    };
    let row = tx
        .query_opt(sql.as_str(), &[&key, &up_to, &crate::db::BACKUP_LOCK_CLASS])
        .await?;
    Ok(row.and_then(|row| {
        let role = RoleName::parse(row.get(0)).ok()?;
        Some(Claimed {
            role,
            // A schema dropped by hand, or a name that is not a spare's:
            // the signup makes the tenant's schema itself.
            schema: built(row.get(1), row.get(2)),
            left: row.get(3),
        })
    }))
}

/// A spare's built schema and its version, as `tenantry.spare_roles` has
/// them (`None`: a role only, or a name no spare has).
fn built(schema: Option<&str>, version: Option<i32>) -> Option<(SchemaName, i32)> {
    schema
        .and_then(|name| SchemaName::parse_spare(name).ok())
        .zip(version)
}

/// [`claim`]'s statement: `$1` the router (`filter`), `$2` the newest
/// version the caller asks for, `$3` [`crate::db::BACKUP_LOCK_CLASS`]
/// (while a backup holds it, only spares without a built schema are
/// taken: a rename would reach `pg_dump` half).
fn claim_sql(filter: &str) -> String {
    format!(
        "WITH claimed AS (
             DELETE FROM tenantry.spare_roles
             WHERE role_name = (SELECT s.role_name FROM tenantry.spare_roles s
                                WHERE {filter}
                                  AND (s.template_version IS NULL
                                       OR (s.template_version <= $2
                                           AND pg_catalog.pg_try_advisory_xact_lock_shared($3, 0)))
                                  AND EXISTS (SELECT FROM pg_catalog.pg_roles r
                                              WHERE r.rolname = s.role_name)
                                ORDER BY s.template_version DESC NULLS LAST, s.made_at, s.role_name
                                LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING role_name, schema_name, template_version)
         SELECT c.role_name,
                CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_namespace n
                                  WHERE n.nspname = c.schema_name)
                     THEN c.schema_name END,
                c.template_version,
                (SELECT count(*) FROM tenantry.spare_roles s WHERE {filter}) - 1
         FROM claimed c"
    )
}

/// On Citus, take a spare whose schema is built and distributed at exactly
/// `latest` (none otherwise: no head start is saved by a role alone, and a
/// distributed schema is not brought up to date in a signup), inside the
/// caller's transaction. `None`: none left.
pub async fn claim_built(
    tx: &impl tokio_postgres::GenericClient,
    latest: i32,
) -> Result<Option<Claimed>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            CLAIM_BUILT.as_str(),
            &[&-1i32, &latest, &crate::db::BACKUP_LOCK_CLASS],
        )
        .await?;
    Ok(row.and_then(|row| {
        let role = RoleName::parse(row.get(0)).ok()?;
        Some(Claimed {
            role,
            schema: built(row.get(1), row.get(2)),
            left: row.get(3),
        })
    }))
}

static CLAIM_BUILT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    claim_sql("$1 < 0 AND s.schema_name IS NOT NULL AND s.template_version = $2")
});

static CLAIM_OF_ROUTER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| claim_sql("s.router = $1"));
static CLAIM_ANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| claim_sql("$1 < 0"));

/// Take out of the stock every spare the current role may not act as
/// (`provision`'s retry after a refused spare, once its own `GRANT` has
/// made this session's membership cache fresh). `fleet check` then finds
/// each as an orphan role.
pub const DROP_UNUSABLE: &str = "DELETE FROM tenantry.spare_roles s
 WHERE CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = s.role_name)
            THEN NOT pg_catalog.pg_has_role(s.role_name, 'MEMBER')
            ELSE true END";

/// How many spares there are.
pub async fn count(
    client: &impl tokio_postgres::GenericClient,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT count(*) FROM tenantry.spare_roles", &[])
        .await?
        .get(0))
}

/// How many spares each of `routers` routers has (one stock without).
async fn stocks(
    client: &impl tokio_postgres::GenericClient,
    routers: usize,
) -> Result<Vec<usize>, tokio_postgres::Error> {
    if routers == 0 {
        return Ok(vec![usize::try_from(count(client).await?).unwrap_or(0)]);
    }
    let mut stocks = vec![0; routers];
    for row in client
        .query(
            "SELECT router, count(*) FROM tenantry.spare_roles GROUP BY router",
            &[],
        )
        .await?
    {
        let (router, n): (i32, i64) = (row.get(0), row.get(1));
        if let Some(stock) = usize::try_from(router).ok().and_then(|k| stocks.get_mut(k)) {
            *stock = usize::try_from(n).unwrap_or(0);
        }
    }
    Ok(stocks)
}

/// Each router's share of a stock of `target` (all of it without routers).
pub fn share(target: usize, routers: usize) -> usize {
    if routers == 0 {
        target
    } else {
        target.div_ceil(routers)
    }
}

/// Whether a stock of `have` spares wants making whole again: when fewer
/// than half of `target` are left (none, for a target of 1).
pub fn wants_refill(have: usize, target: usize) -> bool {
    have * 2 < target.max(2)
}

/// When fewer than half of `target` spares are left, make the rest, in one
/// transaction (so one reset of every session's membership cache for the
/// whole batch). Two refills at once queue on an advisory lock and the
/// second finds the stock full. Returns how many roles it made. Nothing
/// with a `target` of 0. On Citus the roles may log in and are in the
/// group from the start (as a head start's), and Citus makes them on every
/// node.
pub async fn refill(
    client: &mut tokio_postgres::Client,
    installation: &Installation,
    target: usize,
) -> Result<usize, tokio_postgres::Error> {
    if target == 0 {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, 0)",
        &[&REFILL_LOCK_CLASS],
    )
    .await?;
    // A row whose role is gone (dropped by hand) is never taken by
    // `claim`: it must not count as stock either.
    tx.execute(
        "DELETE FROM tenantry.spare_roles s
         WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = s.role_name)",
        &[],
    )
    .await?;
    // The routers as recorded now (`db::routers::ensure` changes them
    // under this lock too).
    let routers: i32 = tx
        .query_one("SELECT routers FROM tenantry.installation", &[])
        .await?
        .get(0);
    let routers = usize::try_from(routers).unwrap_or(0);
    let share = share(target, routers);
    let stocks = stocks(&tx, routers).await?;
    if !stocks.iter().any(|have| wants_refill(*have, share)) {
        tx.commit().await?;
        return Ok(0);
    }
    // Every router's stock made whole (their signups come evenly).
    let roles: Vec<(RoleName, i32)> = stocks
        .iter()
        .enumerate()
        .flat_map(|(k, have)| {
            let router = if routers == 0 { -1 } else { k as i32 };
            (*have..share).map(move |_| (installation.id.anonymous_tenant_role(), router))
        })
        .collect();
    let group = installation.group_role();
    let mut sql = String::from("SET LOCAL client_min_messages TO warning;\n");
    for (role, router) in &roles {
        let login = if installation.citus {
            "LOGIN"
        } else {
            "NOLOGIN"
        };
        sql.push_str(&format!("CREATE ROLE {} {login};\n", role.quoted()));
        if !installation.superuser {
            // A non-superuser service needs membership to act as the role.
            sql.push_str(&format!("GRANT {} TO CURRENT_USER;\n", role.quoted()));
        }
        sql.push_str(&format!("GRANT {} TO {};\n", group.quoted(), role.quoted()));
        if let Ok(k) = usize::try_from(*router) {
            sql.push_str(&format!(
                "GRANT {} TO {};\n",
                role.quoted(),
                installation.id.router_role(k).quoted()
            ));
        }
    }
    tx.batch_execute(&sql).await?;
    let names: Vec<&str> = roles.iter().map(|(role, _)| role.as_str()).collect();
    let keys: Vec<i32> = roles.iter().map(|(_, router)| *router).collect();
    tx.execute(
        "INSERT INTO tenantry.spare_roles (role_name, router)
         SELECT unnest($1::text[]), unnest($2::int4[])",
        &[&names, &keys],
    )
    .await?;
    tx.commit().await?;
    Ok(roles.len())
}

/// A spare whose schema could not be built ([`build_one`]).
#[derive(Debug, thiserror::Error)]
#[error("building the schema of a spare tenant role ({}): {why}", role.as_deref().unwrap_or("none chosen yet"))]
pub struct BuildFailed {
    /// The spare, which the builder then leaves alone.
    pub role: Option<String>,
    pub why: String,
}

/// An application of templates to a spare's schema as its role, run and
/// recorded in its history inside the build's transaction.
async fn apply(
    tx: &tokio_postgres::Transaction<'_>,
    application: TemplateApplication<'_>,
) -> Result<(), tokio_postgres::Error> {
    for (_, request) in application.requests(tx.client()) {
        request.await?;
    }
    let (_, history) = application.history_request(tx.client());
    history.await
}

/// What a failed build of `role`'s schema (or one before a spare was
/// chosen) reports.
fn build_failed(role: Option<&str>) -> impl Fn(tokio_postgres::Error) -> BuildFailed {
    let role = role.map(str::to_owned);
    move |e| BuildFailed {
        role: role.clone(),
        why: e
            .as_db_error()
            .map_or_else(|| e.to_string(), ToString::to_string),
    }
}

/// A build's first transaction, with publishing held off (a version
/// published since `newest` was read refuses it), and the spare `choose`
/// locks (one row, its role name first). `None`: none is wanted (the
/// transaction committed). A role name Tenantry does not make (written by
/// hand) is an error, its row left alone.
async fn chosen<'c>(
    client: &'c mut tokio_postgres::Client,
    newest: i32,
    choose: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<
    Option<(
        tokio_postgres::Transaction<'c>,
        tokio_postgres::Row,
        RoleName,
    )>,
    BuildFailed,
> {
    let tx = client.transaction().await.map_err(build_failed(None))?;
    tx.execute("SELECT tenantry.provisioning_at($1)", &[&newest])
        .await
        .map_err(build_failed(None))?;
    let Some(row) = tx
        .query_opt(choose, params)
        .await
        .map_err(build_failed(None))?
    else {
        tx.commit().await.map_err(build_failed(None))?;
        return Ok(None);
    };
    let name: String = row.get(0);
    match RoleName::parse(&name) {
        Ok(role) => Ok(Some((tx, row, role))),
        Err(e) => {
            tx.commit().await.map_err(build_failed(Some(&name)))?;
            Err(BuildFailed {
                role: Some(name),
                why: e.to_string(),
            })
        }
    }
}

/// Build one spare's schema, in one transaction: the stalest built one
/// brought up to the newest published version first, else (while fewer
/// than `target` are built) a new one for a spare that is a role only (or
/// whose schema is gone), of the router with the fewest built; none of
/// `skip` (spares whose build failed). The templates run as the spare's
/// role, as in a signup, and its history is written; the row is locked
/// throughout, so no signup takes the spare half-built, and a failure or a
/// kill leaves it as it was. Returns the spare built, `None` when none was
/// wanted.
pub async fn build_one(
    client: &mut tokio_postgres::Client,
    installation: &Installation,
    templates: &Templates,
    target: usize,
    skip: &[String],
) -> Result<Option<RoleName>, BuildFailed> {
    if target == 0 {
        return Ok(None);
    }
    if installation.citus {
        return build_one_citus(client, templates, target, skip).await;
    }
    let published = templates.published();
    let set = published.set();
    let latest = set.latest().get();
    let target = i64::try_from(target).unwrap_or(i64::MAX);
    let Some((tx, row, role)) = chosen(
        client,
        published.newest(),
        "WITH built AS (SELECT router, count(schema_name) AS n
                            FROM tenantry.spare_roles GROUP BY router)
             SELECT s.role_name, CASE WHEN p.present THEN s.schema_name END,
                    CASE WHEN p.present THEN s.template_version END
             FROM tenantry.spare_roles s
                  CROSS JOIN LATERAL (SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace n
                                                     WHERE n.nspname = s.schema_name) AS present) p
                  JOIN built b ON b.router = s.router
             WHERE EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = s.role_name)
               AND NOT (s.role_name = ANY ($3))
               AND ((p.present AND s.template_version < $1)
                    OR (s.schema_name IS NOT NULL AND NOT p.present)
                    OR (s.schema_name IS NULL AND (SELECT sum(n) FROM built)::int8 < $2))
             ORDER BY p.present DESC, s.template_version NULLS LAST, b.n, s.made_at, s.role_name
             LIMIT 1 FOR UPDATE OF s SKIP LOCKED",
        &[&latest, &target, &skip],
    )
    .await?
    else {
        return Ok(None);
    };
    let on_err = build_failed(Some(role.as_str()));
    let made = async {
        let (schema, from) = match built(row.get(1), row.get(2)) {
            Some(existing) => existing,
            None => {
                let schema = SchemaName::spare();
                tx.batch_execute(&crate::tenancy::provisioning::spare_schema(&schema, &role))
                    .await?;
                (schema, 0)
            }
        };
        let application = if from == 0 {
            // Its schema is empty: from the baseline when there is one.
            TemplateApplication::building(&schema, &role, set, set.latest())
        } else {
            TemplateApplication::new(&schema, &role, set.between(from, set.latest()))
        };
        apply(&tx, application).await?;
        tx.execute(
            "UPDATE tenantry.spare_roles SET schema_name = $2, template_version = $3
             WHERE role_name = $1",
            &[&role.as_str(), &schema.as_str(), &latest],
        )
        .await?;
        tx.commit().await
    }
    .await;
    made.map_err(&on_err)?;
    // The templates ran on this connection as the spare's role.
    client
        .batch_execute(crate::db::SESSION_RESET)
        .await
        .map_err(&on_err)?;
    Ok(Some(role))
}

/// [`build_one`] on Citus, where a schema is distributed only once it is
/// committed: the chosen spare's empty schema (and history table) first,
/// in a transaction that records its name but no version; then, in a
/// second, the templates as the spare's role and `citus_schema_distribute`,
/// and the version. A spare with a schema and no version (a build cut off
/// between the two) is finished first; one at an older version is dropped
/// and built again (a distributed schema is brought up to date by the
/// fleet's path, not here); `target` counts schemas made or being made.
async fn build_one_citus(
    client: &mut tokio_postgres::Client,
    templates: &Templates,
    target: usize,
    skip: &[String],
) -> Result<Option<RoleName>, BuildFailed> {
    let published = templates.published();
    let set = published.set();
    let latest = set.latest().get();
    let target = i64::try_from(target).unwrap_or(i64::MAX);
    let Some((tx, row, role)) = chosen(
        client,
        published.newest(),
        "SELECT s.role_name, s.schema_name, s.template_version, p.present
             FROM tenantry.spare_roles s
                  CROSS JOIN LATERAL (SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace n
                                                     WHERE n.nspname = s.schema_name) AS present) p
             WHERE EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = s.role_name)
               AND NOT (s.role_name = ANY ($3))
               AND ((p.present AND (s.template_version IS NULL OR s.template_version < $1))
                    OR (s.schema_name IS NOT NULL AND NOT p.present)
                    OR (s.schema_name IS NULL
                        AND (SELECT count(schema_name) FROM tenantry.spare_roles) < $2))
             ORDER BY p.present DESC, s.template_version NULLS FIRST, s.made_at, s.role_name
             LIMIT 1 FOR UPDATE OF s SKIP LOCKED",
        &[&latest, &target, &skip],
    )
    .await?
    else {
        return Ok(None);
    };
    let on_err = build_failed(Some(role.as_str()));
    let present: bool = row.get(3);
    let version: Option<i32> = row.get(2);
    let existing = row
        .get::<_, Option<&str>>(1)
        .and_then(|name| SchemaName::parse_spare(name).ok());
    let schema = match (existing, present, version) {
        // Half built: its templates and distribution are what is left.
        (Some(schema), true, None) => {
            tx.commit().await.map_err(&on_err)?;
            schema
        }
        // At an older version: dropped, to be built again.
        (Some(schema), true, Some(_)) => {
            let dropped = async {
                tx.batch_execute(&format!(
                    "SET LOCAL client_min_messages TO warning;
                     DROP SCHEMA {} CASCADE",
                    schema.quoted()
                ))
                .await?;
                tx.execute(
                    "UPDATE tenantry.spare_roles SET schema_name = NULL, template_version = NULL
                     WHERE role_name = $1",
                    &[&role.as_str()],
                )
                .await?;
                tx.commit().await
            }
            .await;
            dropped.map_err(&on_err)?;
            return Ok(Some(role));
        }
        // None yet (or gone): the empty schema, committed.
        _ => {
            let schema = SchemaName::spare();
            let made = async {
                tx.batch_execute(&crate::tenancy::provisioning::spare_schema(&schema, &role))
                    .await?;
                tx.execute(
                    "UPDATE tenantry.spare_roles SET schema_name = $2, template_version = NULL
                     WHERE role_name = $1",
                    &[&role.as_str(), &schema.as_str()],
                )
                .await?;
                tx.commit().await
            }
            .await;
            made.map_err(&on_err)?;
            schema
        }
    };
    let tx = client.transaction().await.map_err(&on_err)?;
    let made = async {
        tx.execute(
            "SELECT tenantry.provisioning_at($1)",
            &[&published.newest()],
        )
        .await?;
        let mine = tx
            .query_opt(
                "SELECT FROM tenantry.spare_roles
                 WHERE role_name = $1 AND schema_name = $2 AND template_version IS NULL
                 FOR UPDATE SKIP LOCKED",
                &[&role.as_str(), &schema.as_str()],
            )
            .await?;
        if mine.is_none() {
            // Another process finishes it.
            return tx.commit().await;
        }
        apply(
            &tx,
            TemplateApplication::building(&schema, &role, set, set.latest()),
        )
        .await?;
        tx.batch_execute(&crate::tenancy::provisioning::distribute_sql(&schema))
            .await?;
        tx.execute(
            "UPDATE tenantry.spare_roles SET template_version = $2 WHERE role_name = $1",
            &[&role.as_str(), &latest],
        )
        .await?;
        tx.commit().await
    }
    .await;
    made.map_err(|e| {
        // Half built is a state the next build finishes: a version
        // published meanwhile (the next build reads the set again) is no
        // reason to pass the spare over, only a failure of its own is.
        let newer =
            e.code().map(|c| c.code()) == Some(crate::tenancy::publication::NEWER_PUBLISHED);
        let mut failed = on_err(e);
        if newer {
            failed.role = None;
        }
        failed
    })?;
    client
        .batch_execute(crate::db::SESSION_RESET)
        .await
        .map_err(&on_err)?;
    Ok(Some(role))
}

/// `serve`'s stock of spares: roles refilled at start, when a signup finds
/// them below half, and on a timer (other processes take spares too); then
/// schemas built for up to `schemas` of them, one at a time, each followed
/// by a pause as long as it took (the builder is busy half the time at
/// most, beside the requests it shares the server with).
pub struct Keeper {
    target: usize,
    schemas: usize,
    /// The routers the stock is shared by (`start`).
    routers: std::sync::atomic::AtomicUsize,
    wake: Notify,
}

impl Keeper {
    pub fn new(target: usize, schemas: usize) -> Arc<Keeper> {
        Arc::new(Keeper {
            target,
            schemas: schemas.min(target),
            routers: Default::default(),
            wake: Notify::new(),
        })
    }

    pub fn target(&self) -> usize {
        self.target
    }

    /// A signup took a spare and `left` remain (of its router's, with
    /// routers): refill soon when that is below half the stock (of the
    /// router's share of it, [`wants_refill`]), or when it took a built
    /// schema.
    pub fn claimed(&self, left: Option<i64>, built_schema: bool) {
        if let Some(left) = left {
            let share = share(
                self.target,
                self.routers.load(std::sync::atomic::Ordering::Relaxed),
            );
            if built_schema || wants_refill(usize::try_from(left).unwrap_or(0), share) {
                self.wake.notify_one();
            }
        }
    }

    /// Refill the roles once now (what `serve` does before it listens),
    /// then in the background when woken or every `interval`, each time
    /// followed by building schemas while any is wanted. The task ends with
    /// the runtime; a refill or build cut short rolls back.
    pub async fn start(
        self: &Arc<Keeper>,
        pool: RequestPool,
        connector: Connector,
        installation: Installation,
        templates: Arc<Templates>,
        interval: Duration,
    ) {
        if self.target == 0 {
            return;
        }
        // On Citus only built spares are taken: no more roles than schemas.
        let target = if installation.citus {
            self.schemas
        } else {
            self.target
        };
        if target == 0 {
            return;
        }
        self.routers
            .store(installation.routers, std::sync::atomic::Ordering::Relaxed);
        let once = |pool: RequestPool, installation: Installation, target: usize| async move {
            let mut client = match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make spare tenant roles: no connection");
                    return;
                }
            };
            match refill(&mut client, &installation, target).await {
                Ok(0) => {}
                Ok(made) => tracing::info!(made, "made spare tenant roles"),
                Err(e) => tracing::warn!(error = %e, "making spare tenant roles failed"),
            }
        };
        once(pool.clone(), installation.clone(), target).await;
        let keeper = self.clone();
        tokio::spawn(async move {
            let mut builder = Builder::default();
            loop {
                if keeper.schemas > 0 {
                    let busy = || pool.in_use() > 0;
                    builder
                        .round(
                            &connector,
                            &installation,
                            &templates,
                            keeper.schemas,
                            busy,
                            || {
                                // Signups may have emptied the roles meanwhile.
                                once(pool.clone(), installation.clone(), target)
                            },
                        )
                        .await;
                }
                tokio::select! {
                    _ = keeper.wake.notified() => {}
                    _ = tokio::time::sleep(interval) => {
                        // Nothing taken for a while: the builder's session
                        // goes.
                        builder.client = None;
                    }
                }
                once(pool.clone(), installation.clone(), target).await;
            }
        });
    }
}

/// The builder of spare schemas: its connection, kept from one round to
/// the next (a new session of the service's would build its fleet-long
/// list of memberships again on its first build), and the spares whose
/// build failed, left alone by this process.
#[derive(Default)]
struct Builder {
    client: Option<crate::db::Connection>,
    failed: Vec<String>,
}

impl Builder {
    /// Build schemas ([`build_one`]) while any is wanted, each build
    /// followed by a pause as long as it took and by `between` (the roles'
    /// refill); the published templates are read again before each
    /// (another process may have published). While every router's stock
    /// holds at least [`LOW_WATER`] of its share of `target` at the newest
    /// version, each build first waits until this process's request pool
    /// has had no connection in use for a moment ([`its_turn`]).
    async fn round<F: std::future::Future<Output = ()>>(
        &mut self,
        connector: &Connector,
        installation: &Installation,
        templates: &Templates,
        target: usize,
        busy: impl Fn() -> bool,
        mut between: impl FnMut() -> F,
    ) {
        let mut failures = 0;
        loop {
            let client = match &mut self.client {
                Some(client) if !client.is_closed() => client,
                _ => match connector.connect(Dedicated::Spares).await {
                    Ok(client) => self.client.insert(client),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot build spare tenant schemas: no connection");
                        return;
                    }
                },
            };
            // Roles are refilled while a build waits (signups go on).
            loop {
                if let Err(e) = templates.refresh(&**client).await {
                    tracing::warn!(error = %e, "cannot build spare tenant schemas");
                    return;
                }
                let latest = templates.published().set().latest().get();
                let routers = installation.routers;
                match its_turn(client, latest, target, routers, &busy).await {
                    Ok(true) => break,
                    Ok(false) => between().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot build spare tenant schemas");
                        return;
                    }
                }
            }
            let started = std::time::Instant::now();
            match build_one(client, installation, templates, target, &self.failed).await {
                Ok(Some(_)) => failures = 0,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "building a spare tenant schema failed; that spare is left as it is");
                    self.failed.extend(e.role);
                    failures += 1;
                    if failures == 3 {
                        // Not one spare's trouble: the next round tries again.
                        return;
                    }
                }
            }
            tokio::time::sleep(started.elapsed()).await;
            between().await;
        }
    }
}

/// The share of the stock below which spare schemas are built whatever the
/// load: above it a build waits for the service to be quiet
/// ([`its_turn`]).
pub const LOW_WATER: (usize, usize) = (1, 4);

/// How often [`its_turn`] looks at the request pool, how many looks in a
/// row must find no connection in use (50 ms: a gap between two requests
/// is not a quiet moment), and how often it counts the stock again.
const QUIET_POLL: Duration = Duration::from_millis(10);
const QUIET_POLLS: u32 = 5;
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// Whether to build whatever the load: some router's stock at the newest
/// version (one stock without routers) is below [`LOW_WATER`] of its
/// `share` of the target.
pub fn build_anyway(stocks: &[usize], share: usize) -> bool {
    let (num, den) = LOW_WATER;
    stocks.iter().any(|built| built * den < share * num)
}

/// Whether a build may start now: when there is nothing to build (every
/// spare row built at `latest`, or `target` of them; [`build_one`] then
/// finds none, or a spare whose schema went missing) or the stock is low
/// ([`build_anyway`]); else once this process's request pool has had no
/// connection in use for [`QUIET_POLLS`] looks in a row (`busy` false).
/// `false` when it stayed busy for [`RECOUNT_EVERY`]. Only this process's
/// pool is looked at, not other processes or the service's dedicated
/// connections (exports, fleet runs). A schema's DDL takes a core for
/// 0.1–0.3 s at 10,000 tenants, which requests beside it wait for
/// (docs/benchmarks.md, "Ten thousand tenants on one node"): the stock
/// absorbs a burst of signups, and is built again when the requests let
/// up, or from the low-water mark on whatever they do.
async fn its_turn(
    client: &tokio_postgres::Client,
    latest: i32,
    target: usize,
    routers: usize,
    busy: &impl Fn() -> bool,
) -> Result<bool, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT router, count(*) FILTER (WHERE template_version = $1), count(*)
             FROM tenantry.spare_roles GROUP BY router",
            &[&latest],
        )
        .await?;
    let number = |n: i64| usize::try_from(n).unwrap_or(0);
    let built: usize = rows.iter().map(|r| number(r.get(1))).sum();
    let spares: usize = rows.iter().map(|r| number(r.get(2))).sum();
    if built >= target.min(spares) {
        return Ok(true);
    }
    let stocks: Vec<usize> = if routers == 0 {
        vec![built]
    } else {
        (0..routers)
            .map(|k| {
                rows.iter()
                    .find(|r| usize::try_from(r.get::<_, i32>(0)).ok() == Some(k))
                    .map_or(0, |r| number(r.get(1)))
            })
            .collect()
    };
    if build_anyway(&stocks, share(target, routers)) {
        return Ok(true);
    }
    let recount = tokio::time::Instant::now() + RECOUNT_EVERY;
    let mut quiet = 0;
    loop {
        if busy() {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet == QUIET_POLLS {
                return Ok(true);
            }
        }
        if tokio::time::Instant::now() >= recount {
            return Ok(false);
        }
        tokio::time::sleep(QUIET_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{build_anyway, share, wants_refill};

    #[test]
    fn under_load_only_a_stock_below_a_quarter_of_its_share_is_built() {
        // A quarter of 100: 24 built is low, 25 waits for a quiet moment.
        assert!(build_anyway(&[0], 100));
        assert!(build_anyway(&[24], 100));
        assert!(!build_anyway(&[25], 100));
        assert!(!build_anyway(&[99], 100));
        // A stock of one is never held back; of two, only the first is
        // built whatever the load.
        assert!(build_anyway(&[0], 1));
        assert!(build_anyway(&[0], 2));
        assert!(!build_anyway(&[1], 2));
        // With routers, one router's stock low is enough.
        assert!(build_anyway(&[13, 2, 13], 13));
        assert!(!build_anyway(&[13, 4, 13], 13));
    }

    #[test]
    fn with_routers_each_keeps_its_share() {
        assert_eq!(share(1000, 0), 1000);
        assert_eq!(share(1000, 8), 125);
        assert_eq!(share(10, 4), 3);
    }

    #[test]
    fn the_stock_is_made_whole_below_half() {
        assert!(!wants_refill(500, 1000));
        assert!(wants_refill(499, 1000));
        assert!(!wants_refill(2, 4));
        assert!(wants_refill(1, 4));
        assert!(!wants_refill(1, 2));
        assert!(wants_refill(0, 2));
        assert!(wants_refill(0, 1));
        assert!(!wants_refill(1, 1));
    }
}
