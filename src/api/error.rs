//! The one place where errors become HTTP responses. Every error body is
//! `{"error":{"code":"…","message":"…"}}`; 5xx bodies stay opaque while the
//! log gets the whole cause chain.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::auth::AuthError;
use crate::domain::ValidationError;
use crate::provisioning::ProvisionError;
use crate::routing::RoutingError;
use crate::tenancy::fleet::FleetError;
use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("missing or invalid access token")]
    Unauthorized,
    /// Said apart from [`ApiError::Unauthorized`]: a client that refreshes
    /// needs to know it must sign in again, not that its access token is bad.
    #[error("the refresh token is unknown, expired or already used; sign in again")]
    InvalidRefreshToken,
    #[error("{0}")]
    Forbidden(&'static str),
    /// The account is suspended (restriction of processing): 403
    /// `account_suspended` on login and on every request with a token.
    #[error("this account is suspended")]
    AccountSuspended,
    /// A write to a tenant over its storage quota (`tenancy::usage`): 403
    /// `quota_exceeded`; reads and deletions still work.
    #[error("this account is over its storage quota: it can read, export and delete its experiences, not write")]
    QuotaExceeded,
    /// A verification or reset token that is unknown, used or expired.
    #[error("the token is unknown, already used or expired")]
    InvalidToken,
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    #[error("too many failed logins; try again in {retry_after} s")]
    Throttled { retry_after: u64 },
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("the database is unavailable")]
    Unavailable,
    /// A bounded resource is in use; retry shortly (503 with Retry-After).
    #[error("{message}")]
    Busy { code: &'static str, message: String },
    #[error("{message}")]
    TooManyRequests {
        code: &'static str,
        message: String,
        retry_after: u64,
    },
    /// A statement ran past its time (`TENANTRY_STATEMENT_TIMEOUT`).
    #[error("the request took too long and was stopped")]
    Timeout,
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
        ApiError::Internal(Box::new(e))
    }

    fn code(&self) -> String {
        match self {
            ApiError::Validation(v) => format!("invalid_{}", v.field),
            ApiError::BadRequest { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::Busy { code, .. }
            | ApiError::TooManyRequests { code, .. } => (*code).into(),
            ApiError::Timeout => "timeout".into(),
            ApiError::Throttled { .. } => "too_many_attempts".into(),
            ApiError::RequestTimeout => "request_timeout".into(),
            ApiError::InvalidCredentials => "invalid_credentials".into(),
            ApiError::Unauthorized => "unauthorized".into(),
            ApiError::InvalidRefreshToken => "invalid_refresh_token".into(),
            ApiError::Forbidden(_) => "forbidden".into(),
            ApiError::AccountSuspended => "account_suspended".into(),
            ApiError::QuotaExceeded => "quota_exceeded".into(),
            ApiError::InvalidToken => "invalid_token".into(),
            ApiError::NotFound(_) => "not_found".into(),
            ApiError::Unavailable => "unavailable".into(),
            ApiError::Internal(_) => "internal_error".into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation(_) | ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::InvalidCredentials
            | ApiError::Unauthorized
            | ApiError::InvalidRefreshToken => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::AccountSuspended | ApiError::QuotaExceeded => {
                StatusCode::FORBIDDEN
            }
            ApiError::InvalidToken => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Throttled { .. } | ApiError::TooManyRequests { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Busy { .. } | ApiError::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(source) = self {
            tracing::error!(error = %cause_chain(source.as_ref()), "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if matches!(
            self,
            ApiError::Unavailable | ApiError::Busy { .. } | ApiError::Timeout
        ) {
            response.insert_header(("Retry-After", "5"));
        }
        if let ApiError::Throttled { retry_after } | ApiError::TooManyRequests { retry_after, .. } =
            self
        {
            response.insert_header(("Retry-After", retry_after.to_string()));
        }
        if matches!(self, ApiError::RequestTimeout) {
            // The rest of the body may still be on its way: end the connection.
            response.force_close();
        }
        response.json(error_body(&self.code(), &self.to_string()))
    }
}

pub fn error_body(code: &str, message: &str) -> crate::api::openapi::ErrorBody {
    crate::api::openapi::ErrorBody {
        error: crate::api::openapi::ErrorDetail {
            code: code.to_owned(),
            message: message.to_owned(),
        },
    }
}

/// "outer: middle: inner", for the log. Messages that already end with
/// their cause's text (`"…failed: {source}"`) do not repeat it.
pub fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::internal(e)
    }
}

/// The database went away (closed connection, a connection exception, an
/// operator or crash shutdown): a 503, not a fault of ours.
pub fn database_unavailable(e: &tokio_postgres::Error) -> bool {
    crate::db::connection_lost(e)
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        if database_unavailable(&e) {
            crate::metrics::database_error("unavailable");
            tracing::error!(error = %cause_chain(&e), "database unavailable");
            return ApiError::Unavailable;
        }
        // The tenant's own constraints are the last fence behind the
        // handlers' validation: what they refuse is bad input, not a fault.
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::CHECK_VIOLATION
                || *code == SqlState::NOT_NULL_VIOLATION
                || *code == SqlState::STRING_DATA_RIGHT_TRUNCATION
                || *code == SqlState::NUMERIC_VALUE_OUT_OF_RANGE
                || *code == SqlState::DATETIME_FIELD_OVERFLOW
                || *code == SqlState::INVALID_TEXT_REPRESENTATION
            {
                return ApiError::BadRequest {
                    code: "invalid_input",
                    message: db.message().to_owned(),
                };
            }
            if *code == SqlState::UNIQUE_VIOLATION {
                return ApiError::Conflict {
                    code: "conflict",
                    message: "a record with that name already exists".into(),
                };
            }
            // `statement_timeout` (a tenant's request ran too long).
            if *code == SqlState::QUERY_CANCELED {
                crate::metrics::database_error("timeout");
                return ApiError::Timeout;
            }
            if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CANNOT_CONNECT_NOW {
                crate::metrics::database_error("unavailable");
                return ApiError::Unavailable;
            }
        }
        crate::metrics::database_error("query");
        ApiError::internal(e)
    }
}

impl From<RoutingError> for ApiError {
    fn from(e: RoutingError) -> Self {
        match e {
            RoutingError::NoTenant => ApiError::Unauthorized,
            RoutingError::Suspended => ApiError::AccountSuspended,
            RoutingError::OverQuota => ApiError::QuotaExceeded,
            RoutingError::Pool(e) => e.into(),
            RoutingError::Elsewhere => {
                RoutingError::NodeUnavailable("the tenant is not where it was routed".into()).into()
            }
            RoutingError::NodeUnavailable(message) => {
                crate::metrics::database_error("unavailable");
                tracing::error!(error = %message, "a tenant's worker is unavailable");
                ApiError::Busy {
                    code: "node_unavailable",
                    message:
                        "the database node that holds this tenant is unavailable; try again later"
                            .into(),
                }
            }
            RoutingError::Postgres(e) | RoutingError::RoleRefused(e) => e.into(),
        }
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        use crate::db::DbError;
        match e {
            DbError::Busy(_) => {
                // The setting and its value are for the log, not the client.
                tracing::warn!(error = %e, "a request found no connection outside the pool");
                ApiError::Busy {
                    code: "connections_busy",
                    message: "the service has no database connection free for this; retry shortly"
                        .into(),
                }
            }
            DbError::Connect(_) | DbError::Cluster(_) => {
                tracing::error!(error = %e, "cannot open a database connection");
                crate::metrics::database_error("connect");
                ApiError::Unavailable
            }
            DbError::Postgres(pg) => pg.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::error!(error = %cause_chain(&e), "cannot get a database connection");
        crate::metrics::database_error("pool");
        ApiError::Unavailable
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::UsernameTaken(name) => ApiError::Conflict {
                code: "username_taken",
                message: format!("username {name} is already taken"),
            },
            ProvisionError::EmailTaken => ApiError::Conflict {
                code: "email_taken",
                message: "email is already registered".into(),
            },
            ProvisionError::Postgres(pg) => pg.into(),
            ProvisionError::Published(reason) => {
                tracing::error!(%reason, "cannot provision: the published templates cannot be read");
                crate::metrics::database_error("templates");
                ApiError::Unavailable
            }
            ProvisionError::Template { ref source, .. } if database_unavailable(source) => {
                tracing::error!(error = %cause_chain(&e), "provisioning failed: the database is unavailable");
                crate::metrics::database_error("unavailable");
                ApiError::Unavailable
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::tenancy::erasure::ErasureError> for ApiError {
    fn from(e: crate::tenancy::erasure::ErasureError) -> Self {
        use crate::tenancy::erasure::ErasureError;
        match e {
            ErasureError::NoSuchTenant(_) => ApiError::NotFound(e.to_string()),
            ErasureError::Busy => ApiError::Conflict {
                code: "tenant_busy",
                message: e.to_string(),
            },
            ErasureError::Postgres(pg) => pg.into(),
            ErasureError::NodeUnavailable(_) => ApiError::Busy {
                code: "node_unavailable",
                message: e.to_string(),
            },
            other => ApiError::internal(other),
        }
    }
}

impl From<crate::tenancy::suspension::SuspensionError> for ApiError {
    fn from(e: crate::tenancy::suspension::SuspensionError) -> Self {
        use crate::tenancy::suspension::SuspensionError;
        match e {
            SuspensionError::NoSuchTenant(_) => ApiError::NotFound("no such tenant".into()),
            SuspensionError::AlreadySuspended(_) => ApiError::Conflict {
                code: "already_suspended",
                message: e.to_string(),
            },
            SuspensionError::NotSuspended(_) => ApiError::Conflict {
                code: "not_suspended",
                message: e.to_string(),
            },
            SuspensionError::InvalidReason(message) => ApiError::BadRequest {
                code: "invalid_reason",
                message,
            },
            SuspensionError::Postgres(pg) => pg.into(),
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::AlreadyRunning(_) => ApiError::Conflict {
                code: "fleet_busy",
                message: e.to_string(),
            },
            // The admin must see which file is refused, and why.
            FleetError::Integrity(crate::tenancy::integrity::IntegrityError::Postgres(pg))
            | FleetError::Postgres(pg) => pg.into(),
            FleetError::Integrity(_) | FleetError::Published(_) => ApiError::Conflict {
                code: "templates_refused",
                message: e.to_string(),
            },
            FleetError::UnknownTarget { .. } | FleetError::Backwards { .. } => {
                ApiError::BadRequest {
                    code: "invalid_target_version",
                    message: e.to_string(),
                }
            }
            FleetError::BadConcurrency => ApiError::BadRequest {
                code: "invalid_concurrency",
                message: e.to_string(),
            },
            FleetError::NoSuchTenant(_) => ApiError::NotFound(e.to_string()),
            FleetError::Db(db) => db.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer failed: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_cause_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(cause_chain(&e), "outer failed: disk on fire");
    }
}
