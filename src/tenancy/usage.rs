//! Usage and quotas: what each tenant's schema takes on disk, and the quota
//! past which its writes are refused.
//!
//! [`measure`] reads the size of every tenant schema's relations (indexes
//! and TOAST included; on Citus, their shards on the workers) in ONE query
//! for the whole fleet, stores it in `tenantry.tenant_usage` (V22), and
//! sets or clears `tenants.over_quota_since` for the tenants whose side of
//! their quota changed. The tenant guard reads that flag with the rest of
//! the registry row (`routing::ENTER`): a write to a tenant over its quota
//! is refused (403 `quota_exceeded`) at no extra round trip, and reads,
//! deletions, export and erasure keep working. `serve` measures every
//! `TENANTRY_USAGE_INTERVAL`; `tenants usage --refresh` measures at once.
//!
//! The size functions take each relation's lock for the moment they read
//! it, not until the transaction ends, so a measurement holds nothing a
//! signup or a fleet run waits on: it may wait behind a fleet run's
//! transaction on a tenant (at most `lock_timeout`, then it gives up until
//! the next interval), never the other way round. Its results are written
//! at the end of its transaction: the sizes to a table nobody else writes
//! (a measurement never overwrites a newer one), then the flag of the
//! tenants that crossed, from each row as it is then (a quota changed
//! meanwhile counts). One process measures the fleet at a time.

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::domain::Username;

/// Each tenant's bytes on plain PostgreSQL: its schema's tables, sequences
/// and materialized views with their indexes and TOAST. `$1`: one tenant's
/// username, or NULL for all.
const SIZES: &str = "SELECT t.user_id,
        COALESCE(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::int8 AS bytes
 FROM tenantry.tenants t
 LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema_name
 LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'm', 'S')
 WHERE $1::text IS NULL OR t.username = $1
 GROUP BY t.user_id";

/// The same on a Citus coordinator: a tenant's tables are shards on a
/// worker, and `citus_shard_sizes()` reads every shard's total size from
/// every node in one pass (the coordinator's shell tables are empty).
const SIZES_CITUS: &str = "WITH shards AS (
    SELECT d.logicalrelid, s.size
    FROM pg_catalog.citus_shard_sizes() s
    JOIN pg_catalog.pg_dist_shard d ON d.shardid = s.shard_id)
 SELECT t.user_id, COALESCE(sum(shards.size), 0)::int8 AS bytes
 FROM tenantry.tenants t
 LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema_name
 LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid
 LEFT JOIN shards ON shards.logicalrelid = c.oid
 WHERE $1::text IS NULL OR t.username = $1
 GROUP BY t.user_id";

/// Store measured sizes (`$1` user ids, `$2` bytes, `$3` when measured)
/// for the tenants that still exist (one erased meanwhile is left out, not
/// an error), unless a newer measurement was stored meanwhile.
const STORE: &str = "INSERT INTO tenantry.tenant_usage AS u (user_id, bytes, measured_at)
 SELECT t.user_id, m.bytes, $3
 FROM unnest($1::uuid[], $2::int8[]) AS m(user_id, bytes)
 JOIN tenantry.tenants t ON t.user_id = m.user_id
 ORDER BY t.user_id
 FOR KEY SHARE OF t
 ON CONFLICT (user_id) DO UPDATE SET bytes = EXCLUDED.bytes, measured_at = EXCLUDED.measured_at
 WHERE u.measured_at < EXCLUDED.measured_at";

/// The quota in force of tenants row `t` (`$1`: the default; 0 is none)
/// and whether usage row `g` is over it.
macro_rules! over {
    () => {
        "(COALESCE(t.quota_bytes, $1) > 0 AND g.bytes > COALESCE(t.quota_bytes, $1))"
    };
}

/// Set `over_quota_since` for the tenants (`$2`: one, or NULL for all)
/// found over their quota (their own, else `$1`; 0 is none) and clear it
/// for those found back under; only rows whose side changed are written,
/// and the quota is read from the row being written (a quota changed by a
/// concurrent `set_quota` counts). Returns each change: username and
/// whether it is now over.
const CROSSINGS: &str = concat!(
    "UPDATE tenantry.tenants t
    SET over_quota_since = CASE WHEN ",
    over!(),
    " THEN pg_catalog.now() END
   FROM tenantry.tenant_usage g
  WHERE g.user_id = t.user_id AND ($2::text IS NULL OR t.username = $2)
    AND (t.over_quota_since IS NULL) = ",
    over!(),
    "
 RETURNING t.username, t.over_quota_since IS NOT NULL AS over, t.user_id, g.bytes,
           COALESCE(t.quota_bytes, $1) AS quota"
);

/// Taken (try, transaction-scoped) by a measurement of the whole fleet:
/// with several `serve` processes, one measures at a time and the others
/// skip that interval.
const FLEET_MEASUREMENT_LOCK: &str =
    "SELECT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('tenantry.usage'))";

/// What one measurement did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Measured {
    /// Tenants measured.
    pub tenants: usize,
    /// Their bytes, summed.
    pub bytes: i64,
    /// Tenants found over their quota that were not before.
    pub now_over: Vec<String>,
    /// Tenants found back under their quota.
    pub now_under: Vec<String>,
}

/// Measure every tenant (or `only` one), store the sizes and update who is
/// over quota, in one transaction that waits at most 10 s for any lock;
/// `default_quota` is `TENANTRY_TENANT_QUOTA_BYTES` (0: none). A
/// measurement of the fleet while another process runs one measures
/// nothing (`None`).
pub async fn measure(
    client: &mut tokio_postgres::Client,
    citus: bool,
    only: Option<&Username>,
    default_quota: u64,
) -> Result<Option<Measured>, tokio_postgres::Error> {
    let name = only.map(Username::as_str);
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    if only.is_none()
        && !tx
            .query_one(FLEET_MEASUREMENT_LOCK, &[])
            .await?
            .get::<_, bool>(0)
    {
        return Ok(None);
    }
    let at: chrono::DateTime<chrono::Utc> = tx
        .query_one("SELECT pg_catalog.statement_timestamp()", &[])
        .await?
        .get(0);
    let rows = tx
        .query(if citus { SIZES_CITUS } else { SIZES }, &[&name])
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let bytes: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    tx.execute(STORE, &[&ids, &bytes, &at]).await?;
    let mut measured = Measured {
        tenants: ids.len(),
        bytes: bytes.iter().sum(),
        ..Measured::default()
    };
    for row in tx
        .query(CROSSINGS, &[&quota_param(default_quota), &name])
        .await?
    {
        let username: String = row.get(0);
        if row.get::<_, bool>(1) {
            quota_exceeded(&tx, &row).await?;
            measured.now_over.push(username);
        } else {
            measured.now_under.push(username);
        }
    }
    tx.commit().await?;
    Ok(Some(measured))
}

/// `VACUUM` of a tenant's tables, the list written by the server
/// (`format('%I.%I')`), or NULL if it has none. `$1`: its username.
const VACUUM_LIST: &str = "SELECT t.role_name,
        'VACUUM (FULL) ' || string_agg(pg_catalog.format('%I.%I', n.nspname, c.relname), ', ')
 FROM tenantry.tenants t
 JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema_name
 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'm')
 WHERE t.username = $1
 GROUP BY t.role_name";

/// Before one tenant over its quota is measured on demand: `VACUUM FULL`
/// its tables as its own role (their owner), so that the space of the rows
/// it deleted goes back to the file system. Plain `VACUUM` only makes that
/// space reusable: the files (a search index above all) keep their size,
/// and the tenant would stay over its quota however much it deleted. Each
/// table is rewritten under an exclusive lock, so the tenant's requests
/// wait for its own rewrite, which is bounded by its quota; a lock not
/// granted within 5 s gives up (the measurement goes on without it). Rows
/// deleted while an older snapshot is open (a long transaction or a backup
/// in the same database, a `CREATE DATABASE` anywhere) are kept until it
/// ends: a later refresh reclaims them. The connection's role and settings
/// are reset whatever happens.
pub async fn reclaim(
    client: &impl GenericClient,
    username: &Username,
) -> Result<bool, tokio_postgres::Error> {
    let over = client
        .query_opt(
            "SELECT 1 FROM tenantry.tenants WHERE username = $1 AND over_quota_since IS NOT NULL",
            &[&username.as_str()],
        )
        .await?;
    if over.is_none() {
        return Ok(false);
    }
    let Some(row) = client.query_opt(VACUUM_LIST, &[&username.as_str()]).await? else {
        return Ok(false);
    };
    let role: String = row.get(0);
    let vacuum: Option<String> = row.get(1);
    let (Ok(role), Some(vacuum)) = (crate::domain::RoleName::parse(&role), vacuum) else {
        return Ok(false);
    };
    client
        .batch_execute(&format!(
            "SET ROLE {}; SET lock_timeout = '5s'",
            role.quoted()
        ))
        .await?;
    // VACUUM runs outside a transaction: a statement of its own.
    let vacuumed = client.batch_execute(&vacuum).await;
    client.batch_execute(crate::db::SESSION_RESET).await?;
    vacuumed.map(|()| true)
}

/// Measure one tenant now (`tenants usage NAME --refresh`, `GET
/// …/usage?refresh=true`), [`reclaim`]ing first if it is over its quota,
/// on a connection of its own that is closed afterwards (a `SET ROLE` never
/// reaches a pool). Run as a task of its own, so that a caller that goes
/// away does not cut it off between the role and its reset.
pub async fn measure_now(
    connector: &crate::db::Connector,
    citus: bool,
    username: &Username,
    default_quota: u64,
) -> Result<Measured, crate::db::DbError> {
    let connector = connector.clone();
    let username = username.clone();
    let task = tokio::spawn(async move {
        // Kept as a `Connection`: it holds its place under the cap until
        // it is closed.
        let mut client = connector.connect(crate::db::Dedicated::Usage).await?;
        if let Err(e) = reclaim(&*client, &username).await {
            tracing::warn!(error = %e, "cannot vacuum a tenant over its quota; measuring it as it is");
        }
        let measured = measure(&mut client, citus, Some(&username), default_quota).await?;
        Ok::<_, crate::db::DbError>(measured.unwrap_or_default())
    });
    task.await?
}

/// Whether the fleet's usage is due to be measured: nothing measured yet,
/// or the oldest measurement older than `every`. (A measurement of the
/// whole fleet stamps every row; one tenant refreshed on demand does not
/// put the others off. A tenant not measured yet waits for the next.)
pub async fn due(
    client: &impl GenericClient,
    every: std::time::Duration,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT coalesce(min(measured_at) < pg_catalog.now() - pg_catalog.make_interval(secs => $1), true)
             FROM tenantry.tenant_usage",
            &[&every.as_secs_f64()],
        )
        .await?
        .get(0))
}

/// `tenant.quota_exceeded` for a row of [`CROSSINGS`] that went over: once
/// per crossing, in its transaction.
async fn quota_exceeded(
    client: &impl GenericClient,
    row: &tokio_postgres::Row,
) -> Result<(), tokio_postgres::Error> {
    let event = crate::webhooks::Event::tenant(
        crate::webhooks::EventType::TenantQuotaExceeded,
        row.get(2),
        row.get::<_, &str>(0),
        serde_json::json!({ "bytes": row.get::<_, i64>(3), "quota_bytes": row.get::<_, i64>(4) }),
    );
    crate::webhooks::record(client, &event).await
}

fn quota_param(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A tenant's own quota, as an admin sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// At most this many bytes (0: none, whatever the default).
    Bytes(u64),
    /// Whatever `TENANTRY_TENANT_QUOTA_BYTES` says.
    Default,
}

impl Quota {
    /// `BYTES` (a whole number, optionally with a unit: `kB`, `MB`, `GB`,
    /// `TB` or `KiB`, `MiB`, `GiB`, `TiB`), `none` or `default`.
    pub fn parse(raw: &str) -> Result<Quota, String> {
        let raw = raw.trim();
        match raw {
            "none" => return Ok(Quota::Bytes(0)),
            "default" => return Ok(Quota::Default),
            _ => {}
        }
        crate::configuration::parse_bytes(raw)
            .map(Quota::Bytes)
            .map_err(|e| format!("{e}; or none (no quota) or default"))
    }

    fn column(self) -> Option<i64> {
        match self {
            Quota::Bytes(b) => Some(quota_param(b)),
            Quota::Default => None,
        }
    }
}

/// One tenant's usage as last measured, and its quota.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub username: String,
    /// Bytes its schema takes (tables, indexes, TOAST); null until first
    /// measured.
    pub bytes: Option<i64>,
    /// When it was measured; null until then.
    pub measured_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The quota in force, in bytes; null for none.
    pub quota_bytes: Option<i64>,
    /// Where the quota comes from: `tenant` (its own) or `default`
    /// (`TENANTRY_TENANT_QUOTA_BYTES`).
    pub quota_source: String,
    /// Since when writes have been refused for being over the quota; null
    /// while they are not.
    pub over_quota_since: Option<chrono::DateTime<chrono::Utc>>,
}

const USAGE: &str = "SELECT t.username, g.bytes, g.measured_at,
        NULLIF(COALESCE(t.quota_bytes, $1), 0) AS quota_bytes,
        CASE WHEN t.quota_bytes IS NULL THEN 'default' ELSE 'tenant' END AS quota_source,
        t.over_quota_since
 FROM tenantry.tenants t LEFT JOIN tenantry.tenant_usage g ON g.user_id = t.user_id
 WHERE $2::text IS NULL OR t.username = $2
 ORDER BY t.username";

fn usage_of(row: &tokio_postgres::Row) -> Usage {
    Usage {
        username: row.get("username"),
        bytes: row.get("bytes"),
        measured_at: row.get("measured_at"),
        quota_bytes: row.get("quota_bytes"),
        quota_source: row.get("quota_source"),
        over_quota_since: row.get("over_quota_since"),
    }
}

/// Every tenant's usage (or `only` one's: empty if there is no such
/// tenant), by username.
pub async fn usage(
    client: &impl GenericClient,
    only: Option<&Username>,
    default_quota: u64,
) -> Result<Vec<Usage>, tokio_postgres::Error> {
    let rows = client
        .query(
            USAGE,
            &[&quota_param(default_quota), &only.map(Username::as_str)],
        )
        .await?;
    Ok(rows.iter().map(usage_of).collect())
}

/// Set a tenant's own quota and, from its last measured usage, whether its
/// writes are refused (at once, not at the next measurement); audited as
/// `tenant_quota_set` by `actor`. `None` if there is no such tenant.
pub async fn set_quota(
    client: &mut tokio_postgres::Client,
    username: &Username,
    quota: Quota,
    default_quota: u64,
    by: &crate::tenancy::suspension::ChangedBy,
    pseudonyms: &crate::audit::Pseudonyms,
) -> Result<Option<Usage>, tokio_postgres::Error> {
    use crate::audit::{self, Action, Entry};
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "UPDATE tenantry.tenants SET quota_bytes = $2 WHERE username = $1 RETURNING user_id",
            &[&username.as_str(), &quota.column()],
        )
        .await?
    else {
        return Ok(None);
    };
    let user_id: Uuid = row.get(0);
    for row in tx
        .query(
            CROSSINGS,
            &[&quota_param(default_quota), &Some(username.as_str())],
        )
        .await?
    {
        if row.get::<_, bool>(1) {
            quota_exceeded(&tx, &row).await?;
        }
    }
    let entry = Entry::new(Action::TenantQuotaSet)
        .detail("quota_bytes", quota.column())
        .actor(by.actor.clone())
        .subject(pseudonyms.user(user_id))
        .client(by.client.clone());
    audit::append(&tx, &entry).await?;
    let usage = usage(&tx, Some(username), default_quota)
        .await?
        .into_iter()
        .next();
    tx.commit().await?;
    Ok(usage)
}

/// The bounds (bytes) of `tenantry_tenants_by_usage{le}` in `/metrics`.
pub const USAGE_BUCKETS: [i64; 5] = [1 << 20, 10 << 20, 100 << 20, 1 << 30, 10 << 30];

/// The fleet's usage as a distribution, for `/metrics`: how many measured
/// tenants are at or under each of [`USAGE_BUCKETS`] (and in all), their
/// bytes summed, and how many are over quota. No tenant is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    /// Cumulative, one per [`USAGE_BUCKETS`] bound.
    pub at_or_under: Vec<i64>,
    pub measured: i64,
    pub bytes: i64,
    pub over_quota: i64,
}

pub async fn distribution(
    client: &impl GenericClient,
) -> Result<Distribution, tokio_postgres::Error> {
    // width_bucket(bytes - 1, bounds) is how many bounds are below bytes.
    let rows = client
        .query(
            "SELECT pg_catalog.width_bucket(bytes - 1, $1::int8[]), count(*), sum(bytes)::int8
             FROM tenantry.tenant_usage GROUP BY 1",
            &[&USAGE_BUCKETS.to_vec()],
        )
        .await?;
    let over_quota: i64 = client
        .query_one(
            "SELECT count(*) FROM tenantry.tenants WHERE over_quota_since IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let mut d = Distribution {
        at_or_under: vec![0; USAGE_BUCKETS.len()],
        measured: 0,
        bytes: 0,
        over_quota,
    };
    for row in rows {
        let below: i32 = row.get(0);
        let count: i64 = row.get(1);
        d.measured += count;
        d.bytes += row.get::<_, i64>(2);
        for slot in d.at_or_under.iter_mut().skip(below.max(0) as usize) {
            *slot += count;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_units_and_refuse_what_is_not_one() {
        use crate::configuration::parse_bytes;
        assert_eq!(parse_bytes("500000"), Ok(500_000));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in [
            "",
            "-1",
            "1.5GB",
            "ten",
            "10 XB",
            "99999999999999999999",
            "10000000TB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Quota::parse("none"), Ok(Quota::Bytes(0)));
        assert_eq!(Quota::parse("default"), Ok(Quota::Default));
        assert_eq!(Quota::parse("1kB"), Ok(Quota::Bytes(1000)));
    }
}
