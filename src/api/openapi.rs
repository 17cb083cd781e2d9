//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the code.
//! Each handler carries its own `#[utoipa::path]`; `utoipa-actix-web`
//! collects them from the one route table (`api::routes`), so a route is
//! written down once. What every operation shares (the error shape, the
//! bearer token, body limits, rate limiting, database outages) is added
//! here, once.

use std::sync::LazyLock;

use actix_web::{get, HttpResponse};
use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{OpenApi, ToSchema};

/// Every error: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `not_found`, `invalid_username`,
    /// `unauthorized`, `too_many_requests`, …
    pub code: String,
    /// For people; may change.
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tenantry",
        description = "Schema-per-tenant provisioning for PostgreSQL: signup makes a user's own \
                       schema, every `/api` request runs in it as the tenant's own role, admins \
                       migrate the fleet, users export and erase their data.\n\n\
                       Authenticate with `Authorization: Bearer <access_token>` from \
                       `POST /api/auth/register` or `POST /api/auth/login`. Every error has the \
                       body `{\"error\":{\"code\":\"…\",\"message\":\"…\"}}`.",
        license(name = "MIT")
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme),
    tags(
        (name = "health", description = "Liveness, readiness, metrics and this document"),
        (name = "auth", description = "Signup, login, tokens and sessions"),
        (name = "me", description = "The caller's account: profile, export, erasure"),
        (name = "tenant data", description = "The caller's own schema"),
        (name = "reference", description = "Shared reference tables"),
        (name = "admin", description = "Tenants, fleet migrations and the audit log (staff)"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token (15 minutes) from register, login or refresh",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("`TENANTRY_METRICS_TOKEN`, when set"))
                    .build(),
            ),
        );
    }
}

/// The document, built once from the route table.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        use utoipa_actix_web::AppExt;
        let (_, mut doc) = actix_web::App::new()
            .into_utoipa_app()
            .openapi(ApiDoc::openapi())
            .configure(super::routes)
            .split_for_parts();
        complete(&mut doc);
        doc
    });
    &DOC
}

/// The methods a path answers, for `Allow` (HEAD wherever GET).
pub fn allowed_methods(item: &utoipa::openapi::PathItem) -> String {
    let mut methods = Vec::new();
    for (method, operation) in operations(item) {
        if operation.is_some() {
            methods.push(method_name(&method));
            if matches!(method, HttpMethod::Get) {
                methods.push("HEAD");
            }
        }
    }
    methods.join(", ")
}

fn method_name(method: &HttpMethod) -> &'static str {
    match method {
        HttpMethod::Get => "GET",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Head => "HEAD",
        HttpMethod::Patch => "PATCH",
        HttpMethod::Trace => "TRACE",
    }
}

fn operations(item: &utoipa::openapi::PathItem) -> [(HttpMethod, Option<&Operation>); 5] {
    [
        (HttpMethod::Get, item.get.as_ref()),
        (HttpMethod::Post, item.post.as_ref()),
        (HttpMethod::Put, item.put.as_ref()),
        (HttpMethod::Patch, item.patch.as_ref()),
        (HttpMethod::Delete, item.delete.as_ref()),
    ]
}

/// What every operation shares, added to each (never overriding what the
/// operation says itself): 401 and 403 (a suspended account) where a token
/// is required, 429 from the rate limits, 503 when the database is out, and
/// the error shape for any other status.
fn complete(doc: &mut utoipa::openapi::OpenApi) {
    fn error(description: &str, retry_after: Option<&str>) -> RefOr<Response> {
        let mut response = ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        );
        if let Some(meaning) = retry_after {
            response = response.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(<u64 as utoipa::PartialSchema>::schema()))
                    .description(Some(meaning))
                    .build(),
            );
        }
        RefOr::T(response.build())
    }
    for item in doc.paths.paths.values_mut() {
        for operation in [
            item.get.as_mut(),
            item.post.as_mut(),
            item.put.as_mut(),
            item.patch.as_mut(),
            item.delete.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
            let has_body = operation.request_body.is_some();
            let responses = &mut operation.responses.responses;
            let mut add = |status: &str, response: RefOr<Response>| {
                responses.entry(status.into()).or_insert(response);
            };
            if secured {
                add("401", error("No valid access token", None));
                add(
                    "403",
                    error("The account is suspended (`account_suspended`)", None),
                );
            }
            if has_body {
                add("413", error("The body is larger than 64 KiB", None));
                add(
                    "415",
                    error("The body is not `Content-Type: application/json`", None),
                );
            }
            add(
                "429",
                error(
                    "Rate limited (`TENANTRY_RATE_LIMIT_*`)",
                    Some("Seconds until a request may succeed"),
                ),
            );
            add(
                "503",
                error(
                    "The database is unavailable",
                    Some("Seconds to wait before retrying"),
                ),
            );
            add("default", error("An error", None));
        }
    }
}

/// This document.
#[utoipa::path(
    tag = "health",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
#[get("/openapi.json")]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(document())
}
