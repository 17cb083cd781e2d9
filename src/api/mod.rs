//! The HTTP API: one route table, JSON in and out.

mod admin;
mod auth;
mod conversations;
pub mod error;
mod experiences;
mod extract;
pub(crate) mod health;
pub(crate) mod me;
mod metrics;
pub mod middleware;
mod paging;
mod reference;
mod sessions;
mod skills;
mod summaries;

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{web, HttpRequest, HttpResponse};

pub use error::ApiError;
pub use extract::AuthenticatedUser;

use error::error_body;

/// Largest JSON body accepted; larger gets 413.
pub const JSON_LIMIT: usize = 64 * 1024;

/// The route table.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(web::PathConfig::default().error_handler(path_error))
        .app_data(web::QueryConfig::default().error_handler(query_error))
        .service(resource("/health").route(web::get().to(health::health)))
        .service(resource("/health/live").route(web::get().to(health::live)))
        .service(resource("/metrics").route(web::get().to(metrics::metrics)))
        .service(resource("/api/auth/register").route(web::post().to(auth::register)))
        .service(resource("/api/auth/login").route(web::post().to(auth::login)))
        .service(resource("/api/auth/refresh").route(web::post().to(auth::refresh)))
        .service(resource("/api/auth/logout").route(web::post().to(auth::logout)))
        .service(resource("/api/auth/sessions").route(web::get().to(sessions::list)))
        .service(resource("/api/auth/sessions/{id}").route(web::delete().to(sessions::end)))
        .service(resource("/api/auth/revoke-all").route(web::post().to(sessions::revoke_all)))
        .service(resource("/api/auth/change-password").route(web::post().to(auth::change_password)))
        .service(
            resource("/api/me")
                .route(web::get().to(me::me))
                .route(web::delete().to(me::erase)),
        )
        .service(resource("/api/me/export").route(web::get().to(me::export)))
        .service(
            resource("/api/experiences")
                .route(web::get().to(experiences::list))
                .route(web::post().to(experiences::create)),
        )
        .service(
            resource("/api/experiences/{id}")
                .route(web::get().to(experiences::get))
                .route(web::patch().to(experiences::update))
                .route(web::delete().to(experiences::delete)),
        )
        .service(
            resource("/api/conversations")
                .route(web::get().to(conversations::list))
                .route(web::post().to(conversations::create)),
        )
        .service(
            resource("/api/conversations/{id}/messages")
                .route(web::get().to(conversations::messages))
                .route(web::post().to(conversations::post_message)),
        )
        .service(
            resource("/api/summaries/{kind}")
                .route(web::get().to(summaries::get))
                .route(web::put().to(summaries::put)),
        )
        .service(
            resource("/api/skills")
                .route(web::get().to(skills::list))
                .route(web::post().to(skills::record)),
        )
        .service(resource("/api/reference/{table}").route(web::get().to(reference::list)))
        .service(resource("/admin/tenants").route(web::get().to(admin::tenants)))
        .service(
            resource("/admin/tenants/{name}")
                .route(web::get().to(admin::tenant))
                .route(web::delete().to(admin::erase_tenant)),
        )
        .service(resource("/admin/audit").route(web::get().to(admin::audit_log)))
        .service(resource("/admin/fleet").route(web::get().to(admin::fleet_status)))
        .service(resource("/admin/fleet/migrations").route(web::post().to(admin::start_migration)))
        .service(
            resource("/admin/fleet/migrations/{run_id}").route(web::get().to(admin::migration)),
        )
        .default_service(web::to(not_found));
}

fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(JSON_LIMIT)
        .error_handler(|err, _req| {
            let (status, code, message) = match &err {
                JsonPayloadError::Overflow { .. }
                | JsonPayloadError::OverflowKnownLength { .. } => (
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request body is larger than {JSON_LIMIT} bytes"),
                ),
                JsonPayloadError::ContentType => (
                    actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "expected Content-Type: application/json".to_string(),
                ),
                JsonPayloadError::Payload(actix_web::error::PayloadError::Io(e))
                    if e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return ApiError::RequestTimeout.into();
                }
                JsonPayloadError::Deserialize(e) => (
                    actix_web::http::StatusCode::BAD_REQUEST,
                    "invalid_json",
                    truncate(&e.to_string(), 200),
                ),
                other => (
                    actix_web::http::StatusCode::BAD_REQUEST,
                    "invalid_json",
                    truncate(&other.to_string(), 200),
                ),
            };
            actix_web::error::InternalError::from_response(
                err,
                HttpResponse::build(status).json(error_body(code, &message)),
            )
            .into()
        })
}

fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    let body = error_body("invalid_path", &truncate(&err.to_string(), 200));
    actix_web::error::InternalError::from_response(err, HttpResponse::NotFound().json(body)).into()
}

fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let body = error_body("invalid_query", &truncate(&err.to_string(), 200));
    actix_web::error::InternalError::from_response(err, HttpResponse::BadRequest().json(body))
        .into()
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(error_body("not_found", "no such route"))
}

async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed().json(error_body(
        "method_not_allowed",
        "this route does not accept that method",
    ))
}

/// Error messages echo parts of the input; keep them short.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
