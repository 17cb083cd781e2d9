//! The account's address and its recovery: email verification, password
//! reset, email change. Each token is random, mailed in a link, stored only
//! as a SHA-256 hash in `tenantry.account_tokens`, single use and short
//! lived; each change writes its mail into the outbox in its own
//! transaction (`crate::mail`).

use actix_web::{post, web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::api::auth::{client_of, reauthenticate};
use crate::api::extract::{CurrentUser, JsonBody};
use crate::api::ApiError;
use crate::api::AppState;
use crate::audit::{self, Action, Entry};
use crate::auth;
use crate::domain::{Email, Password};
use crate::mail::{self, Letters};

/// End the user `$1`'s outstanding reset tokens and the verification tokens
/// of an address other than the account's (a pending email change): a
/// password reset, a password change and signing out everywhere take back
/// whatever someone holding the old password may have started.
pub(crate) const END_PENDING_TOKENS: &str = "\
UPDATE tenantry.account_tokens a SET used_at = now()
  FROM tenantry.users u
 WHERE a.user_id = $1 AND u.id = $1 AND a.used_at IS NULL
   AND (a.purpose = 'reset_password' OR a.email IS DISTINCT FROM u.email)";

/// The longest token accepted (ours are 43 characters).
const MAX_TOKEN_LEN: usize = 256;

fn token_hash(token: &str) -> Result<Vec<u8>, ApiError> {
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(ApiError::InvalidToken);
    }
    Ok(auth::refresh_token_hash(token))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The `token=` of the link in the mail.
    #[schema(max_length = 256)]
    token: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EmailVerified {
    pub email_verified: bool,
    /// The account's address now (the new one after an email change).
    pub email: String,
}

/// Use a verification token: `$1` its hash. Every other verification
/// token of the user ends with it.
const USE_VERIFICATION: &str = "\
WITH used AS (
    UPDATE tenantry.account_tokens SET used_at = now()
     WHERE token_hash = $1 AND purpose = 'verify_email' AND used_at IS NULL AND expires_at > now()
    RETURNING user_id, email
), others AS (
    UPDATE tenantry.account_tokens a SET used_at = now()
      FROM used
     WHERE a.user_id = used.user_id AND a.purpose = 'verify_email' AND a.used_at IS NULL
       AND a.token_hash <> $1
)
SELECT used.user_id, used.email, u.email AS old_email
  FROM used JOIN tenantry.users u ON u.id = used.user_id";

/// `POST /api/auth/verify-email` `{token}`: the address the token was
/// mailed to becomes the account's, verified (at signup it already is the
/// account's; after an email change it replaces the old one).
#[utoipa::path(
    tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "The address is verified", body = EmailVerified),
        (status = 400, description = "`invalid_token`: unknown, already used or expired", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "`email_taken`: the new address was registered by someone else meanwhile", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "`account_suspended`", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/auth/verify-email")]
#[tracing::instrument(skip_all)]
pub async fn verify_email(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<TokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let hash = token_hash(&body.token)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // The account first: two of its tokens used at once queue here instead
    // of locking each other's token rows in opposite orders.
    let account = tx
        .query_opt(
            "SELECT u.suspended_at IS NOT NULL FROM tenantry.users u
               JOIN tenantry.account_tokens a ON a.user_id = u.id
              WHERE a.token_hash = $1 AND a.purpose = 'verify_email'
              FOR UPDATE OF u",
            &[&hash],
        )
        .await?
        .ok_or(ApiError::InvalidToken)?;
    if account.get::<_, bool>(0) {
        return Err(ApiError::AccountSuspended);
    }
    let used = tx
        .query_opt(USE_VERIFICATION, &[&hash])
        .await?
        .ok_or(ApiError::InvalidToken)?;
    let user_id: Uuid = used.get(0);
    let email: String = used.get(1);
    let old_email: String = used.get(2);
    let changed = email != old_email;
    let updated = tx
        .execute(
            "UPDATE tenantry.users
                SET email = $2, email_verified_at = now(), updated_at = now()
              WHERE id = $1",
            &[&user_id, &email],
        )
        .await;
    if let Err(e) = updated {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
            return Err(ApiError::Conflict {
                code: "email_taken",
                message: "that email address was registered by another account meanwhile".into(),
            });
        }
        return Err(e.into());
    }
    if changed {
        // A reset link mailed to the old address no longer opens the account.
        tx.execute(
            "UPDATE tenantry.account_tokens SET used_at = now()
              WHERE user_id = $1 AND purpose = 'reset_password' AND used_at IS NULL",
            &[&user_id],
        )
        .await?;
    }
    let username: Option<String> = tx
        .query_opt(
            "SELECT username FROM tenantry.tenants WHERE user_id = $1",
            &[&user_id],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(username) = username {
        crate::webhooks::record(
            &*tx,
            &crate::webhooks::Event::tenant(
                crate::webhooks::EventType::TenantEmailVerified,
                user_id,
                &username,
                serde_json::json!({ "email": email, "email_changed": changed }),
            ),
        )
        .await?;
    }
    audit::append(
        &*tx,
        &Entry::new(if changed {
            Action::EmailChanged
        } else {
            Action::EmailVerified
        })
        .actor(state.pseudonyms.user(user_id))
        .client(client_of(&state, &request)),
    )
    .await?;
    tx.commit().await?;
    Ok(HttpResponse::Ok().json(EmailVerified {
        email_verified: true,
        email,
    }))
}

/// What resend-verification and the email change answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MailQueued {
    #[schema(example = "queued")]
    pub status: &'static str,
    /// Where the verification link goes.
    pub email: String,
}

/// `POST /api/auth/resend-verification` (signed in): a new verification
/// link to the account's address. Once a minute and five times an hour.
#[utoipa::path(
    tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A new link is on its way", body = MailQueued),
        (status = 409, description = "`email_already_verified`", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "`too_many_mails`: asked too often", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds until another may be asked for"))),
    )
)]
#[post("/api/auth/resend-verification")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn resend_verification(
    state: web::Data<AppState>,
    user: CurrentUser,
) -> Result<HttpResponse, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT username, email, email_verified_at IS NOT NULL
               FROM tenantry.users WHERE id = $1 FOR UPDATE",
            &[&user.id()],
        )
        .await?;
    let (username, email): (String, String) = (row.get(0), row.get(1));
    if row.get::<_, bool>(2) {
        return Err(ApiError::Conflict {
            code: "email_already_verified",
            message: "this account's address is verified already".into(),
        });
    }
    mail_allowance(&tx, user.id()).await?;
    let (token, hash) = auth::new_refresh_token();
    tx.execute(
        crate::provisioning::INSERT_VERIFICATION_TOKEN,
        &[&hash, &user.id(), &email],
    )
    .await?;
    mail::enqueue(
        &*tx,
        &state
            .letters
            .verify_email(user.id(), &username, &email, &token),
    )
    .await?;
    tx.commit().await?;
    state.letters.wake();
    Ok(HttpResponse::Accepted().json(MailQueued {
        status: "queued",
        email,
    }))
}

/// Verification mails (signup, resend, email change) a user may cause: one a
/// minute, five an hour; else 429 with the wait. Call it holding the user's
/// row lock (`FOR UPDATE`), in a statement after the one that took it, so
/// that racing requests queue and each counts what the others wrote.
async fn mail_allowance(
    tx: &deadpool_postgres::Transaction<'_>,
    user_id: Uuid,
) -> Result<(), ApiError> {
    let wait: Option<i64> = tx
        .query_one(
            "SELECT ceil(extract(epoch FROM CASE
                      WHEN max(created_at) > now() - interval '1 minute'
                      THEN max(created_at) + interval '1 minute' - now()
                      WHEN count(*) >= 5
                      THEN min(created_at) + interval '1 hour' - now() END))::int8
               FROM tenantry.account_tokens
              WHERE user_id = $1 AND purpose = 'verify_email'
                AND created_at > now() - interval '1 hour'",
            &[&user_id],
        )
        .await?
        .get(0);
    match wait {
        Some(wait) => Err(ApiError::TooManyRequests {
            code: "too_many_mails",
            message: "a verification mail was sent recently; check your inbox or try later".into(),
            retry_after: wait.max(1) as u64,
        }),
        None => Ok(()),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgotPasswordRequest {
    #[schema(example = "alice@example.com", max_length = 254)]
    email: String,
}

/// The one answer of forgot-password.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ForgotPasswordAccepted {
    #[schema(example = "accepted")]
    pub status: &'static str,
    pub message: &'static str,
}

/// Forgot-password requests, handled after the answer (see
/// [`forgot_password`]) by one worker, in order.
#[derive(Clone)]
pub struct ResetRequests(mpsc::Sender<Email>);

/// Requests waiting at most; beyond, 503 (the same for every address).
const RESET_QUEUE: usize = 1024;

impl ResetRequests {
    /// The queue and its worker (on the current runtime).
    pub fn start(pool: crate::db::RequestPool, letters: Letters) -> ResetRequests {
        let (sender, mut receiver) = mpsc::channel::<Email>(RESET_QUEUE);
        tokio::spawn(async move {
            while let Some(email) = receiver.recv().await {
                if let Err(e) = issue_reset(&pool, &letters, &email).await {
                    tracing::warn!(error = %e, "a password reset mail could not be written");
                }
            }
        });
        ResetRequests(sender)
    }
}

/// For the account with address `$1` (if any, and not reset in the last
/// minute): the reset token `$2` and its mail (`$3` subject, `$4` body
/// with `{username}` for the name), in one statement.
const ISSUE_RESET: &str = "\
WITH u AS (
    SELECT u.id, u.username, u.email FROM tenantry.users u
     WHERE u.email = $1 AND u.disabled_at IS NULL AND u.suspended_at IS NULL
       AND NOT EXISTS (SELECT FROM tenantry.account_tokens a
                        WHERE a.user_id = u.id AND a.purpose = 'reset_password'
                          AND a.created_at > now() - interval '1 minute')
), token AS (
    INSERT INTO tenantry.account_tokens (token_hash, user_id, purpose, expires_at)
    SELECT $2, id, 'reset_password', now() + interval '30 minutes' FROM u
)
INSERT INTO tenantry.outbox (kind, user_id, recipient, subject, body)
SELECT 'password_reset', id, email, $3, replace($4, '{username}', username) FROM u";

async fn issue_reset(
    pool: &crate::db::RequestPool,
    letters: &Letters,
    email: &Email,
) -> Result<(), String> {
    let (token, hash) = auth::new_refresh_token();
    let template = letters.password_reset(Uuid::nil(), "{username}", "", &token);
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let written = client
        .execute(
            ISSUE_RESET,
            &[&email.as_str(), &hash, &template.subject, &template.body],
        )
        .await
        .map_err(|e| e.to_string())?;
    if written > 0 {
        letters.wake();
    }
    Ok(())
}

/// `POST /api/auth/forgot-password` `{email}` → 202, the same body whether
/// or not an account uses the address, and in the same time: the answer
/// is given before anything is looked up (the lookup, the token and the
/// mail are written afterwards, in one statement, by a worker). One mail
/// a minute per account at most.
#[utoipa::path(
    tag = "auth",
    request_body = ForgotPasswordRequest,
    responses(
        (status = 202, description = "If an account uses the address, a reset link is on its way (the same answer either way)", body = ForgotPasswordAccepted),
        (status = 400, description = "Not an email address", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "Rate limited", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/auth/forgot-password")]
#[tracing::instrument(skip_all)]
pub async fn forgot_password(
    state: web::Data<AppState>,
    body: JsonBody<ForgotPasswordRequest>,
) -> Result<HttpResponse, ApiError> {
    let email = Email::parse(&body.email)?;
    state
        .password_resets
        .0
        .try_send(email)
        .map_err(|_| ApiError::Busy {
            code: "busy",
            message: "too many password resets are waiting; try again shortly".into(),
        })?;
    Ok(HttpResponse::Accepted().json(ForgotPasswordAccepted {
        status: "accepted",
        message: "If an account uses this address, a link to reset its password is on its way.",
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    #[schema(max_length = 256)]
    token: String,
    /// The password rules of signup.
    #[schema(min_length = 12, max_length = 72, pattern = "^[^\\u0000]*$")]
    new_password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PasswordReset {
    pub password_reset: bool,
    /// Sessions ended (every one the account had).
    pub sessions_revoked: u64,
}

/// `POST /api/auth/reset-password` `{token, new_password}`: the password
/// is set, every session and access token of the account ends at once
/// (the token generation moves on), the name's failed-login lock is
/// lifted, a notice is mailed and the reset audited.
#[utoipa::path(
    tag = "auth",
    request_body = ResetPasswordRequest,
    responses(
        (status = 200, description = "The password is set; every session ended", body = PasswordReset),
        (status = 400, description = "`invalid_token` (unknown, used or expired), or the new password breaks the rules", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "`account_suspended` (the token stays unused)", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/auth/reset-password")]
#[tracing::instrument(skip_all)]
pub async fn reset_password(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<ResetPasswordRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let hash = token_hash(&body.token)?;
    let password = Password::parse(&body.new_password).map_err(|mut e| {
        e.field = "new_password";
        e
    })?;
    // Refuse a token that cannot work before spending bcrypt on it (it is
    // consumed below, under its row lock).
    {
        let client = state.pool.get().await?;
        client
            .query_opt(
                "SELECT FROM tenantry.account_tokens
                  WHERE token_hash = $1 AND purpose = 'reset_password'
                    AND used_at IS NULL AND expires_at > now()",
                &[&hash],
            )
            .await?
            .ok_or(ApiError::InvalidToken)?;
    }
    let new_hash = state.hasher.hash(&password).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let used = tx
        .query_opt(
            "WITH used AS (
                UPDATE tenantry.account_tokens SET used_at = now()
                 WHERE token_hash = $1 AND purpose = 'reset_password'
                   AND used_at IS NULL AND expires_at > now()
                RETURNING user_id)
             SELECT used.user_id, u.suspended_at IS NOT NULL
               FROM used JOIN tenantry.users u ON u.id = used.user_id",
            &[&hash],
        )
        .await?
        .ok_or(ApiError::InvalidToken)?;
    // A suspended account keeps its sessions and password until resumed.
    if used.get::<_, bool>(1) {
        return Err(ApiError::AccountSuspended);
    }
    let user_id: Uuid = used.get(0);
    let account = tx
        .query_one(
            "UPDATE tenantry.users
                SET password_hash = $2, password_changed_at = now(), updated_at = now(),
                    token_generation = token_generation + 1
              WHERE id = $1
             RETURNING username, email",
            &[&user_id, &new_hash],
        )
        .await?;
    let (username, email): (String, String) = (account.get(0), account.get(1));
    tx.execute(END_PENDING_TOKENS, &[&user_id]).await?;
    let revoked = tx
        .execute(crate::auth::REVOKE_ALL_SESSIONS, &[&user_id])
        .await?;
    // Whoever locked the name with wrong guesses: its owner is back.
    tx.execute(
        "DELETE FROM tenantry.login_throttle WHERE username = $1",
        &[&auth::throttle_key(&state.pseudonyms, &username)],
    )
    .await?;
    mail::enqueue(
        &*tx,
        &state
            .letters
            .password_reset_done(user_id, &username, &email),
    )
    .await?;
    audit::append(
        &*tx,
        &Entry::new(Action::PasswordReset)
            .actor(state.pseudonyms.user(user_id))
            .client(client_of(&state, &request))
            .detail("sessions_revoked", revoked),
    )
    .await?;
    tx.commit().await?;
    state.letters.wake();
    Ok(HttpResponse::Ok().json(PasswordReset {
        password_reset: true,
        sessions_revoked: revoked,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeEmailRequest {
    /// The new address.
    #[schema(example = "alice@example.org", max_length = 254)]
    email: String,
    /// The account's current password.
    password: String,
}

/// `POST /api/me/email` `{email, password}` → 202: a verification link goes
/// to the new address and a notice to the old one; the address changes
/// when the link is used (`POST /api/auth/verify-email`).
#[utoipa::path(
    tag = "me",
    request_body = ChangeEmailRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A verification link is on its way to the new address", body = MailQueued),
        (status = 400, description = "Not an email address, or the account's own", body = crate::api::openapi::ErrorBody),
        (status = 401, description = "Wrong password, or no valid token", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "`email_taken`", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "`too_many_mails`: verification mails are limited to one a minute, five an hour", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds until another may be asked for"))),
    )
)]
#[post("/api/me/email")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn change_email(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: CurrentUser,
    body: JsonBody<ChangeEmailRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let new = Email::parse(&body.email)?;
    reauthenticate(&state, user.id(), body.password).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT u.username, u.email,
                    EXISTS (SELECT FROM tenantry.users o WHERE o.email = $2 AND o.id <> u.id)
               FROM tenantry.users u WHERE u.id = $1 FOR UPDATE",
            &[&user.id(), &new.as_str()],
        )
        .await?;
    let (username, old): (String, String) = (row.get(0), row.get(1));
    if old == new.as_str() {
        return Err(ApiError::BadRequest {
            code: "same_email",
            message: "that is the account's address already".into(),
        });
    }
    if row.get::<_, bool>(2) {
        return Err(ApiError::Conflict {
            code: "email_taken",
            message: "that email address is registered already".into(),
        });
    }
    mail_allowance(&tx, user.id()).await?;
    let (token, hash) = auth::new_refresh_token();
    tx.execute(
        crate::provisioning::INSERT_VERIFICATION_TOKEN,
        &[&hash, &user.id(), &new.as_str()],
    )
    .await?;
    let letters = &state.letters;
    mail::enqueue(
        &*tx,
        &letters.verify_new_email(user.id(), &username, new.as_str(), &token),
    )
    .await?;
    mail::enqueue(
        &*tx,
        &letters.email_change_requested(user.id(), &username, &old, new.as_str()),
    )
    .await?;
    audit::append(
        &*tx,
        &Entry::new(Action::EmailChangeRequested)
            .actor(state.pseudonyms.user(user.id()))
            .client(client_of(&state, &request)),
    )
    .await?;
    tx.commit().await?;
    letters.wake();
    Ok(HttpResponse::Accepted().json(MailQueued {
        status: "queued",
        email: new.as_str().to_owned(),
    }))
}
