//! Signup (idempotent), login (throttled), refresh-token rotation,
//! logout and password change. Every security-relevant outcome is appended
//! to the audit log in the transaction that makes it.

use actix_web::{post, web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::extract::CurrentUser;
use crate::api::extract::JsonBody;
use crate::api::middleware::RateLimits;
use crate::api::ApiError;
use crate::api::AppState;
use crate::audit::{self, Action, Entry};
use crate::auth::{self, Role, Subject, ACCESS_TOKEN_SECONDS};
use crate::domain::{Email, Password, Username};
use crate::provisioning::{self, AuditContext, NewAccount, RefreshTokenRow};

fn agent_of(request: &HttpRequest) -> Option<String> {
    auth::user_agent(
        request
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    )
}

/// The client's address, pseudonymised for the audit log.
pub(crate) fn client_of(state: &AppState, request: &HttpRequest) -> Option<String> {
    let ip = match request.app_data::<web::Data<RateLimits>>() {
        Some(limits) => limits.client_ip(request),
        None => request.peer_addr().map(|a| a.ip()),
    }?;
    Some(state.pseudonyms.client(ip))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// 3 to 32 of a-z, 0-9 and `_` (case-insensitive, stored lower-case),
    /// starting with a letter, no `__`, not ending in `_`; some names are
    /// reserved. Surrounding spaces are trimmed.
    #[schema(
        example = "alice",
        max_length = 256,
        pattern = r"^\s*[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*\s*$"
    )]
    username: String,
    /// Stored lower-case; surrounding spaces are trimmed.
    #[schema(
        example = "alice@example.com",
        max_length = 254,
        pattern = r"^\s*[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+\s*$"
    )]
    email: String,
    /// 12 characters to 72 bytes, used exactly as sent (never trimmed), not
    /// a commonly used password.
    #[schema(
        example = "correct horse battery",
        min_length = 12,
        max_length = 72,
        pattern = "^[^\\u0000]*$"
    )]
    password: String,
}

/// A new account and its first session.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Registered {
    pub user_id: Uuid,
    pub username: String,
    /// The tenant's schema.
    pub schema: String,
    pub template_version: i32,
    pub access_token: String,
    pub refresh_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: i64,
}

/// A session's tokens (login, refresh).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub user_id: Uuid,
    pub username: String,
    /// The tenant's schema (none for staff accounts).
    pub schema: Option<String>,
    pub role: Role,
    pub access_token: String,
    pub refresh_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: i64,
}

/// After a password change: a new access token for this session.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PasswordChanged {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    pub expires_in: i64,
    /// The caller's other sessions, now ended.
    pub sessions_revoked: u64,
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(request: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or(ApiError::BadRequest {
            code: "invalid_idempotency_key",
            message: "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        })?;
    Ok(Some(key.to_owned()))
}

/// `POST /api/auth/register`: a user and their complete tenant, or nothing.
/// With an `Idempotency-Key`, a retry of the same request within 24 hours
/// gets the original account's 201 (with fresh tokens) instead of a 409;
/// the same key with another body is a 422. A retry checks the password,
/// so it is throttled, locked out (429) and audited like a login.
#[utoipa::path(
    tag = "auth",
    request_body = RegisterRequest,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]{1,255}$",
            description = "1 to 255 visible ASCII characters; a retry with the same key and body gets the same account")),
    responses(
        (status = 201, description = "The account and its tenant exist", body = Registered,
         headers(("Idempotent-Replayed" = String, description = "`true` when this answers a retry"))),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "A retry with the Idempotency-Key of an account suspended since (`account_suspended`)", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "The username or email is taken", body = crate::api::openapi::ErrorBody),
        (status = 422, description = "The Idempotency-Key was used for another signup", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "A retry whose name is locked after failed sign-ins (as for login), or rate limited", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds until the name may try again"))),
    )
)]
#[post("/api/auth/register")]
#[tracing::instrument(skip_all, fields(user = tracing::field::Empty))]
pub async fn register(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&request)?;
    let username = Username::parse(&body.username)?;
    let email = Email::parse(&body.email)?;
    let password = Password::parse(&body.password)?;

    if let Some(key) = &key {
        if let Some(replayed) = replay(&state, &request, key, &username, &email, &body).await? {
            return Ok(replayed);
        }
    }

    // Spare the bcrypt work and the DDL for a name or email that is
    // plainly taken.
    provisioning::check_available(&state.pool.get().await?, &username, &email).await?;

    let password_hash = state.hasher.hash(&password).await?;
    let (refresh_token, refresh_hash) = auth::new_refresh_token();
    let family_id = Uuid::new_v4();
    let account = NewAccount {
        username,
        email: email.clone(),
        password_hash,
        role: Role::User,
        refresh_token: Some(RefreshTokenRow {
            family_id,
            hash: refresh_hash,
            user_agent: agent_of(&request),
        }),
        idempotency_key: key.clone(),
        verification: Some(provisioning::Verification::new(&state.letters)),
        audit: Some(AuditContext {
            pseudonyms: state.pseudonyms.clone(),
            actor: None,
            client: client_of(&state, &request),
        }),
    };
    let mut client = state.pool.get().await?;
    let provisioned =
        provisioning::provision(&mut client, &state.installation, &state.templates, &account).await;
    drop(client);
    let tenant = match provisioned {
        Ok(t) => t,
        Err(e) => {
            // A concurrent request with the same key may have won the race.
            if let Some(key) = &key {
                if let Some(replayed) =
                    replay(&state, &request, key, &account.username, &email, &body).await?
                {
                    return Ok(replayed);
                }
            }
            return Err(e.into());
        }
    };
    state
        .spares
        .claimed(tenant.spares_left, tenant.built_schema);
    tracing::Span::current().record("user", tracing::field::display(tenant.user_id));
    let access_token = state.jwt.issue(&Subject {
        user_id: tenant.user_id,
        username: tenant.username.as_str(),
        schema: Some(tenant.schema.as_str()),
        db_role: Some(tenant.role.as_str()),
        role: Role::User,
        generation: 0,
        session: Some(family_id),
    })?;
    Ok(HttpResponse::Created().json(Registered {
        user_id: tenant.user_id,
        username: tenant.username.as_str().to_owned(),
        schema: tenant.schema.as_str().to_owned(),
        template_version: tenant.template_version.get(),
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_SECONDS,
    }))
}

/// The account behind a signup's `Idempotency-Key` (within 24 hours), and
/// how long the presented name is locked (`$2`: its throttle key).
const REPLAY_LOOKUP: &str = "\
SELECT u.id, u.username, u.email, u.password_hash, u.token_generation,
       u.disabled_at IS NOT NULL AS disabled, u.suspended_at IS NOT NULL AS suspended,
       t.schema_name, t.role_name, t.template_version,
       (SELECT ceil(extract(epoch FROM l.locked_until - now()))::int8
        FROM tenantry.login_throttle l
        WHERE l.username = $2 AND l.locked_until > now()) AS locked_for
FROM tenantry.idempotency_keys k
JOIN tenantry.users u ON u.id = k.user_id
JOIN tenantry.tenants t ON t.user_id = u.id
WHERE k.key = $1 AND k.created_at > now() - interval '24 hours'";

/// The 201 again for a signup retried with its `Idempotency-Key`: the same
/// account (if the body is the same: name, email, and a password that
/// verifies against the stored hash) with a new session. `None` when the
/// key is unknown or expired. A replay checks a password, so it is a login
/// in all but name: it is refused while the name is locked, counts its
/// failures against the name like a login, and is audited as one.
async fn replay(
    state: &AppState,
    request: &HttpRequest,
    key: &str,
    username: &Username,
    email: &Email,
    body: &RegisterRequest,
) -> Result<Option<HttpResponse>, ApiError> {
    let name_key = auth::throttle_key(&state.pseudonyms, &body.username);
    let row = {
        let client = state.pool.get().await?;
        client.query_opt(REPLAY_LOOKUP, &[&key, &name_key]).await?
    };
    let Some(row) = row else {
        return Ok(None);
    };
    if state.login_max_failures > 0 {
        if let Some(seconds) = row.get::<_, Option<i64>>("locked_for") {
            return Err(ApiError::Throttled {
                retry_after: seconds.max(1) as u64,
            });
        }
    }
    let user_id: Uuid = row.get("id");
    let stored_hash: String = row.get("password_hash");
    let same_names = row.get::<_, String>("username") == username.as_str()
        && row.get::<_, String>("email") == email.as_str();
    let same_password = state
        .hasher
        .verify(body.password.clone(), Some(stored_hash.clone()))
        .await?;
    let client_pseudonym = client_of(state, request);
    if !(same_names && same_password) || row.get::<_, bool>("disabled") {
        let failure = FailedSignIn {
            name_key: &name_key,
            subject: state.pseudonyms.user(user_id),
            client: client_pseudonym,
            via: Some(VIA_SIGNUP_REPLAY),
        };
        return Err(match login_failed(state, failure).await? {
            ApiError::InvalidCredentials => ApiError::Unprocessable {
                code: "idempotency_key_reused",
                message: "this Idempotency-Key was used for a different signup".into(),
            },
            locked => locked,
        });
    }
    if row.get::<_, bool>("suspended") {
        return Err(
            refuse_suspended(state, user_id, client_pseudonym, Some(VIA_SIGNUP_REPLAY)).await?,
        );
    }
    let (family, refresh_token) = open_session(
        state,
        request,
        SignIn {
            user_id,
            stored_hash: &stored_hash,
            rehash: None,
            name_key: &name_key,
            client: client_pseudonym,
            via: Some(VIA_SIGNUP_REPLAY),
        },
    )
    .await?;
    let schema: String = row.get("schema_name");
    let db_role: String = row.get("role_name");
    let access_token = state.jwt.issue(&Subject {
        user_id,
        username: username.as_str(),
        schema: Some(&schema),
        db_role: Some(&db_role),
        role: Role::User,
        generation: row.get("token_generation"),
        session: Some(family),
    })?;
    Ok(Some(
        HttpResponse::Created()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(Registered {
                user_id,
                username: username.as_str().to_owned(),
                schema,
                template_version: row.get("template_version"),
                access_token,
                refresh_token,
                token_type: "Bearer",
                expires_in: ACCESS_TOKEN_SECONDS,
            }),
    ))
}

/// The `via` detail of the audit entries of a replayed signup.
const VIA_SIGNUP_REPLAY: &str = "signup_replay";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
}

/// The account (if any) behind a login, and how long its name is locked.
const LOGIN_LOOKUP: &str = "\
SELECT u.id, u.username, u.password_hash, u.role, u.token_generation,
       u.disabled_at IS NOT NULL AS disabled, u.suspended_at IS NOT NULL AS suspended,
       t.schema_name, t.role_name,
       (SELECT ceil(extract(epoch FROM l.locked_until - now()))::int8
        FROM tenantry.login_throttle l
        WHERE l.username = $2 AND l.locked_until > now()) AS locked_for
FROM (SELECT 1) AS one
LEFT JOIN tenantry.users u ON u.username = $1
LEFT JOIN tenantry.tenants t ON t.user_id = u.id";

/// Count a failed login against a name (in a 15-minute window).
const COUNT_FAILURE: &str = "\
INSERT INTO tenantry.login_throttle AS l (username, failures, window_start)
VALUES ($1, 1, now())
ON CONFLICT (username) DO UPDATE SET
    failures = CASE WHEN l.window_start < now() - interval '15 minutes' THEN 1 ELSE l.failures + 1 END,
    window_start = CASE WHEN l.window_start < now() - interval '15 minutes' THEN now() ELSE l.window_start END
RETURNING failures";

/// Lock a name: 1 minute, doubling with each lockout, at most 15 minutes;
/// the count starts again.
const LOCK_NAME: &str = "\
UPDATE tenantry.login_throttle
SET locked_until = now() + least(interval '15 minutes', interval '1 minute' * power(2, least(lockouts, 10))),
    lockouts = lockouts + 1, failures = 0, window_start = now()
WHERE username = $1
RETURNING ceil(extract(epoch FROM locked_until - now()))::int8";

/// A successful sign-in starts the name's count again.
const CLEAR_FAILURES: &str = "DELETE FROM tenantry.login_throttle WHERE username = $1";

/// `POST /api/auth/login`. An unknown user and a wrong password get the same
/// 401, in body and in time (unknown users are verified against a dummy
/// hash, and count against the throttle the same way). After
/// `TENANTRY_LOGIN_MAX_FAILURES` failures in 15 minutes the name gets 429
/// with `Retry-After`, without a password check, for a back-off that
/// expires. A suspended account gets 403 `account_suspended`, but only
/// with its right password (a wrong one is the same 401 as ever).
#[utoipa::path(
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "A new session", body = TokenPair),
        (status = 401, description = "Unknown user or wrong password (the same answer)", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "The right password, but the account is suspended (`account_suspended`)", body = crate::api::openapi::ErrorBody),
        (status = 429, description = "Too many failed logins for this name, or rate limited", body = crate::api::openapi::ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds until the name may try again"))),
    )
)]
#[post("/api/auth/login")]
#[tracing::instrument(skip_all)]
pub async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let name_key = auth::throttle_key(&state.pseudonyms, &body.username);
    let username = Username::parse(&body.username).ok();
    let row = {
        let client = state.pool.get().await?;
        let stmt = client.prepare_cached(LOGIN_LOOKUP).await?;
        client
            .query_one(&stmt, &[&username.as_ref().map(|u| u.as_str()), &name_key])
            .await?
    };
    if state.login_max_failures > 0 {
        if let Some(seconds) = row.get::<_, Option<i64>>("locked_for") {
            return Err(ApiError::Throttled {
                retry_after: seconds.max(1) as u64,
            });
        }
    }
    let user_id: Option<Uuid> = row.get("id");
    let stored_hash: Option<String> = row.get("password_hash");
    // bcrypt only reads 72 bytes; a longer password was never accepted at
    // signup, so it can never be right (but costs the same to refuse).
    let too_long = body.password.len() > 72;
    let verified = state
        .hasher
        .verify(body.password.clone(), stored_hash.clone())
        .await?;
    let disabled: Option<bool> = row.get("disabled");
    let client_pseudonym = client_of(&state, &request);

    let (Some(user_id), Some(stored_hash), true, false, Some(false)) =
        (user_id, stored_hash, verified, too_long, disabled)
    else {
        let failure = FailedSignIn {
            name_key: &name_key,
            // An unknown name's throttle key is its pseudonym.
            subject: user_id.map_or_else(|| name_key.clone(), |id| state.pseudonyms.user(id)),
            client: client_pseudonym,
            via: None,
        };
        return Err(login_failed(&state, failure).await?);
    };
    if row.get::<_, Option<bool>>("suspended") == Some(true) {
        return Err(refuse_suspended(&state, user_id, client_pseudonym, None).await?);
    }

    let role = Role::parse(&row.get::<_, String>("role")).ok_or(ApiError::InvalidCredentials)?;
    // Made at another cost (BCRYPT_COST changed): rehash now that we have
    // the password.
    let rehash = match Password::parse(&body.password) {
        Ok(p) if state.hasher.needs_rehash(&stored_hash) => Some(state.hasher.hash(&p).await?),
        _ => None,
    };
    let (family, refresh_token) = open_session(
        &state,
        &request,
        SignIn {
            user_id,
            stored_hash: &stored_hash,
            rehash,
            name_key: &name_key,
            client: client_pseudonym,
            via: None,
        },
    )
    .await?;
    token_pair(
        &state,
        Account {
            user_id,
            username: row.get("username"),
            role,
            schema: row.get("schema_name"),
            db_role: row.get("role_name"),
            generation: row.get("token_generation"),
        },
        family,
        refresh_token,
    )
}

/// A sign-in whose password verified.
struct SignIn<'a> {
    user_id: Uuid,
    /// The hash the password verified against: the account is updated only
    /// if nothing changed it meanwhile.
    stored_hash: &'a str,
    /// A new hash at the configured cost, when the stored one has another.
    rehash: Option<String>,
    name_key: &'a str,
    client: Option<String>,
    /// Set when the sign-in was not a login (the audit entry says how).
    via: Option<&'static str>,
}

/// A new session for a sign-in: its refresh token, the account's last login
/// (and new hash), the name's failure count cleared, and the
/// `login_succeeded` entry, in one transaction. Returns the session (family)
/// id and its refresh token.
async fn open_session(
    state: &AppState,
    request: &HttpRequest,
    sign_in: SignIn<'_>,
) -> Result<(Uuid, String), ApiError> {
    let family = Uuid::new_v4();
    let (refresh_token, refresh_hash) = auth::new_refresh_token();
    let mut entry = Entry::new(Action::LoginSucceeded)
        .actor(state.pseudonyms.user(sign_in.user_id))
        .client(sign_in.client)
        .detail("session", family)
        .detail("rehashed", sign_in.rehash.is_some());
    if let Some(via) = sign_in.via {
        entry = entry.detail("via", via);
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        auth::INSERT_REFRESH_TOKEN,
        &[&family, &sign_in.user_id, &refresh_hash, &agent_of(request)],
    )
    .await?;
    tx.execute(
        "UPDATE tenantry.users
         SET last_login_at = now(), password_hash = coalesce($3, password_hash)
         WHERE id = $1 AND password_hash = $2",
        &[&sign_in.user_id, &sign_in.stored_hash, &sign_in.rehash],
    )
    .await?;
    tx.execute(CLEAR_FAILURES, &[&sign_in.name_key]).await?;
    audit::append(&*tx, &entry).await?;
    tx.commit().await?;
    Ok((family, refresh_token))
}

/// A sign-in whose password verified, of a suspended account: no session,
/// no failure counted against the name (the password was right), and a
/// `login_failed` entry that says why. Returns the 403 to answer.
async fn refuse_suspended(
    state: &AppState,
    user_id: Uuid,
    client: Option<String>,
    via: Option<&'static str>,
) -> Result<ApiError, ApiError> {
    let mut entry = Entry::new(Action::LoginFailed)
        .subject(state.pseudonyms.user(user_id))
        .client(client)
        .detail("reason", "account_suspended");
    if let Some(via) = via {
        entry = entry.detail("via", via);
    }
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    audit::append(&*tx, &entry).await?;
    tx.commit().await?;
    Ok(ApiError::AccountSuspended)
}

/// A sign-in whose password did not verify (or whose account may not sign in).
struct FailedSignIn<'a> {
    name_key: &'a str,
    /// The audit subject: the account's pseudonym, or the unknown name's.
    subject: String,
    client: Option<String>,
    /// Set when the sign-in was not a login (the audit entries say how).
    via: Option<&'static str>,
}

/// Record a failed sign-in (throttle count, audit entries) and return the
/// error to answer: 401, or 429 when this failure locked the name.
async fn login_failed(state: &AppState, failure: FailedSignIn<'_>) -> Result<ApiError, ApiError> {
    let FailedSignIn {
        name_key,
        subject,
        client,
        via,
    } = failure;
    let with_via = |entry: Entry| match via {
        Some(via) => entry.detail("via", via),
        None => entry,
    };
    let mut conn = state.pool.get().await?;
    let tx = conn.transaction().await?;
    let mut locked_for = None;
    if state.login_max_failures > 0 {
        let failures: i32 = tx.query_one(COUNT_FAILURE, &[&name_key]).await?.get(0);
        if failures as i64 >= i64::from(state.login_max_failures) {
            let seconds: i64 = tx.query_one(LOCK_NAME, &[&name_key]).await?.get(0);
            locked_for = Some(seconds.max(1) as u64);
        }
    }
    audit::append(
        &*tx,
        &with_via(
            Entry::new(Action::LoginFailed)
                .subject(subject.clone())
                .client(client.clone()),
        ),
    )
    .await?;
    if let Some(seconds) = locked_for {
        audit::append(
            &*tx,
            &with_via(
                Entry::new(Action::LoginThrottled)
                    .subject(subject)
                    .client(client)
                    .detail("locked_seconds", seconds),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(match locked_for {
        Some(retry_after) => ApiError::Throttled { retry_after },
        None => ApiError::InvalidCredentials,
    })
}

/// Whom a token pair is for.
struct Account {
    user_id: Uuid,
    username: String,
    role: Role,
    schema: Option<String>,
    db_role: Option<String>,
    generation: i32,
}

/// The 200 of login and refresh: a new access token with the given
/// refresh token.
fn token_pair(
    state: &AppState,
    account: Account,
    session: Uuid,
    refresh_token: String,
) -> Result<HttpResponse, ApiError> {
    let access_token = state.jwt.issue(&Subject {
        user_id: account.user_id,
        username: &account.username,
        schema: account.schema.as_deref(),
        db_role: account.db_role.as_deref(),
        role: account.role,
        generation: account.generation,
        session: Some(session),
    })?;
    Ok(HttpResponse::Ok().json(TokenPair {
        user_id: account.user_id,
        username: account.username,
        schema: account.schema,
        role: account.role,
        access_token,
        refresh_token,
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_SECONDS,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
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
                   WHERE token_hash = $1 AND used_at IS NOT NULL)
RETURNING user_id, family_id";

/// `POST /api/auth/refresh` `{refresh_token}`: a new pair, the old refresh
/// token used up (rotation). Unknown, expired, revoked or used → 401; a used
/// one also revokes its family and is audited as a security event. A
/// suspended account's token → 403 `account_suspended`, and stays unused:
/// it works again once the account is resumed.
#[utoipa::path(
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new token pair; the presented refresh token is used up", body = TokenPair),
        (status = 401, description = "Unknown, expired, revoked or already used", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "The account is suspended (`account_suspended`); the token is not used up", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/auth/refresh")]
#[tracing::instrument(skip_all)]
pub async fn refresh(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if body.refresh_token.len() > 256 {
        return Err(ApiError::InvalidRefreshToken);
    }
    let hash = auth::refresh_token_hash(&body.refresh_token);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let Some(consumed) = tx.query_opt(CONSUME, &[&hash]).await? else {
        let revoked = tx.query(REVOKE_REPLAYED_FAMILY, &[&hash]).await?;
        if let Some(first) = revoked.first() {
            let user: Uuid = first.get(0);
            let family: Uuid = first.get(1);
            tracing::warn!(
                security_event = "refresh_token_reuse",
                revoked = revoked.len(),
                "a used refresh token was presented again; its family is revoked"
            );
            audit::append(
                &*tx,
                &Entry::new(Action::RefreshTokenReuse)
                    .subject(state.pseudonyms.user(user))
                    .client(client_of(&state, &request))
                    .detail("session", family)
                    .detail("revoked_tokens", revoked.len()),
            )
            .await?;
        }
        tx.commit().await?;
        return Err(ApiError::InvalidRefreshToken);
    };
    let family: Uuid = consumed.get("family_id");
    let user_id: Uuid = consumed.get("user_id");
    // The account as it is now; a disabled account, or a tenant that is not
    // active, gets no tokens.
    let account = tx
        .query_opt(
            "SELECT u.username, u.role, u.token_generation, t.schema_name, t.role_name,
                    u.suspended_at IS NOT NULL AS suspended
             FROM tenantry.users u LEFT JOIN tenantry.tenants t ON t.user_id = u.id
             WHERE u.id = $1 AND u.disabled_at IS NULL
               AND (t.status IS NULL OR t.status = 'active')",
            &[&user_id],
        )
        .await?
        .ok_or(ApiError::InvalidRefreshToken)?;
    if account.get::<_, bool>("suspended") {
        // Rolled back: the token is not used up.
        tx.rollback().await?;
        return Err(ApiError::AccountSuspended);
    }
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
            role: Role::parse(&account.get::<_, String>("role")).ok_or(ApiError::Unauthorized)?,
            schema: account.get("schema_name"),
            db_role: account.get("role_name"),
            generation: account.get("token_generation"),
        },
        family,
        refresh_token,
    )
}

/// `POST /api/auth/logout` `{refresh_token}` → 204: the token's whole family
/// is revoked. Answered the same for any token (RFC 7009 §2.2), so it tells
/// nobody which tokens exist.
#[utoipa::path(
    tag = "auth",
    request_body = RefreshRequest,
    responses((status = 204, description = "The session is over (answered the same for any token)"))
)]
#[post("/api/auth/logout")]
#[tracing::instrument(skip_all)]
pub async fn logout(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody<RefreshRequest>,
) -> Result<HttpResponse, ApiError> {
    if body.refresh_token.len() <= 256 {
        let hash = auth::refresh_token_hash(&body.refresh_token);
        let mut client = state.pool.get().await?;
        let tx = client.transaction().await?;
        let revoked = tx
            .query(
                "UPDATE tenantry.refresh_tokens SET revoked_at = now()
                 WHERE revoked_at IS NULL
                   AND family_id = (SELECT family_id FROM tenantry.refresh_tokens WHERE token_hash = $1)
                 RETURNING user_id, family_id",
                &[&hash],
            )
            .await?;
        if let Some(first) = revoked.first() {
            audit::append(
                &*tx,
                &Entry::new(Action::Logout)
                    .actor(state.pseudonyms.user(first.get(0)))
                    .client(client_of(&state, &request))
                    .detail("session", first.get::<_, Uuid>(1)),
            )
            .await?;
        }
        tx.commit().await?;
    }
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    current_password: String,
    /// The password rules of signup.
    #[schema(min_length = 12, max_length = 72, pattern = "^[^\\u0000]*$")]
    new_password: String,
}

/// `POST /api/auth/change-password` `{current_password, new_password}` →
/// 200 with a new access token. Every other session ends, and every access
/// token issued before (this one's included) stops working at once: the
/// account's token generation moves on. The session the call came from
/// keeps its refresh token. A wrong current password is a 401.
#[utoipa::path(
    tag = "auth",
    request_body = ChangePasswordRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed; other sessions ended", body = PasswordChanged),
        (status = 400, description = "The new password breaks the rules", body = crate::api::openapi::ErrorBody),
        (status = 401, description = "Wrong current password, or no valid token", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/auth/change-password")]
#[tracing::instrument(skip_all, fields(user = %user.id()))]
pub async fn change_password(
    state: web::Data<AppState>,
    request: HttpRequest,
    user: CurrentUser,
    body: JsonBody<ChangePasswordRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let new_password = Password::parse(&body.new_password).map_err(|mut e| {
        e.field = "new_password";
        e
    })?;
    let stored = reauthenticate(&state, user.id(), body.current_password).await?;
    let new_hash = state.hasher.hash(&new_password).await?;
    let session = user.claims.sid;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Only if nothing changed it meanwhile (another change, a disable).
    let row = tx
        .query_opt(
            "UPDATE tenantry.users
             SET password_hash = $3, password_changed_at = now(), updated_at = now(),
                 token_generation = token_generation + 1
             WHERE id = $1 AND password_hash = $2 AND disabled_at IS NULL
             RETURNING token_generation, username, role",
            &[&user.id(), &stored, &new_hash],
        )
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let revoked = tx
        .execute(
            "UPDATE tenantry.refresh_tokens SET revoked_at = now()
             WHERE user_id = $1 AND revoked_at IS NULL AND family_id IS DISTINCT FROM $2",
            &[&user.id(), &session],
        )
        .await?;
    // A reset link asked for before, or an email change pending, no longer
    // takes effect.
    tx.execute(crate::api::account::END_PENDING_TOKENS, &[&user.id()])
        .await?;
    audit::append(
        &*tx,
        &Entry::new(Action::PasswordChanged)
            .actor(state.pseudonyms.user(user.id()))
            .client(client_of(&state, &request))
            .detail("sessions_revoked", revoked),
    )
    .await?;
    tx.commit().await?;
    let username: String = row.get("username");
    let access_token = state.jwt.issue(&Subject {
        user_id: user.id(),
        username: &username,
        schema: user.claims.schema.as_deref(),
        db_role: user.claims.db_role.as_deref(),
        role: user.role,
        generation: row.get("token_generation"),
        session,
    })?;
    Ok(HttpResponse::Ok().json(PasswordChanged {
        access_token,
        token_type: "Bearer",
        expires_in: ACCESS_TOKEN_SECONDS,
        sessions_revoked: revoked,
    }))
}

/// Re-authentication for a sensitive action: `password` must be the
/// account's current one (401 otherwise). Returns the stored hash, so the
/// action can make sure nothing changed it meanwhile.
pub(crate) async fn reauthenticate(
    state: &AppState,
    user_id: Uuid,
    password: String,
) -> Result<String, ApiError> {
    let stored: String = {
        let client = state.pool.get().await?;
        client
            .query_one(
                "SELECT password_hash FROM tenantry.users WHERE id = $1",
                &[&user_id],
            )
            .await?
            .get(0)
    };
    // bcrypt reads 72 bytes; a longer password was never accepted.
    if password.len() > 72 || !state.hasher.verify(password, Some(stored.clone())).await? {
        return Err(ApiError::InvalidCredentials);
    }
    Ok(stored)
}
