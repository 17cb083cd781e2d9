//! Reading the tenant registry (`tenantry.tenants`), for the CLI and the API.

use serde::Serialize;
use tokio_postgres::Row;

use crate::domain::Username;

/// One tenant as the registry records it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TenantInfo {
    pub user_id: uuid::Uuid,
    pub username: String,
    pub email: String,
    pub schema: String,
    /// The tenant's own database role.
    pub role: String,
    pub template_version: i32,
    pub status: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

const SELECT: &str = "\
SELECT t.user_id, t.username, u.email, t.schema_name, t.role_name, t.template_version, t.status,
       t.created_at, t.updated_at
FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id";

fn from_row(row: &Row) -> TenantInfo {
    TenantInfo {
        user_id: row.get(0),
        username: row.get(1),
        email: row.get(2),
        schema: row.get(3),
        role: row.get(4),
        template_version: row.get(5),
        status: row.get(6),
        created_at: row.get(7),
        updated_at: row.get(8),
    }
}

/// Every tenant, by username.
pub async fn list(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<TenantInfo>, tokio_postgres::Error> {
    let rows = client
        .query(&format!("{SELECT} ORDER BY t.username"), &[])
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
            &format!("{SELECT} WHERE t.username = $1"),
            &[&username.as_str()],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// A page of tenants by username, after `after`, optionally of one status
/// and/or template version. `limit` rows at most.
pub async fn page(
    client: &impl tokio_postgres::GenericClient,
    status: Option<&str>,
    version: Option<i32>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<TenantInfo>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{SELECT}
                 WHERE ($1::text IS NULL OR t.status = $1)
                   AND ($2::int4 IS NULL OR t.template_version = $2)
                   AND ($3::text IS NULL OR t.username > $3)
                 ORDER BY t.username LIMIT $4"
            ),
            &[&status, &version, &after, &limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}
