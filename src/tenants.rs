//! Reading the tenant registry (`tenantry.tenants`), for the CLI and the API.

use serde::Serialize;
use tokio_postgres::Row;

use crate::domain::Username;

/// One tenant as the registry and its account record it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TenantInfo {
    pub user_id: uuid::Uuid,
    pub username: String,
    pub email: String,
    /// Whether the account's email address is verified.
    pub email_verified: bool,
    pub schema: String,
    /// The tenant's own database role.
    pub role: String,
    pub template_version: i32,
    /// The registry's status (`active`, `migrating`, `failed`, `deleting`),
    /// or `suspended` while the account is suspended (the registry's status
    /// is then kept underneath: the fleet still migrates the tenant).
    pub status: String,
    /// When the account was suspended; null unless it is.
    pub suspended_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Why, as the admin wrote it; null without a reason or a suspension.
    pub suspension_reason: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// Bytes its schema takes (tables, indexes, TOAST) as last measured
    /// (`tenancy::usage`); null until first measured.
    pub usage_bytes: Option<i64>,
    /// When that was measured.
    pub usage_measured_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Its own storage quota in bytes (0: none); null follows
    /// `TENANTRY_TENANT_QUOTA_BYTES`.
    pub own_quota_bytes: Option<i64>,
    /// Since when its writes have been refused for being over its quota.
    pub over_quota_since: Option<chrono::DateTime<chrono::Utc>>,
}

/// The status shown for a tenant (see [`TenantInfo::status`]).
const STATUS: &str = "CASE WHEN u.suspended_at IS NOT NULL THEN 'suspended' ELSE t.status END";

static SELECT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT t.user_id, t.username, u.email, u.email_verified_at IS NOT NULL AS email_verified,
                t.schema_name, t.role_name, t.template_version, {STATUS} AS status,
                u.suspended_at, u.suspension_reason, t.created_at, t.updated_at,
                g.bytes AS usage_bytes, g.measured_at AS usage_measured_at,
                t.quota_bytes AS own_quota_bytes, t.over_quota_since
         FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
         LEFT JOIN tenantry.tenant_usage g ON g.user_id = t.user_id"
    )
});

fn from_row(row: &Row) -> TenantInfo {
    TenantInfo {
        user_id: row.get("user_id"),
        username: row.get("username"),
        email: row.get("email"),
        email_verified: row.get("email_verified"),
        schema: row.get("schema_name"),
        role: row.get("role_name"),
        template_version: row.get("template_version"),
        status: row.get("status"),
        suspended_at: row.get("suspended_at"),
        suspension_reason: row.get("suspension_reason"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        usage_bytes: row.get("usage_bytes"),
        usage_measured_at: row.get("usage_measured_at"),
        own_quota_bytes: row.get("own_quota_bytes"),
        over_quota_since: row.get("over_quota_since"),
    }
}

/// Every tenant, by username.
pub async fn list(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<TenantInfo>, tokio_postgres::Error> {
    let rows = client
        .query(&format!("{} ORDER BY t.username", *SELECT), &[])
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// One tenant, if it exists.
pub async fn find(
    client: &impl tokio_postgres::GenericClient,
    username: &Username,
) -> Result<Option<TenantInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!("{} WHERE t.username = $1", *SELECT),
            &[&username.as_str()],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// How a page of tenants is ordered, and where it continues.
#[derive(Debug, Clone, Copy)]
pub enum Order<'a> {
    /// By username, after this one.
    Name { after: Option<&'a str> },
    /// Largest first as last measured (the unmeasured last, as size -1),
    /// then by username; after this (size, username).
    Size { after: Option<(i64, &'a str)> },
}

/// The size a tenant sorts by in [`Order::Size`] (and its cursor holds).
pub fn size_key(tenant: &TenantInfo) -> i64 {
    tenant.usage_bytes.unwrap_or(-1)
}

/// A page of tenants in `order`, optionally of one status (as shown:
/// `suspended` is one), template version, and/or part of the username.
/// `limit` rows at most.
pub async fn page(
    client: &impl tokio_postgres::GenericClient,
    status: Option<&str>,
    version: Option<i32>,
    name_part: Option<&str>,
    order: Order<'_>,
    limit: i64,
) -> Result<Vec<TenantInfo>, tokio_postgres::Error> {
    const FILTER: &str = "($1::text IS NULL OR {STATUS} = $1)
                   AND ($2::int4 IS NULL OR t.template_version = $2)
                   AND ($4::text IS NULL OR pg_catalog.strpos(t.username, pg_catalog.lower($4)) > 0)";
    static BY_NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} WHERE {} AND ($5::text IS NULL OR t.username > $5)
             ORDER BY t.username LIMIT $3",
            *SELECT,
            FILTER.replace("{STATUS}", STATUS)
        )
    });
    static BY_SIZE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} WHERE {}
               AND ($6::int8 IS NULL OR coalesce(g.bytes, -1) < $6
                    OR (coalesce(g.bytes, -1) = $6 AND t.username > $5))
             ORDER BY coalesce(g.bytes, -1) DESC, t.username LIMIT $3",
            *SELECT,
            FILTER.replace("{STATUS}", STATUS)
        )
    });
    let rows = match order {
        Order::Name { after } => {
            client
                .query(
                    BY_NAME.as_str(),
                    &[&status, &version, &limit, &name_part, &after],
                )
                .await?
        }
        Order::Size { after } => {
            let (size, name) = (after.map(|a| a.0), after.map(|a| a.1));
            client
                .query(
                    BY_SIZE.as_str(),
                    &[&status, &version, &limit, &name_part, &name, &size],
                )
                .await?
        }
    };
    Ok(rows.iter().map(from_row).collect())
}

/// What a tenant's own page shows beyond its registry row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TenantDetail {
    #[serde(flatten)]
    pub tenant: TenantInfo,
    /// Its live sessions (signed-in devices; see `GET /api/auth/sessions`).
    pub sessions: i64,
    /// On Citus, the node that holds its tables, as `HOST:PORT`; null on
    /// plain PostgreSQL.
    pub node: Option<String>,
}

/// One tenant with its sessions and (on Citus) its node, if it exists.
pub async fn detail(
    client: &tokio_postgres::Client,
    username: &Username,
    citus: bool,
) -> Result<Option<TenantDetail>, tokio_postgres::Error> {
    static SESSIONS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT count(*) FROM (SELECT 1 FROM tenantry.refresh_tokens WHERE user_id = $1
                                   GROUP BY family_id HAVING {}) live",
            crate::auth::LIVE_SESSION
        )
    });
    let Some(tenant) = find(client, username).await? else {
        return Ok(None);
    };
    let sessions = client
        .query_one(SESSIONS.as_str(), &[&tenant.user_id])
        .await?
        .get(0);
    let node = if citus {
        crate::db::citus::placement(client, &tenant.schema)
            .await?
            .map(|(host, port)| format!("{host}:{port}"))
    } else {
        None
    };
    Ok(Some(TenantDetail {
        tenant,
        sessions,
        node,
    }))
}
