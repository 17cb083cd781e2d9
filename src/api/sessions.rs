//! `/api/auth/sessions` and `/api/auth/revoke-all`: a user's sessions (one
//! per refresh-token family) and ending them.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::api::{ApiError, AuthenticatedUser};
use crate::startup::AppState;

#[derive(Debug, Serialize)]
pub struct Session {
    /// The family id; `DELETE /api/auth/sessions/{id}` ends it.
    pub id: Uuid,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When its current refresh token was issued (the last refresh).
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// `GET /api/auth/sessions`: the caller's live sessions, most recent first.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn list(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT family_id, (array_agg(user_agent ORDER BY id DESC))[1] AS user_agent,
                    min(created_at) AS created_at, max(created_at) AS last_used_at,
                    max(expires_at) AS expires_at
             FROM tenantry.refresh_tokens
             WHERE user_id = $1
             GROUP BY family_id
             HAVING bool_and(revoked_at IS NULL) AND bool_or(used_at IS NULL AND expires_at > now())
             ORDER BY max(created_at) DESC",
        )
        .await?;
    let sessions: Vec<Session> = client
        .query(&stmt, &[&user.0.sub])
        .await?
        .iter()
        .map(|row| Session {
            id: row.get("family_id"),
            user_agent: row.get("user_agent"),
            created_at: row.get("created_at"),
            last_used_at: row.get("last_used_at"),
            expires_at: row.get("expires_at"),
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "sessions": sessions })))
}

/// `DELETE /api/auth/sessions/{id}` → 204; 404 for a session that is not
/// the caller's (or already ended).
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn end(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let revoked = client
        .execute(
            "UPDATE tenantry.refresh_tokens SET revoked_at = now()
             WHERE user_id = $1 AND family_id = $2 AND revoked_at IS NULL",
            &[&user.0.sub, &id.into_inner()],
        )
        .await?;
    if revoked == 0 {
        return Err(ApiError::NotFound("no such session".into()));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/auth/revoke-all` → 204: every session of the caller ends.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn revoke_all(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    client
        .execute(
            "UPDATE tenantry.refresh_tokens SET revoked_at = now()
             WHERE user_id = $1 AND revoked_at IS NULL",
            &[&user.0.sub],
        )
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
