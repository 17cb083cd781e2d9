//! Signup and login.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::api::ApiError;
use crate::auth::{self, ACCESS_TOKEN_SECONDS};
use crate::domain::{Email, Password, Username};
use crate::provisioning::{self, NewAccount, RefreshTokenRow};
use crate::startup::AppState;

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

/// `POST /api/auth/login`. An unknown user and a wrong password get the same
/// 401, in body and in time: unknown users are verified against a dummy hash.
#[tracing::instrument(skip_all)]
pub async fn login(
    state: web::Data<AppState>,
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
    let stmt = client
        .prepare_cached(
            "WITH t AS (
                 INSERT INTO tenantry.refresh_tokens (family_id, user_id, token_hash, expires_at)
                 VALUES ($1, $2, $3, now() + interval '7 days')
             )
             UPDATE tenantry.users SET last_login_at = now() WHERE id = $2",
        )
        .await?;
    client
        .execute(&stmt, &[&Uuid::new_v4(), &user_id, &refresh_hash])
        .await?;
    let access_token = state.jwt.issue(
        user_id,
        &username,
        schema.as_deref(),
        db_role.as_deref(),
        &role,
    )?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user_id,
        "username": username,
        "schema": schema,
        "access_token": access_token,
        "refresh_token": refresh_token,
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_SECONDS,
    })))
}
