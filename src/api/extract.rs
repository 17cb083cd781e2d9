//! The authenticated caller, from `Authorization: Bearer <access token>`.
//!
//! [`AuthenticatedUser`] only checks the token's signature and claims: it is
//! for the tenant routes, whose guard ([`crate::routing::TenantTx`]) checks
//! the registry (account enabled, token generation current) in the same
//! statement that routes. Every other route takes [`CurrentUser`] (or
//! [`AdminUser`] / [`AuditReader`]), which checks the registry itself. So
//! on every route a token stops working the moment its account is erased
//! or disabled, its password changes, or it signs out everywhere; and it is
//! refused with 403 `account_suspended` while its account is suspended.

use std::future::{ready, Ready};

use futures::future::LocalBoxFuture;

use actix_web::{web, FromRequest, HttpRequest};
use uuid::Uuid;

use crate::api::middleware::bearer_claims;
use crate::api::ApiError;
use crate::api::AppState;
use crate::auth::{Claims, Role};
use crate::routing::Caller;

/// A valid access token's claims (signature, issuer, audience, expiry and
/// type checked; the registry not yet).
#[derive(Debug, Clone)]
pub struct AuthenticatedUser(pub Claims);

impl AuthenticatedUser {
    /// Whom the tenant guard routes to.
    pub fn caller(&self) -> Caller {
        Caller {
            user_id: self.0.sub,
            generation: self.0.generation,
            session: self.0.sid,
        }
    }
}

impl FromRequest for AuthenticatedUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(
            bearer_claims(req)
                .map(AuthenticatedUser)
                .ok_or(ApiError::Unauthorized),
        )
    }
}

/// A caller whose token is valid and whose account, as the registry has it
/// now, is enabled at the token's generation (401 otherwise) and not
/// suspended (403 `account_suspended`). `role` is the registry's.
#[derive(Debug, Clone)]
pub struct CurrentUser {
    pub claims: Claims,
    pub role: Role,
}

impl CurrentUser {
    pub fn id(&self) -> Uuid {
        self.claims.sub
    }
}

impl FromRequest for CurrentUser {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let user = AuthenticatedUser::from_request(req, payload).into_inner();
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let AuthenticatedUser(claims) = user?;
            let state = state.ok_or(ApiError::Unauthorized)?;
            let client = state.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT role, suspended_at IS NOT NULL AS suspended FROM tenantry.users
                     WHERE id = $1 AND token_generation = $2 AND disabled_at IS NULL
                       AND NOT EXISTS (SELECT FROM tenantry.refresh_tokens r
                                       WHERE r.family_id = $3 AND r.revoked_at IS NOT NULL)",
                )
                .await?;
            let row = client
                .query_opt(&stmt, &[&claims.sub, &claims.generation, &claims.sid])
                .await?
                .ok_or(ApiError::Unauthorized)?;
            // Only a token that is valid in every other way learns that its
            // account is suspended.
            if row.get::<_, bool>("suspended") {
                return Err(ApiError::AccountSuspended);
            }
            let role = Role::parse(row.get("role")).ok_or(ApiError::Unauthorized)?;
            Ok(CurrentUser { claims, role })
        })
    }
}

/// The current user, if their role (per the registry now) is one of
/// `allowed`: 401 without a valid token, 403 for any other role.
fn with_role(
    req: &HttpRequest,
    payload: &mut actix_web::dev::Payload,
    allowed: &'static [Role],
    refusal: &'static str,
) -> LocalBoxFuture<'static, Result<CurrentUser, ApiError>> {
    let user = CurrentUser::from_request(req, payload);
    Box::pin(async move {
        let user = user.await?;
        if allowed.contains(&user.role) {
            Ok(user)
        } else {
            Err(ApiError::Forbidden(refusal))
        }
    })
}

/// An admin, per the registry now (a demoted admin loses access at once).
#[derive(Debug, Clone)]
pub struct AdminUser(pub CurrentUser);

impl FromRequest for AdminUser {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let user = with_role(
            req,
            payload,
            &[Role::Admin],
            "this route is for admins only",
        );
        Box::pin(async move { user.await.map(AdminUser) })
    }
}

/// An admin or an auditor: who may read the audit log.
#[derive(Debug, Clone)]
pub struct AuditReader(pub CurrentUser);

impl FromRequest for AuditReader {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let user = with_role(
            req,
            payload,
            &[Role::Admin, Role::Auditor],
            "this route is for admins and auditors only",
        );
        Box::pin(async move { user.await.map(AuditReader) })
    }
}

/// A JSON request body, which must be a JSON object: serde would also take
/// an array for a struct (`[null, null]` for two optional fields), and no
/// client means that. Size, content type and timeouts are `web::Json`'s
/// (the app's `JsonConfig`); every error is a JSON 4xx.
pub struct JsonBody<T>(pub T);

impl<T> JsonBody<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for JsonBody<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: serde::de::DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let raw = web::Json::<Box<serde_json::value::RawValue>>::from_request(req, payload);
        Box::pin(async move {
            let raw = raw.await?.into_inner();
            let invalid = |message: String| ApiError::BadRequest {
                code: "invalid_json",
                message,
            };
            if !raw.get().trim_start().starts_with('{') {
                return Err(invalid("expected a JSON object".into()).into());
            }
            serde_json::from_str(raw.get())
                .map(JsonBody)
                .map_err(|e| invalid(crate::api::deserialize_message(&e.to_string())).into())
        })
    }
}
