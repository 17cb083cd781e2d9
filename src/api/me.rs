use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::api::extract::CurrentUser;
use crate::api::ApiError;
use crate::startup::AppState;

/// The caller's profile and tenant.
#[tracing::instrument(skip_all, fields(user = %user.claims.username))]
pub async fn me(state: web::Data<AppState>, user: CurrentUser) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT u.id, u.username, u.email, u.role, u.created_at, u.last_login_at,
                    t.schema_name, t.role_name, t.template_version, t.status, t.created_at
             FROM tenantry.users u LEFT JOIN tenantry.tenants t ON t.user_id = u.id
             WHERE u.id = $1",
        )
        .await?;
    // A valid token for a user that no longer exists is no longer valid.
    let row = client
        .query_opt(&stmt, &[&user.id()])
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let schema: Option<String> = row.get(6);
    let tenant = schema.map(|schema| {
        json!({
            "schema": schema,
            "role": row.get::<_, String>(7),
            "template_version": row.get::<_, i32>(8),
            "status": row.get::<_, String>(9),
            "created_at": row.get::<_, chrono::DateTime<chrono::Utc>>(10),
        })
    });
    Ok(HttpResponse::Ok().json(json!({
        "user_id": row.get::<_, uuid::Uuid>(0),
        "username": row.get::<_, String>(1),
        "email": row.get::<_, String>(2),
        "role": row.get::<_, String>(3),
        "created_at": row.get::<_, chrono::DateTime<chrono::Utc>>(4),
        "last_login_at": row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(5),
        "tenant": tenant,
    })))
}
