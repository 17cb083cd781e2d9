//! Signup, login, and refresh-token rotation and revocation.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::api::ApiError;
use crate::auth::{self, ACCESS_TOKEN_SECONDS};
use crate::domain::{Email, Password, Username};
use crate::provisioning::{self, NewAccount, RefreshTokenRow};
use crate::startup::AppState;

fn agent_of(request: &HttpRequest) -> Option<String> {
    auth::user_agent(
        request
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    username: String,
    email: String,
    password: String,
}

/// `POST /api/auth/register`: a user and their complete tenant, or nothing.
#[tracing::instrument(skip_all, fields(tenant = tracing::field::Empty))]
pub async fn register(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let username = Username::parse(&body.username)?;
    tracing::Span::current().record("tenant", username.as_str());
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;

    // Spare the bcrypt work for a name or email that is plainly taken. The
    // transaction below is what guarantees uniqueness; this is only a
    // shortcut.
    {
        let client = state.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT username = $1 FROM tenantry.users WHERE username = $1 OR email = $2 LIMIT 1",
            )
            .await?;
        if let Some(row) = client
            .query_opt(&stmt, &[&username.as_str(), &email.as_str()])
            .await?
        {
            let same_name: bool = row.get(0);
            return Err(provisioning::ProvisionError::from_taken(same_name, &username).into());
        }
    }

    let password_hash = auth::hash_password(&password, state.bcrypt_cost).await?;
    let (refresh_token, refresh_hash) = auth::new_refresh_token();
    let account = NewAccount {
        username,
        email,
        password_hash,
        role: "user",
        refresh_token: Some(RefreshTokenRow {
            family_id: Uuid::new_v4(),
            hash: refresh_hash,
            user_agent: agent_of(&request),
        }),
    };
    let mut client = state.pool.get().await?;
    let tenant =
        provisioning::provision(&mut client, &state.installation, &state.templates, &account)
            .await?;
    let access_token = state.jwt.issue(
        tenant.user_id,
        tenant.username.as_str(),
        Some(tenant.schema.as_str()),
        Some(tenant.role.as_str()),
        "user",
    )?;
    Ok(HttpResponse::Created().json(json!({
        "user_id": tenant.user_id,
        "username": tenant.username.as_str(),
        "schema": tenant.schema.as_str(),
        "template_version": tenant.template_version.get(),
        "access_token": access_token,
        "refresh_token": refresh_token,
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_SECONDS,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
}

/// A login's writes, in one statement: a new refresh-token family, and
/// the time of the login.
static LOGIN_WRITES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH t AS ({}) UPDATE tenantry.users SET last_login_at = now() WHERE id = $2",
        auth::INSERT_REFRESH_TOKEN
    )
});

/// `POST /api/auth/login`. An unknown user and a wrong password get the same
/// 401, in body and in time: unknown users are verified against a dummy hash.
#[tracing::instrument(skip_all)]
pub async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let account = match Username::parse(&body.username) {
        Ok(username) => {
            let client = state.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT u.id, u.username, u.password_hash, u.role, t.schema_name, t.role_name
                     FROM tenantry.users u LEFT JOIN tenantry.tenants t ON t.user_id = u.id
                     WHERE u.username = $1",
                )
                .await?;
            client.query_opt(&stmt, &[&username.as_str()]).await?
        }
        Err(_) => None,
    };
    let hash = account
        .as_ref()
        .map(|row| row.get::<_, String>(2))
        .unwrap_or_else(|| state.dummy_hash.clone());
    // bcrypt only reads 72 bytes; a longer password was never accepted at
    // signup, so it can never be right (but costs the same to refuse).
    let too_long = body.password.len() > 72;
    let verified = auth::verify_password(body.password, hash).await?;
    let row = match account {
        Some(row) if verified && !too_long => row,
        _ => return Err(ApiError::InvalidCredentials),
    };

    let user_id: Uuid = row.get(0);
    let username: String = row.get(1);
    let role: String = row.get(3);
    let schema: Option<String> = row.get(4);
    let db_role: Option<String> = row.get(5);
    let (refresh_token, refresh_hash) = auth::new_refresh_token();
    let client = state.pool.get().await?;
    let stmt = client.prepare_cached(&LOGIN_WRITES).await?;
    client
        .execute(
            &stmt,
            &[
                &Uuid::new_v4(),
                &user_id,
                &refresh_hash,
                &agent_of(&request),
            ],
        )
        .await?;
    token_pair(
        &state,
        Account {
            user_id,
            username,
            role,
            schema,
            db_role,
        },
        refresh_token,
    )
}

/// Whom a token pair is for.
struct Account {
    user_id: Uuid,
    username: String,
    role: String,
    schema: Option<String>,
    db_role: Option<String>,
}

/// The 200 of login and refresh: a new access token with the given
/// refresh token.
fn token_pair(
    state: &AppState,
    account: Account,
    refresh_token: String,
) -> Result<HttpResponse, ApiError> {
    let access_token = state.jwt.issue(
        account.user_id,
        &account.username,
        account.schema.as_deref(),
        account.db_role.as_deref(),
        &account.role,
    )?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": account.user_id,
        "username": account.username,
        "schema": account.schema,
        "access_token": access_token,
        "refresh_token": refresh_token,
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_SECONDS,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

/// Consume a refresh token: only an unused, unrevoked, unexpired one, and
/// only once (the row lock makes two racing refreshes of one token queue;
/// the second finds it used).
const CONSUME: &str = "\
UPDATE tenantry.refresh_tokens SET used_at = now()
WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()
RETURNING family_id, user_id";

/// A used token presented again (a replay, RFC 9700 §4.14.2): the whole
/// family is revoked, the holder's current token included.
const REVOKE_REPLAYED_FAMILY: &str = "\
UPDATE tenantry.refresh_tokens SET revoked_at = now()
WHERE revoked_at IS NULL
  AND family_id = (SELECT family_id FROM tenantry.refresh_tokens
                   WHERE token_hash = $1 AND used_at IS NOT NULL)";

/// `POST /api/auth/refresh` `{refresh_token}`: a new pair, the old refresh
/// token used up (rotation). Unknown, expired, revoked or used → 401; a used
/// one also revokes its family.
#[tracing::instrument(skip_all)]
pub async fn refresh(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if body.refresh_token.len() > 256 {
        return Err(ApiError::Unauthorized);
    }
    let hash = auth::refresh_token_hash(&body.refresh_token);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let Some(consumed) = tx.query_opt(CONSUME, &[&hash]).await? else {
        let revoked = tx.execute(REVOKE_REPLAYED_FAMILY, &[&hash]).await?;
        tx.commit().await?;
        if revoked > 0 {
            tracing::warn!(
                security_event = "refresh_token_reuse",
                revoked,
                "a used refresh token was presented again; its family is revoked"
            );
        }
        return Err(ApiError::Unauthorized);
    };
    let family: Uuid = consumed.get("family_id");
    let user_id: Uuid = consumed.get("user_id");
    // The account as it is now; a tenant that is not active gets no tokens.
    let account = tx
        .query_opt(
            "SELECT u.username, u.role, t.schema_name, t.role_name
             FROM tenantry.users u LEFT JOIN tenantry.tenants t ON t.user_id = u.id
             WHERE u.id = $1 AND (t.status IS NULL OR t.status = 'active')",
            &[&user_id],
        )
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let (refresh_token, refresh_hash) = auth::new_refresh_token();
    tx.execute(
        auth::INSERT_REFRESH_TOKEN,
        &[&family, &user_id, &refresh_hash, &agent_of(&request)],
    )
    .await?;
    tx.commit().await?;
    token_pair(
        &state,
        Account {
            user_id,
            username: account.get("username"),
            role: account.get("role"),
            schema: account.get("schema_name"),
            db_role: account.get("role_name"),
        },
        refresh_token,
    )
}

/// `POST /api/auth/logout` `{refresh_token}` → 204: the token's whole family
/// is revoked. Answered the same for any token (RFC 7009 §2.2), so it tells
/// nobody which tokens exist.
#[tracing::instrument(skip_all)]
pub async fn logout(
    state: web::Data<AppState>,
    body: web::Json<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if body.refresh_token.len() <= 256 {
        let hash = auth::refresh_token_hash(&body.refresh_token);
        let client = state.pool.get().await?;
        client
            .execute(
                "UPDATE tenantry.refresh_tokens SET revoked_at = now()
                 WHERE revoked_at IS NULL
                   AND family_id = (SELECT family_id FROM tenantry.refresh_tokens WHERE token_hash = $1)",
                &[&hash],
            )
            .await?;
    }
    Ok(HttpResponse::NoContent().finish())
}
