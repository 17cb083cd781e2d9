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

/// A page of tenants by username, after `after`, optionally of one status
/// (as shown: `suspended` is one) and/or template version. `limit` rows at
/// most.
pub async fn page(
    client: &impl tokio_postgres::GenericClient,
    status: Option<&str>,
    version: Option<i32>,
    name_part: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<TenantInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{}
                 WHERE ($1::text IS NULL OR {STATUS} = $1)
                   AND ($2::int4 IS NULL OR t.template_version = $2)
                   AND ($5::text IS NULL OR pg_catalog.strpos(t.username, pg_catalog.lower($5)) > 0)
                   AND ($3::text IS NULL OR t.username > $3)
                 ORDER BY t.username LIMIT $4",
                *SELECT
            ),
            &[&status, &version, &after, &limit, &name_part],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}
