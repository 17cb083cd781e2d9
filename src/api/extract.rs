//! The authenticated caller, from `Authorization: Bearer <access token>`.

use std::future::{ready, Ready};

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
            let token = header.to_str().ok()?.strip_prefix("Bearer ")?;
            state.jwt.verify(token.trim())
        })();
        ready(claims.map(AuthenticatedUser).ok_or(ApiError::Unauthorized))
    }
}
