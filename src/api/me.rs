//! `/api/me`: the caller's profile, the export of their data and erasure.

use actix_web::{delete, get, web, HttpResponse};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::api::extract::CurrentUser;
use crate::api::extract::JsonBody;
use crate::api::ApiError;
use crate::api::AppState;
use crate::tenancy::export::ExportError;

/// The caller's account.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Profile {
    pub user_id: Uuid,
    pub username: String,
    pub email: String,
    /// Whether the address was verified (the link mailed at signup, or
    /// after an email change, was used).
    pub email_verified: bool,
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
    /// None for staff accounts.
    pub tenant: Option<ProfileTenant>,
}

/// The caller's tenant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProfileTenant {
    pub schema: String,
    /// Its database role.
    pub role: String,
    pub template_version: i32,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// The caller's profile and tenant.
#[utoipa::path(
    tag = "me",
    security(("bearer" = [])),
    responses((status = 200, description = "The caller's account and tenant", body = Profile))
)]
#[get("/api/me")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn me(state: web::Data<AppState>, user: CurrentUser) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT u.id, u.username, u.email, u.role, u.created_at, u.last_login_at,
                    t.schema_name, t.role_name, t.template_version, t.status, t.created_at,
                    u.email_verified_at IS NOT NULL
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
    let tenant = schema.map(|schema| ProfileTenant {
        schema,
        role: row.get(7),
        template_version: row.get(8),
        status: row.get(9),
        created_at: row.get(10),
    });
    Ok(HttpResponse::Ok().json(Profile {
        user_id: row.get(0),
        username: row.get(1),
        email: row.get(2),
        email_verified: row.get(11),
        role: row.get(3),
        created_at: row.get(4),
        last_login_at: row.get(5),
        tenant,
    }))
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// The account's current password (re-authentication).
    password: String,
}

/// `DELETE /api/me` `{password}`: the caller's tenant, account and sessions
/// erased for good (re-authenticated: a wrong password removes nothing).
/// 200 with the receipt.
#[utoipa::path(
    tag = "me",
    request_body = EraseRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Erased; what was removed", body = crate::tenancy::erasure::Receipt),
        (status = 401, description = "Wrong password, or no valid token", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "The tenant is busy (a migration holds it); retry", body = crate::api::openapi::ErrorBody),
    )
)]
#[delete("/api/me")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn erase(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    user: CurrentUser,
    body: JsonBody<EraseRequest>,
) -> Result<HttpResponse, ApiError> {
    crate::api::auth::reauthenticate(&state, user.id(), body.into_inner().password).await?;
    let username = crate::domain::Username::parse(&user.claims.username)
        .map_err(|_| ApiError::Unauthorized)?;
    let receipt = erase_tenant(
        &state,
        &username,
        crate::tenancy::erasure::Requester {
            actor: state.pseudonyms.user(user.id()),
            client: crate::api::auth::client_of(&state, &request),
            reason: "self-service",
            only_unverified: false,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(receipt))
}

/// Run an erasure on a pooled connection (its settings are transaction-local),
/// in a task of its own: an erasure is several transactions, and a client
/// that hangs up (its handler is dropped) must not leave it half done.
pub(crate) async fn erase_tenant(
    state: &web::Data<AppState>,
    username: &crate::domain::Username,
    requester: crate::tenancy::erasure::Requester,
) -> Result<crate::tenancy::erasure::Receipt, ApiError> {
    let state = state.clone();
    let username = username.clone();
    let erasure = tokio::spawn(async move {
        let mut client = state.pool.get().await?;
        let receipt = crate::tenancy::erasure::erase(
            &mut client,
            &username,
            &state.pseudonyms,
            &requester,
            std::time::Duration::from_secs(5),
        )
        .await?;
        state.letters.forget_files(&receipt.mail);
        Ok::<_, ApiError>(receipt)
    });
    erasure.await.map_err(ApiError::internal)?
}

/// `GET /api/me/export`: every row of the caller's tenant and their account
/// data, one JSON document from one snapshot, streamed (see
/// `tenancy::export` for the format). A stream cut short lacks its
/// integrity trailer, so a truncated download is recognisable.
///
/// Exports run on connections of their own, as many at once as
/// `TENANTRY_EXPORT_CONCURRENCY` allows and one per user (`api::exports`);
/// a client that takes no data for `TENANTRY_CLIENT_TIMEOUT`, or an export
/// that runs past `TENANTRY_EXPORT_TIMEOUT`, is cut off and its transaction
/// ends; an erasure or a fleet migration of the tenant ends a running export
/// rather than wait for it (and refuses new ones meanwhile: 503
/// `tenant_busy`).
#[utoipa::path(
    tag = "me",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every row of the caller's tenant and their account, with an integrity trailer",
         content_type = "application/json", body = Object,
         headers(("Content-Disposition" = String, description = "attachment; filename=\"<username>-export.json\""))),
        (status = 404, description = "The caller has no tenant (a staff account)", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "An export of the caller's is still running (`export_in_progress`)", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "As many exports as the service runs at once are running (`exports_busy`), every connection outside the pool is in use (`connections_busy`), the tenant is being erased or migrated (`tenant_busy`), or the database is unavailable", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
#[get("/api/me/export")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn export(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<HttpResponse, ApiError> {
    let slot = state.exports.take(user.id())?;
    // Under the cap of connections outside the pool: past it, a 503.
    let mut client = state
        .connector
        .connect(crate::db::Dedicated::Export)
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let key = state.export_key.clone();
    let user_id = user.id();
    let pace = crate::tenancy::export::Pace {
        stall: state.client_timeout,
        within: state.export_timeout,
    };
    let task = tokio::spawn(async move {
        let result =
            crate::tenancy::export::export(&mut client, user_id, &key, tx, Some(pace)).await;
        crate::metrics::export(match &result {
            Ok(()) => "completed",
            Err(ExportError::Stalled) => "cut_off",
            Err(ExportError::TooLong) => "too_long",
            Err(ExportError::Busy) => "refused_tenant_busy",
            Err(ExportError::Closed) => "abandoned",
            Err(_) => "failed",
        });
        // The place is given back with the connection.
        drop(client);
        drop(slot);
        result
    });
    let Some(first) = rx.recv().await else {
        return match task.await {
            Ok(Err(ExportError::NoTenant)) => Err(ApiError::NotFound("no tenant to export".into())),
            Ok(Err(e @ ExportError::Busy)) => Err(ApiError::Busy {
                code: "tenant_busy",
                message: e.to_string(),
            }),
            Ok(Err(ExportError::Postgres(e))) => Err(e.into()),
            Ok(Err(e)) => Err(ApiError::internal(e)),
            Ok(Ok(())) => Err(ApiError::internal(std::io::Error::other("empty export"))),
            Err(e) => Err(ApiError::internal(e)),
        };
    };
    // An export that fails after its first chunk ends the response with an
    // error, which closes the connection: the client sees no trailer.
    let rest = futures::stream::unfold(Some((rx, task)), |state| async move {
        let (mut rx, task) = state?;
        match rx.recv().await {
            Some(chunk) => Some((Ok(web::Bytes::from(chunk)), Some((rx, task)))),
            None => match task.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
                Err(e) => Some((Err(actix_web::error::ErrorInternalServerError(e)), None)),
            },
        }
    });
    let body = futures::stream::once(async move { Ok(web::Bytes::from(first)) }).chain(rest);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((
            "Content-Disposition",
            format!(
                "attachment; filename=\"{}-export.json\"",
                user.claims.username
            ),
        ))
        .streaming(body))
}
