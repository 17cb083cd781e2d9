//! `/api/auth/sessions` and `/api/auth/revoke-all`: a user's sessions (one
//! per refresh-token family) and ending them.

use actix_web::{delete, get, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use actix_web::HttpRequest;

use crate::api::auth::client_of;
use crate::api::extract::CurrentUser;
use crate::api::ApiError;
use crate::api::AppState;
use crate::audit::{self, Action, Entry};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Session {
    /// The family id; `DELETE /api/auth/sessions/{id}` ends it.
    pub id: Uuid,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When its current refresh token was issued (the last refresh).
    pub last_used_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Whether the calling access token was issued in this session.
    pub current: bool,
}

/// The caller's live sessions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Sessions {
    pub sessions: Vec<Session>,
}

/// `GET /api/auth/sessions`: the caller's live sessions, most recent first.
#[utoipa::path(
    tag = "auth",
    security(("bearer" = [])),
    responses((status = 200, description = "Live sessions, most recent first", body = Sessions))
)]
#[get("/api/auth/sessions")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn list(state: web::Data<AppState>, user: CurrentUser) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    static LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT family_id, (array_agg(user_agent ORDER BY id DESC))[1] AS user_agent,
                    min(created_at) AS created_at, max(created_at) AS last_used_at,
                    max(expires_at) AS expires_at
             FROM tenantry.refresh_tokens
             WHERE user_id = $1
             GROUP BY family_id
             HAVING {}
             ORDER BY max(created_at) DESC",
            crate::auth::LIVE_SESSION
        )
    });
    let stmt = client.prepare_cached(&LIST).await?;
    let sessions: Vec<Session> = client
        .query(&stmt, &[&user.id()])
        .await?
        .iter()
        .map(|row| Session {
            id: row.get("family_id"),
            user_agent: row.get("user_agent"),
            created_at: row.get("created_at"),
            last_used_at: row.get("last_used_at"),
            expires_at: row.get("expires_at"),
            current: user.claims.sid == Some(row.get("family_id")),
        })
        .collect();
    Ok(HttpResponse::Ok().json(Sessions { sessions }))
}

/// `DELETE /api/auth/sessions/{id}` → 204; 404 for a session that is not
/// the caller's (or already ended).
#[utoipa::path(
    tag = "auth",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The session's id (from `GET /api/auth/sessions`)")),
    responses(
        (status = 204, description = "Ended"),
        (status = 404, description = "No such session of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[delete("/api/auth/sessions/{id}")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn end(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: CurrentUser,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let family = id.into_inner();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let revoked = tx
        .execute(
            "UPDATE tenantry.refresh_tokens SET revoked_at = now()
             WHERE user_id = $1 AND family_id = $2 AND revoked_at IS NULL",
            &[&user.id(), &family],
        )
        .await?;
    if revoked == 0 {
        return Err(ApiError::NotFound("no such session".into()));
    }
    audit::append(
        &*tx,
        &Entry::new(Action::SessionRevoked)
            .actor(state.pseudonyms.user(user.id()))
            .client(client_of(&state, &request))
            .detail("session", family),
    )
    .await?;
    tx.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `POST /api/auth/revoke-all` → 204: every session of the caller ends (no
/// refresh token of theirs works any more; access tokens run out within
/// their 15 minutes; a password change ends those at once).
#[utoipa::path(
    tag = "auth",
    security(("bearer" = [])),
    responses((status = 204, description = "Every session ended"))
)]
#[post("/api/auth/revoke-all")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn revoke_all(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: CurrentUser,
) -> Result<HttpResponse, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let revoked = tx
        .execute(crate::auth::REVOKE_ALL_SESSIONS, &[&user.id()])
        .await?;
    // Reset links and a pending email change end too.
    tx.execute(crate::api::account::END_PENDING_TOKENS, &[&user.id()])
        .await?;
    // Every access token of the user ends with its sessions, this one's too.
    tx.execute(
        "UPDATE tenantry.users SET token_generation = token_generation + 1 WHERE id = $1",
        &[&user.id()],
    )
    .await?;
    audit::append(
        &*tx,
        &Entry::new(Action::SessionsRevokedAll)
            .actor(state.pseudonyms.user(user.id()))
            .client(client_of(&state, &request))
            .detail("revoked_tokens", revoked),
    )
    .await?;
    tx.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}
