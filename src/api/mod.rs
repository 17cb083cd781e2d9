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
        .service(resource("/health", "GET, HEAD").route(web::get().to(health::health)))
        .service(resource("/health/live", "GET, HEAD").route(web::get().to(health::live)))
        .service(resource("/metrics", "GET, HEAD").route(web::get().to(metrics::metrics)))
        .service(resource("/api/auth/register", "POST").route(web::post().to(auth::register)))
        .service(resource("/api/auth/login", "POST").route(web::post().to(auth::login)))
        .service(resource("/api/auth/refresh", "POST").route(web::post().to(auth::refresh)))
        .service(resource("/api/auth/logout", "POST").route(web::post().to(auth::logout)))
        .service(resource("/api/auth/sessions", "GET, HEAD").route(web::get().to(sessions::list)))
        .service(
            resource("/api/auth/sessions/{id}", "DELETE").route(web::delete().to(sessions::end)),
        )
        .service(
            resource("/api/auth/revoke-all", "POST").route(web::post().to(sessions::revoke_all)),
        )
        .service(
            resource("/api/auth/change-password", "POST")
                .route(web::post().to(auth::change_password)),
        )
        .service(
            resource("/api/me", "GET, HEAD, DELETE")
                .route(web::get().to(me::me))
                .route(web::delete().to(me::erase)),
        )
        .service(resource("/api/me/export", "GET, HEAD").route(web::get().to(me::export)))
        .service(
            resource("/api/experiences", "GET, HEAD, POST")
                .route(web::get().to(experiences::list))
                .route(web::post().to(experiences::create)),
        )
        .service(
            resource("/api/experiences/{id}", "GET, HEAD, PATCH, DELETE")
                .route(web::get().to(experiences::get))
                .route(web::patch().to(experiences::update))
                .route(web::delete().to(experiences::delete)),
        )
        .service(
            resource("/api/conversations", "GET, HEAD, POST")
                .route(web::get().to(conversations::list))
                .route(web::post().to(conversations::create)),
        )
        .service(
            resource("/api/conversations/{id}/messages", "GET, HEAD, POST")
                .route(web::get().to(conversations::messages))
                .route(web::post().to(conversations::post_message)),
        )
        .service(
            resource("/api/summaries/{kind}", "GET, HEAD, PUT")
                .route(web::get().to(summaries::get))
                .route(web::put().to(summaries::put)),
        )
        .service(
            resource("/api/skills", "GET, HEAD, POST")
                .route(web::get().to(skills::list))
                .route(web::post().to(skills::record)),
        )
        .service(
            resource("/api/reference/{table}", "GET, HEAD").route(web::get().to(reference::list)),
        )
        .service(resource("/admin/tenants", "GET, HEAD").route(web::get().to(admin::tenants)))
        .service(
            resource("/admin/tenants/{name}", "GET, HEAD, DELETE")
                .route(web::get().to(admin::tenant))
                .route(web::delete().to(admin::erase_tenant)),
        )
        .service(resource("/admin/audit", "GET, HEAD").route(web::get().to(admin::audit_log)))
        .service(resource("/admin/fleet", "GET, HEAD").route(web::get().to(admin::fleet_status)))
        .service(
            resource("/admin/fleet/migrations", "POST")
                .route(web::post().to(admin::start_migration)),
        )
        .service(
            resource("/admin/fleet/migrations/{run_id}", "GET, HEAD")
                .route(web::get().to(admin::migration)),
        )
        .default_service(web::to(not_found));
}

/// A route's resource; any other method gets a JSON 405 with `Allow`.
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || method_not_allowed(allow)))
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
                    truncate(&without_type_names(&e.to_string()), 200),
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

async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", allow))
        .json(error_body(
            "method_not_allowed",
            "this route does not accept that method",
        ))
}

/// serde names our Rust types ("expected struct RegisterRequest"); a client
/// needs to know only that an object was expected.
fn without_type_names(message: &str) -> String {
    static TYPE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"(struct|enum) [A-Z][A-Za-z0-9_]*").unwrap()
    });
    TYPE.replace_all(message, |c: &regex::Captures| {
        if &c[1] == "struct" {
            "a JSON object"
        } else {
            "one of the allowed values"
        }
        .to_string()
    })
    .into_owned()
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
