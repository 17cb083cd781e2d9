//! `GET /admin/ui/`: the admin console, a page and its script and style,
//! embedded in the binary at build time (`console/`). It asks no other
//! host for anything and runs no inline script, under a Content-Security-
//! Policy that allows only its own files and the service's own API. It
//! holds the admin's access token in memory only (SECURITY.md); what it
//! may do is what that token may do over the JSON API.

use actix_web::{get, http::header, web, HttpResponse};

use crate::api::ApiError;

/// The console's policy: its own script, style and API, nothing else (no
/// inline script or style, no other host, no framing, no form posts).
pub const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/app.css");
const ICON: &str = include_str!("../../console/icon.svg");

fn file(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, POLICY))
        .body(body)
}

/// `GET /admin/ui/` (and `/admin/ui`): the admin console's page (sign in
/// as an admin, or an auditor for the audit log).
#[utoipa::path(
    tag = "console",
    responses((status = 200, description = "The console's page", content_type = "text/html"))
)]
#[get("/admin/ui")]
pub async fn console_root() -> HttpResponse {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /admin/ui/`: the admin console's page.
#[utoipa::path(
    tag = "console",
    responses((status = 200, description = "The console's page", content_type = "text/html"))
)]
#[get("/admin/ui/")]
pub async fn console_page() -> HttpResponse {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /admin/ui/{file}`: the console's script (`app.js`), style
/// (`app.css`) and icon (`icon.svg`).
#[utoipa::path(
    tag = "console",
    params(("file" = String, Path, description = "app.js, app.css or icon.svg")),
    responses(
        (status = 200, description = "The file", content_type = "text/javascript"),
        (status = 404, description = "No such file", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/ui/{file}")]
pub async fn console_file(name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    match name.as_str() {
        "app.js" => Ok(file("text/javascript; charset=utf-8", SCRIPT)),
        "app.css" => Ok(file("text/css; charset=utf-8", STYLE)),
        "icon.svg" => Ok(file("image/svg+xml", ICON)),
        _ => Err(ApiError::NotFound("no such file".into())),
    }
}
