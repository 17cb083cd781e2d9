//! The authenticated caller, from `Authorization: Bearer <access token>`.

use std::future::{ready, Ready};

use futures::future::LocalBoxFuture;

use actix_web::{web, FromRequest, HttpRequest};

use crate::api::ApiError;
use crate::auth::Claims;
use crate::startup::AppState;

#[derive(Debug, Clone)]
pub struct AuthenticatedUser(pub Claims);

impl FromRequest for AuthenticatedUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let claims = (|| {
            let state = req.app_data::<web::Data<AppState>>()?;
            let header = req.headers().get(actix_web::http::header::AUTHORIZATION)?;
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, token) = header.to_str().ok()?.trim().split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            state.jwt.verify(token.trim())
        })();
        ready(claims.map(AuthenticatedUser).ok_or(ApiError::Unauthorized))
    }
}

/// An authenticated admin. The role is read from the registry on every
/// request, not trusted from the token: a demoted admin loses access at once.
/// No token: 401; any other role: 403.
#[derive(Debug, Clone)]
pub struct AdminUser(pub Claims);

impl FromRequest for AdminUser {
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
                .prepare_cached("SELECT role FROM tenantry.users WHERE id = $1")
                .await?;
            let role: String = client
                .query_opt(&stmt, &[&claims.sub])
                .await?
                .ok_or(ApiError::Unauthorized)?
                .get(0);
            if role != "admin" {
                return Err(ApiError::Forbidden("this route is for admins only"));
            }
            Ok(AdminUser(claims))
        })
    }
}
