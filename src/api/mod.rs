//! The HTTP API: one route table, JSON in and out, described by the
//! OpenAPI document it generates (`openapi`).

pub(crate) mod account;
mod admin;
mod auth;
mod console;
mod conversations;
pub mod error;
pub mod experiences;
pub mod exports;
mod extract;
pub(crate) mod health;
pub(crate) mod me;
mod metrics;
pub mod middleware;
pub mod openapi;
mod paging;
mod reference;
pub(crate) mod rows;
mod sessions;
mod skills;
mod state;
mod summaries;

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{web, HttpRequest, HttpResponse};

pub use error::ApiError;
pub use extract::AuthenticatedUser;
pub use state::{AppState, FleetRuns};

use error::error_body;

/// Largest JSON body accepted; larger gets 413.
pub const JSON_LIMIT: usize = 64 * 1024;

/// The route table: every route once, with its OpenAPI description on its
/// handler (`utoipa-actix-web` collects them for `/openapi.json`).
pub(crate) fn routes(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(health::health)
        .service(health::live)
        .service(metrics::metrics)
        .service(openapi::openapi_json)
        .service(console::console_root)
        .service(console::console_page)
        .service(console::console_file)
        .service(auth::register)
        .service(auth::login)
        .service(auth::refresh)
        .service(auth::logout)
        .service(auth::change_password)
        .service(account::verify_email)
        .service(account::resend_verification)
        .service(account::forgot_password)
        .service(account::reset_password)
        .service(account::change_email)
        .service(sessions::list)
        .service(sessions::end)
        .service(sessions::revoke_all)
        .service(me::me)
        .service(me::erase)
        .service(me::export)
        .service(experiences::list)
        .service(experiences::create)
        .service(experiences::get)
        .service(experiences::update)
        .service(experiences::delete)
        .service(conversations::list)
        .service(conversations::create)
        .service(conversations::messages)
        .service(conversations::post_message)
        .service(summaries::get_quick)
        .service(summaries::put_quick)
        .service(summaries::get_profile)
        .service(summaries::put_profile)
        .service(skills::list)
        .service(skills::record)
        .service(reference::list)
        .service(admin::tenants)
        .service(admin::tenant)
        .service(admin::erase_tenant)
        .service(admin::suspend_tenant)
        .service(admin::resume_tenant)
        .service(admin::tenant_usage)
        .service(admin::set_quota)
        .service(admin::add_webhook)
        .service(admin::webhooks)
        .service(admin::remove_webhook)
        .service(admin::webhook_deliveries)
        .service(admin::retry_webhook)
        .service(admin::verify_audit)
        .service(admin::audit_log)
        .service(admin::fleet_status)
        .service(admin::start_migration)
        .service(admin::migration)
        .service(admin::cluster)
        .service(admin::move_tenant)
        .service(admin::rebalance)
        .service(admin::rebalance_job);
}

/// The app's routes, their extractors' error handlers, a JSON 405 with
/// `Allow` for any other method on a known path (the methods read from the
/// OpenAPI document, so they cannot disagree) and a JSON 404 elsewhere.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(web::PathConfig::default().error_handler(path_error))
        .app_data(web::QueryConfig::default().error_handler(query_error));
    routes(&mut utoipa_actix_web::service_config::ServiceConfig::new(
        cfg,
    ));
    for (path, item) in openapi::document().paths.paths.iter() {
        let allow = openapi::allowed_methods(item);
        cfg.service(web::resource(path.as_str()).to(move || method_not_allowed(allow.clone())));
    }
    cfg.default_service(web::to(not_found));
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
                    deserialize_message(&e.to_string()),
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

/// A path whose id does not parse names nothing: a plain 404, without the
/// parser's words (they describe our types, not the client's mistake).
fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    let body = error_body(
        "not_found",
        "no such resource: the id in the path is malformed",
    );
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

async fn method_not_allowed(allow: String) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", allow))
        .json(error_body(
            "method_not_allowed",
            "this route does not accept that method",
        ))
}

/// A serde error as a client sees it: short, without our type names.
pub(crate) fn deserialize_message(error: &str) -> String {
    truncate(&without_type_names(error), 200)
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
