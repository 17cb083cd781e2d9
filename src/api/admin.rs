//! Admin routes: the tenant registry, the audit log (admins and auditors),
//! and the fleet: its status, starting a migration run (which goes on in
//! the background, past the request) and following a run.

use actix_web::{delete, get, post, put, web, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::api::extract::JsonBody;
use crate::api::extract::{AdminUser, AuditReader};
use crate::api::paging::{cursor_part, invalid, make_cursor, Page};
use crate::api::ApiError;
use crate::api::AppState;
use crate::audit::{self, Action, Entry};
use crate::domain::{TemplateVersion, Username};
use crate::tenancy::fleet::{self, Progress, RunOptions};

/// `GET /admin/fleet`: tenants per version, pending, failed, drift, last run.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The fleet", body = crate::tenancy::fleet::FleetStatus),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/fleet")]
pub async fn fleet_status(
    state: web::Data<AppState>,
    _admin: AdminUser,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    // What was published since (by a command, or another process) counts.
    let templates = match state.templates.refresh(&**client).await {
        Ok(published) => published.set().clone(),
        Err(_) => state.templates.get(),
    };
    let status = fleet::fleet_status(&client, &state.installation, &templates).await?;
    Ok(HttpResponse::Ok().json(status))
}

/// A fleet migration run; every field is optional.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The version to migrate to (the latest when absent).
    #[schema(minimum = 1)]
    target_version: Option<i64>,
    /// Tenants migrated at once (default 4).
    #[schema(minimum = 1, maximum = 64)]
    concurrency: Option<usize>,
    /// Tenants migrated first, one at a time; if one fails the run stops.
    canary: Option<usize>,
    /// Stop after this many failures (no limit when absent).
    #[schema(minimum = 1)]
    max_failures: Option<usize>,
    /// Only this tenant (a username).
    #[schema(pattern = "^[A-Za-z][A-Za-z0-9_]{2,31}$")]
    tenant: Option<String>,
    /// Plan only: 200 with what the run would migrate; nothing is started
    /// or changed (as `fleet migrate --dry-run`).
    #[serde(default)]
    dry_run: bool,
}

/// What a run would migrate (`dry_run`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DryRun {
    pub target_version: i32,
    /// Tenants the run would migrate.
    pub planned: usize,
    /// The first 100 of them, in the order the run takes them (the
    /// canary first), with the version each is at.
    pub tenants: Vec<PlannedTenant>,
}

/// A tenant a run would migrate.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlannedTenant {
    pub username: String,
    pub from_version: i32,
}

/// A run was started.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunStarted {
    pub run_id: i64,
    pub target_version: i32,
    /// Tenants the run will migrate.
    pub planned: usize,
}

/// Nobody watches a background run's progress in-process: its results are
/// in the control plane, where `GET /admin/fleet/migrations/{id}` reads them.
struct Unwatched;
impl Progress for Unwatched {}

/// `POST /admin/fleet/migrations`: take the run lock, plan and record the
/// run, answer 202 with its id, and run it in the background. 409 while
/// another run (from any process) holds the lock.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    request_body = StartRun,
    responses(
        (status = 202, description = "Started; it runs in the background", body = RunStarted,
         headers(("Location" = String, description = "The run's URL"))),
        (status = 200, description = "`dry_run`: what the run would migrate; nothing was started", body = DryRun),
        (status = 400, description = "Invalid options", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Another run is in progress, or the templates are refused", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/fleet/migrations")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn start_migration(
    state: web::Data<AppState>,
    admin: AdminUser,
    body: JsonBody<StartRun>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let body_dry_run = body.dry_run;
    let defaults = RunOptions::default();
    let bad = |code: &'static str, message: String| ApiError::BadRequest { code, message };
    let target = body
        .target_version
        .map(TemplateVersion::parse)
        .transpose()?;
    if body.max_failures == Some(0) {
        return Err(bad(
            "invalid_max_failures",
            "max_failures must be at least 1 (leave it out for no limit)".into(),
        ));
    }
    let only_tenant = body.tenant.as_deref().map(Username::parse).transpose()?;
    let options = RunOptions {
        target,
        concurrency: body.concurrency.unwrap_or(defaults.concurrency),
        canary: body.canary.unwrap_or(defaults.canary),
        max_failures: body.max_failures,
        only_tenant,
        started_by: format!("admin:{}", admin.0.claims.username),
        audit_actor: Some(state.pseudonyms.user(admin.0.id())),
        ..defaults
    };
    // The run's connections (its control and one per worker) count against
    // TENANTRY_EXTRA_CONNECTIONS, beside the exports, /health and the mail
    // and webhook senders.
    let room = state
        .connector
        .cap()
        .saturating_sub(state.exports.size() + 3);
    if options.concurrency + 1 > room {
        return Err(bad(
            "invalid_concurrency",
            format!(
                "concurrency {} needs {} connections outside the pool and {room} are left for a fleet run (TENANTRY_EXTRA_CONNECTIONS); lower it, or run `tenantry fleet migrate`",
                options.concurrency,
                options.concurrency + 1
            ),
        ));
    }
    // The run migrates to the newest published version: read it again.
    let templates = {
        let client = state.pool.get().await?;
        state
            .templates
            .refresh(&**client)
            .await
            .map_err(|e| ApiError::from(fleet::FleetError::from(e)))?
            .set()
            .clone()
    };
    if body_dry_run {
        let client = state.pool.get().await?;
        let plan = fleet::plan_only(&client, &templates, &options).await?;
        return Ok(HttpResponse::Ok().json(DryRun {
            target_version: plan.target.get(),
            planned: plan.tenants.len(),
            tenants: plan
                .tenants
                .iter()
                .take(100)
                .map(|t| PlannedTenant {
                    username: t.username.clone(),
                    from_version: t.from_version,
                })
                .collect(),
        }));
    }
    let prepared = fleet::prepare(&state.connector, templates, options).await?;
    let run_id = prepared.run_id();
    state.fleet_runs.register(prepared.stop_handle());
    let planned = prepared.plan().tenants.len();
    let target = prepared.plan().target.get();
    // Not tied to the request: the run goes on after the response.
    actix_web::rt::spawn(async move {
        if let Err(e) = prepared.execute(&Unwatched).await {
            tracing::error!(run = run_id, error = %crate::api::error::cause_chain(&e), "fleet run failed");
        }
    });
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/admin/fleet/migrations/{run_id}")))
        .json(RunStarted {
            run_id,
            target_version: target,
            planned,
        }))
}

/// `GET /admin/fleet/migrations/{run_id}`: a run's status, progress and
/// failed tenants (live while it runs).
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("run_id" = i64, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = crate::tenancy::fleet::RunReport),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such run", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/fleet/migrations/{run_id}")]
pub async fn migration(
    state: web::Data<AppState>,
    _admin: AdminUser,
    run_id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let report = fleet::run_report(&client, run_id.into_inner())
        .await?
        .ok_or_else(|| ApiError::NotFound("no such fleet run".into()))?;
    Ok(HttpResponse::Ok().json(report))
}

/// `?q=&status=&version=&sort=&limit=&cursor=` of `GET /admin/tenants`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TenantsQuery {
    /// Only tenants whose username contains this (case-insensitive).
    #[param(max_length = 200)]
    q: Option<String>,
    /// Only tenants in this status.
    #[param(inline)]
    status: Option<TenantStatus>,
    /// Only tenants at this template version.
    #[param(minimum = 1)]
    version: Option<i32>,
    /// `name` (the default) or `size`: largest first as last measured, the
    /// unmeasured last.
    #[param(inline)]
    sort: Option<TenantSort>,
    /// Items per page, 1 to 200 (50 when absent).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    cursor: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    Active,
    Migrating,
    Failed,
    Deleting,
    /// The account is suspended (whatever the registry's status beneath).
    Suspended,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TenantSort {
    #[default]
    Name,
    Size,
}

impl TenantStatus {
    fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Migrating => "migrating",
            TenantStatus::Failed => "failed",
            TenantStatus::Deleting => "deleting",
            TenantStatus::Suspended => "suspended",
        }
    }
}

/// `GET /admin/tenants`: the registry by username, a page at a time,
/// optionally only one status and/or template version.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(TenantsQuery),
    responses(
        (status = 200, description = "A page of tenants, by username or by size", body = Page<crate::tenants::TenantInfo>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/tenants")]
pub async fn tenants(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<TenantsQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    if q.version.is_some_and(|v| v < 1) {
        return Err(invalid("version", "must be at least 1"));
    }
    let paging = crate::api::paging::ListQuery {
        q: q.q,
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = paging.limit()?;
    let name_part = paging.search()?;
    let sort = q.sort.unwrap_or_default();
    // Each order has a cursor of its own: one of the other is refused.
    let after = match sort {
        TenantSort::Name => paging
            .cursor("t", 1)?
            .map(|parts| cursor_part::<String>(&parts[0]).map(|name| (0, name)))
            .transpose()?,
        // The size is carried plus one: the unmeasured (-1) as 0, as
        // cursors carry no negative number.
        TenantSort::Size => paging
            .cursor("ts", 2)?
            .map(|parts| {
                Ok::<_, ApiError>((cursor_part::<i64>(&parts[0])? - 1, cursor_part(&parts[1])?))
            })
            .transpose()?,
    };
    let order = match (sort, &after) {
        (TenantSort::Name, after) => crate::tenants::Order::Name {
            after: after.as_ref().map(|(_, name)| name.as_str()),
        },
        (TenantSort::Size, after) => crate::tenants::Order::Size {
            after: after.as_ref().map(|(size, name)| (*size, name.as_str())),
        },
    };
    let client = state.pool.get().await?;
    let items = crate::tenants::page(
        &**client,
        q.status.map(TenantStatus::as_str),
        q.version,
        name_part,
        order,
        limit + 1,
    )
    .await?;
    let page = Page::from_rows(items, limit, |t| match sort {
        TenantSort::Name => make_cursor("t", std::slice::from_ref(&t.username)),
        TenantSort::Size => make_cursor(
            "ts",
            &[
                (crate::tenants::size_key(t) + 1).to_string(),
                t.username.clone(),
            ],
        ),
    });
    Ok(HttpResponse::Ok().json(page))
}

/// `GET /admin/tenants/{name}`: one tenant, 404 if there is none.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    responses(
        (status = 200, description = "The tenant, its live sessions and (on Citus) its node", body = crate::tenants::TenantDetail),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/tenants/{name}")]
pub async fn tenant(
    state: web::Data<AppState>,
    _admin: AdminUser,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let client = state.pool.get().await?;
    tenant_now(&client, &username, state.installation.citus).await
}

/// `DELETE /admin/tenants/{name}`: erase a tenant (GDPR art. 17) → 200
/// with the receipt; 404 if there is none, 409 while it is busy.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    responses(
        (status = 200, description = "Erased; what was removed", body = crate::tenancy::erasure::Receipt),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "The tenant is busy (a migration holds it); retry", body = crate::api::openapi::ErrorBody),
    )
)]
#[delete("/admin/tenants/{name}")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn erase_tenant(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let receipt = crate::api::me::erase_tenant(
        &state,
        &username,
        crate::tenancy::erasure::Requester {
            actor: state.pseudonyms.user(admin.0.id()),
            client: crate::api::auth::client_of(&state, &request),
            reason: "admin",
            only_unverified: false,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(receipt))
}

/// Why a tenant is suspended.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspendRequest {
    /// Shown in the tenant's details and sent to the user; optional.
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// `POST /admin/tenants/{name}/suspend` `{reason?}`: restrict processing
/// (GDPR art. 18): the account's login, refresh and every request with one
/// of its tokens answer 403 `account_suspended` at once; its data, sessions
/// and registry row stay (fleet migrations still reach it, admins can
/// export and erase it). The user is mailed. 200 with the tenant.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    request_body = SuspendRequest,
    responses(
        (status = 200, description = "Suspended", body = crate::tenants::TenantDetail),
        (status = 400, description = "The reason is too long or has control characters (`invalid_reason`)", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Already suspended (`already_suspended`)", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/tenants/{name}/suspend")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn suspend_tenant(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    name: web::Path<String>,
    body: JsonBody<SuspendRequest>,
) -> Result<HttpResponse, ApiError> {
    use crate::tenancy::suspension::{self, Reason};
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let reason = body
        .into_inner()
        .reason
        .as_deref()
        .map(Reason::parse)
        .transpose()?
        .flatten();
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    suspension::suspend(
        &mut client,
        &username,
        reason.as_ref(),
        &by,
        &state.pseudonyms,
        &state.letters,
    )
    .await?;
    state.letters.wake();
    tenant_now(&client, &username, state.installation.citus).await
}

/// `POST /admin/tenants/{name}/resume`: lift a suspension; the account's
/// sessions and tokens work again. The user is mailed. 200 with the tenant.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    responses(
        (status = 200, description = "Resumed", body = crate::tenants::TenantDetail),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Not suspended (`not_suspended`)", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/tenants/{name}/resume")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn resume_tenant(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    crate::tenancy::suspension::resume(
        &mut client,
        &username,
        &by,
        &state.pseudonyms,
        &state.letters,
    )
    .await?;
    state.letters.wake();
    tenant_now(&client, &username, state.installation.citus).await
}

/// The admin, as the audit entry of a suspension or resumption names them.
fn changed_by(
    state: &AppState,
    request: &actix_web::HttpRequest,
    admin: &AdminUser,
) -> crate::tenancy::suspension::ChangedBy {
    crate::tenancy::suspension::ChangedBy {
        actor: state.pseudonyms.user(admin.0.id()),
        client: crate::api::auth::client_of(state, request),
    }
}

/// 200 with the tenant as it is now: its registry row, live sessions and
/// (on Citus) node, as `GET /admin/tenants/{name}` shows it.
async fn tenant_now(
    client: &tokio_postgres::Client,
    username: &Username,
    citus: bool,
) -> Result<HttpResponse, ApiError> {
    let found = crate::tenants::detail(client, username, citus)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such tenant".into()))?;
    Ok(HttpResponse::Ok().json(found))
}

/// Options of `GET /admin/tenants/{name}/usage`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Measure the tenant now instead of showing the last measurement.
    #[serde(default)]
    refresh: bool,
}

/// `GET /admin/tenants/{name}/usage`: the bytes the tenant's schema takes
/// (tables, indexes, TOAST) as last measured (`?refresh=true`: now), its
/// quota and whether its writes are refused.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username"), UsageQuery),
    responses(
        (status = 200, description = "The tenant's usage", body = crate::tenancy::usage::Usage),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/tenants/{name}/usage")]
pub async fn tenant_usage(
    state: web::Data<AppState>,
    _admin: AdminUser,
    name: web::Path<String>,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    use crate::tenancy::usage;
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let client = state.pool.get().await?;
    if query.refresh {
        usage::measure_now(
            &state.connector,
            state.installation.citus,
            &username,
            state.tenant_quota_bytes,
        )
        .await?;
    }
    let found = usage::usage(&**client, Some(&username), state.tenant_quota_bytes)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound("no such tenant".into()))?;
    Ok(HttpResponse::Ok().json(found))
}

/// A tenant's own quota.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    /// Bytes its schema may take before its writes are refused (0: no
    /// quota for this tenant), or null to follow
    /// `TENANTRY_TENANT_QUOTA_BYTES`. Required.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 0, required = true)]
    quota_bytes: Option<Option<i64>>,
}

/// A field that is there, even as null (`Some(None)`), apart from one
/// left out (`None`, the default).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// `PUT /admin/tenants/{name}/quota` `{quota_bytes}`: set the tenant's own
/// quota; whether its writes are refused follows at once from its last
/// measured usage. Audited (`tenant_quota_set`). 200 with its usage.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    request_body = QuotaRequest,
    responses(
        (status = 200, description = "Set; the tenant's usage and quota now", body = crate::tenancy::usage::Usage),
        (status = 400, description = "No `quota_bytes`, or a negative one (`invalid_quota_bytes`)", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
    )
)]
#[put("/admin/tenants/{name}/quota")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn set_quota(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    name: web::Path<String>,
    body: JsonBody<QuotaRequest>,
) -> Result<HttpResponse, ApiError> {
    use crate::tenancy::usage::{self, Quota};
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let quota = match body.into_inner().quota_bytes {
        None => {
            return Err(invalid(
                "quota_bytes",
                "is required: bytes, 0 for none, or null for the default",
            ))
        }
        Some(None) => Quota::Default,
        Some(Some(b)) => {
            Quota::Bytes(u64::try_from(b).map_err(|_| invalid("quota_bytes", "must be 0 or more"))?)
        }
    };
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    let found = usage::set_quota(
        &mut client,
        &username,
        quota,
        state.tenant_quota_bytes,
        &by,
        &state.pseudonyms,
    )
    .await?
    .ok_or_else(|| ApiError::NotFound("no such tenant".into()))?;
    Ok(HttpResponse::Ok().json(found))
}

/// A webhook endpoint to add.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// Where to POST the events: `http://` or `https://` (redirects are not
    /// followed).
    #[schema(max_length = 2000)]
    url: String,
    /// Only these event types (default: all).
    events: Option<Vec<String>>,
}

/// An endpoint just added, with its secret (shown only now).
#[derive(Serialize, utoipa::ToSchema)]
pub struct AddedWebhook {
    #[serde(flatten)]
    endpoint: crate::webhooks::Endpoint,
    /// `whsec_…`: what receivers verify signatures with.
    secret: String,
}

/// `POST /admin/webhooks` `{url, events?}`: register an endpoint for
/// lifecycle events (Standard Webhooks). 201 with its secret, shown once.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "Added; the secret is shown only now", body = AddedWebhook),
        (status = 400, description = "Not an http(s) URL (`invalid_url`), an unknown event type (`invalid_events`)", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/webhooks")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn add_webhook(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    body: JsonBody<WebhookRequest>,
) -> Result<HttpResponse, ApiError> {
    use crate::webhooks::{self, EventType};
    let body = body.into_inner();
    let url = webhooks::parse_url(&body.url).map_err(|e| invalid("url", &e))?;
    let types = body
        .events
        .map(|list| {
            if list.is_empty() {
                return Err(invalid(
                    "events",
                    "names no event type (leave it out for all)",
                ));
            }
            list.iter()
                .map(|t| EventType::parse(t).map_err(|e| invalid("events", &e)))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    let (endpoint, secret) = webhooks::add(&mut client, &url, types.as_deref(), &by).await?;
    Ok(HttpResponse::Created().json(AddedWebhook { endpoint, secret }))
}

/// `GET /admin/webhooks`: every endpoint, with its pending and dead
/// deliveries (never the secrets).
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The endpoints", body = Vec<crate::webhooks::Endpoint>),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/webhooks")]
pub async fn webhooks(
    state: web::Data<AppState>,
    _admin: AdminUser,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    Ok(HttpResponse::Ok().json(crate::webhooks::endpoints(&**client, None).await?))
}

/// `DELETE /admin/webhooks/{id}`: remove an endpoint and its deliveries.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The endpoint's id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::api::openapi::ErrorBody),
    )
)]
#[delete("/admin/webhooks/{id}")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn remove_webhook(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = endpoint_id(&id)?;
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    if !crate::webhooks::remove(&mut client, id, &by).await? {
        return Err(no_endpoint());
    }
    Ok(HttpResponse::NoContent().finish())
}

fn endpoint_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| no_endpoint())
}

fn no_endpoint() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// `?limit=` of an endpoint's deliveries.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// How many, newest first: 1 to 1000 (50 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// `GET /admin/webhooks/{id}/deliveries`: an endpoint's latest deliveries,
/// newest first, with their state, attempts and last error.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The endpoint's id"), DeliveriesQuery),
    responses(
        (status = 200, description = "Its deliveries", body = Vec<crate::webhooks::Delivery>),
        (status = 400, description = "A limit out of 1..=1000 (`invalid_limit`)", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/webhooks/{id}/deliveries")]
pub async fn webhook_deliveries(
    state: web::Data<AppState>,
    _admin: AdminUser,
    id: web::Path<String>,
    query: web::Query<DeliveriesQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = endpoint_id(&id)?;
    let limit = query.into_inner().limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be from 1 to 1000"));
    }
    let client = state.pool.get().await?;
    let list = crate::webhooks::deliveries(&**client, id, limit)
        .await?
        .ok_or_else(no_endpoint)?;
    Ok(HttpResponse::Ok().json(list))
}

/// What `POST /admin/webhooks/{id}/retry` did.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Retried {
    /// Dead deliveries made due again.
    retried: u64,
}

/// `POST /admin/webhooks/{id}/retry`: make the endpoint's dead deliveries
/// due again with a fresh count of attempts (audited).
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "How many are due again", body = Retried),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such endpoint", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/webhooks/{id}/retry")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn retry_webhook(
    state: web::Data<AppState>,
    request: actix_web::HttpRequest,
    admin: AdminUser,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = endpoint_id(&id)?;
    let by = changed_by(&state, &request, &admin);
    let mut client = state.pool.get().await?;
    let retried = crate::webhooks::retry(&mut client, Some(id), &by)
        .await?
        .ok_or_else(no_endpoint)?;
    Ok(HttpResponse::Ok().json(Retried { retried }))
}

/// Filters of `GET /admin/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries of this action.
    #[param(inline)]
    action: Option<Action>,
    /// Entries whose actor or subject is this user (looked up by name and
    /// turned into its pseudonym; entries of erased users stay findable
    /// by pseudonym only).
    user: Option<String>,
    /// A pseudonym (`u_…`, `n_…`), as actor or subject.
    pseudonym: Option<String>,
    /// RFC 3339 time, inclusive.
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// RFC 3339 time, inclusive.
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Items per page, 1 to 200 (50 when absent).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]*$")]
    cursor: Option<String>,
}

/// One audit entry as `GET /admin/audit` shows it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AuditItem {
    pub seq: i64,
    /// Hex of the entry's chain hash.
    pub hash: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// What `GET /admin/audit/verify` found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChainVerdict {
    /// Every entry's hash recomputed from its content and the one before,
    /// the head row and every anchor agree.
    pub intact: bool,
    /// Entries verified (when intact).
    pub entries: Option<i64>,
    /// Anchors from `TENANTRY_AUDIT_ANCHOR_FILE` that matched (when intact).
    pub anchors: Option<usize>,
    /// The first entry that does not check out (when broken).
    pub broken_at: Option<i64>,
    /// Why (when broken).
    pub reason: Option<String>,
}

/// `GET /admin/audit/verify` (admins and auditors): the whole chain
/// recomputed and compared with its head and the anchor file, as `tenantry
/// audit verify` does. 200 with the verdict, intact or not.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The verdict", body = ChainVerdict),
        (status = 403, description = "Neither admin nor auditor", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/audit/verify")]
#[tracing::instrument(skip_all, fields(reader = %reader.0.id()))]
pub async fn verify_audit(
    state: web::Data<AppState>,
    reader: AuditReader,
) -> Result<HttpResponse, ApiError> {
    let path = state.audit_anchor_file.clone();
    let installation = state.installation.id.as_str().to_owned();
    let anchors = web::block(move || audit::read_anchors(&path, &installation))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::Internal(e.into()))?;
    let client = state.pool.get().await?;
    let verdict = audit::verify(&**client, &anchors)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(HttpResponse::Ok().json(match verdict {
        audit::Verdict::Intact { entries, anchors } => ChainVerdict {
            intact: true,
            entries: Some(entries),
            anchors: Some(anchors),
            broken_at: None,
            reason: None,
        },
        audit::Verdict::Broken { seq, reason } => ChainVerdict {
            intact: false,
            entries: None,
            anchors: None,
            broken_at: Some(seq),
            reason: Some(reason),
        },
    }))
}

/// `GET /admin/audit` (admins and auditors): newest first, filtered, a page
/// at a time.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of entries, newest first", body = Page<AuditItem>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Neither admin nor auditor", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "`user` names nobody", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/audit")]
#[tracing::instrument(skip_all, fields(reader = %reader.0.id()))]
pub async fn audit_log(
    state: web::Data<AppState>,
    reader: AuditReader,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let action = q.action.map(Action::as_str);
    let paging = crate::api::paging::ListQuery {
        q: None,
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = paging.limit()?;
    let before: Option<i64> = paging
        .cursor("a", 1)?
        .map(|parts| cursor_part(&parts[0]))
        .transpose()?;
    let client = state.pool.get().await?;
    let mut who = q.pseudonym.clone();
    if let Some(name) = &q.user {
        let username = Username::parse(name)?;
        let id: Option<uuid::Uuid> = client
            .query_opt(
                "SELECT id FROM tenantry.users WHERE username = $1",
                &[&username.as_str()],
            )
            .await?
            .map(|r| r.get(0));
        let Some(id) = id else {
            return Err(ApiError::NotFound("no such user".into()));
        };
        who = Some(state.pseudonyms.user(id));
    }
    let since = q.since.map(audit::timestamp);
    let until = q.until.map(audit::timestamp);
    let rows = client
        .query(
            "SELECT seq, hash, entry FROM tenantry.audit_log
             WHERE ($1::text IS NULL OR action = $1)
               AND ($2::text IS NULL OR actor = $2 OR subject = $2)
               AND ($3::text IS NULL OR at >= $3)
               AND ($4::text IS NULL OR at <= $4)
               AND ($5::int8 IS NULL OR seq < $5)
             ORDER BY seq DESC LIMIT $6",
            &[&action, &who, &since, &until, &before, &(limit + 1)],
        )
        .await?;
    let items = rows
        .iter()
        .map(|row| {
            let entry: String = row.get("entry");
            Ok(AuditItem {
                seq: row.get("seq"),
                hash: hex::encode(row.get::<_, Vec<u8>>("hash")),
                entry: serde_json::from_str(&entry).map_err(ApiError::internal)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let page = Page::from_rows(items, limit, |i| make_cursor("a", &[i.seq.to_string()]));
    Ok(HttpResponse::Ok().json(page))
}

fn not_citus() -> ApiError {
    ApiError::Conflict {
        code: "not_citus",
        message: "this database is not a Citus coordinator".into(),
    }
}

/// `GET /admin/cluster`: a Citus cluster's nodes with the tenants and bytes
/// each holds; 409 on plain PostgreSQL.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The nodes, coordinator first", body = Vec<crate::db::citus::NodeStatus>),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Not a Citus coordinator", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/cluster")]
pub async fn cluster(
    state: web::Data<AppState>,
    _admin: AdminUser,
) -> Result<HttpResponse, ApiError> {
    if !state.installation.citus {
        return Err(not_citus());
    }
    let client = state.pool.get().await?;
    Ok(HttpResponse::Ok().json(crate::db::citus::cluster_status(&client).await?))
}

/// Where to move a tenant.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// A worker, as `HOST:PORT` (see `GET /admin/cluster`).
    #[schema(example = "10.0.0.12:5432")]
    node: String,
}

/// A tenant's placement after a move.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Moved {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// `online` (logical replication) or `blocking_writes` (this tenant's only).
    pub mode: &'static str,
    pub seconds: f64,
}

/// `POST /admin/tenants/{name}/move` `{node}`: move a tenant's tables to
/// another worker (online with `wal_level = logical`, else blocking that
/// tenant's writes while it is copied); 200 when done.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's username")),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "Moved (or there already)", body = Moved),
        (status = 400, description = "`node` is not a worker of this cluster", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such tenant", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Not a Citus coordinator, or the tenant is being erased", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/tenants/{name}/move")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn move_tenant(
    state: web::Data<AppState>,
    admin: AdminUser,
    name: web::Path<String>,
    body: JsonBody<MoveRequest>,
) -> Result<HttpResponse, ApiError> {
    use crate::db::citus::{parse_node, MoveError, MovePlan};
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    if !state.installation.citus {
        return Err(not_citus());
    }
    let invalid_node = || ApiError::BadRequest {
        code: "invalid_node",
        message: "node must be HOST:PORT of a worker of this cluster".into(),
    };
    let to = parse_node(&body.into_inner().node).ok_or_else(invalid_node)?;
    let client = state.pool.get().await?;
    let found = crate::tenants::find(&**client, &username)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such tenant".into()))?;
    let started = std::time::Instant::now();
    let plan = MovePlan::new(&client, &found, to)
        .await
        .map_err(|e| match e {
            MoveError::NotAWorker(..) => invalid_node(),
            MoveError::NotPlaced(_) => ApiError::NotFound("the tenant has no tables placed".into()),
            MoveError::Postgres(e) => e.into(),
            other @ MoveError::NotActive(..) => ApiError::internal(other),
        })?;
    plan.execute(&client).await.map_err(|e| match e {
        MoveError::Postgres(e) => ApiError::from(e),
        MoveError::NotActive(..) => ApiError::Conflict {
            code: "tenant_not_active",
            message: e.to_string(),
        },
        other => ApiError::internal(other),
    })?;
    if let Some(direct) = state.pool.direct() {
        // The tenant's requests follow it now, not at the next refresh.
        direct.refresh_soon();
    }
    Ok(HttpResponse::Ok().json(Moved {
        tenant: username.as_str().to_owned(),
        from: format!("{}:{}", plan.from.0, plan.from.1),
        to: format!("{}:{}", plan.to.0, plan.to.1),
        mode: if plan.online {
            "online"
        } else {
            "blocking_writes"
        },
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// A rebalance request's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RebalanceStarted {
    /// Citus's background job; null when the tenants are balanced already.
    pub job_id: Option<i64>,
    /// `started`, or `balanced` (nothing to move).
    pub state: &'static str,
}

/// `POST /admin/cluster/rebalance`: even out the tenants over the workers.
/// Citus moves whole tenants in the background: 202 with the job (follow it
/// at `Location`), or 200 when nothing needs moving.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Started", body = RebalanceStarted,
         headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "Balanced already", body = RebalanceStarted),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Not a Citus coordinator, or a rebalance is running", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/admin/cluster/rebalance")]
#[tracing::instrument(skip_all, fields(admin = %admin.0.id()))]
pub async fn rebalance(
    state: web::Data<AppState>,
    admin: AdminUser,
) -> Result<HttpResponse, ApiError> {
    if !state.installation.citus {
        return Err(not_citus());
    }
    let client = state.pool.get().await?;
    let started = crate::db::citus::rebalance_start(&client)
        .await
        .map_err(|e| match e.as_db_error() {
            // Citus refuses a second rebalance while one runs.
            Some(db) if db.message().contains("already") => ApiError::Conflict {
                code: "rebalance_running",
                message: db.message().to_owned(),
            },
            _ => e.into(),
        })?;
    Ok(match started {
        Some(job) => HttpResponse::Accepted()
            .insert_header(("Location", format!("/admin/cluster/rebalance/{job}")))
            .json(RebalanceStarted {
                job_id: Some(job),
                state: "started",
            }),
        None => HttpResponse::Ok().json(RebalanceStarted {
            job_id: None,
            state: "balanced",
        }),
    })
}

/// `GET /admin/cluster/rebalance/{job_id}`: a rebalance's progress.
#[utoipa::path(
    tag = "admin",
    security(("bearer" = [])),
    params(("job_id" = i64, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Its state and moves", body = crate::db::citus::RebalanceProgress),
        (status = 403, description = "Not an admin", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such rebalance job", body = crate::api::openapi::ErrorBody),
        (status = 409, description = "Not a Citus coordinator", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/admin/cluster/rebalance/{job_id}")]
pub async fn rebalance_job(
    state: web::Data<AppState>,
    _admin: AdminUser,
    job: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    if !state.installation.citus {
        return Err(not_citus());
    }
    let client = state.pool.get().await?;
    let progress = crate::db::citus::rebalance_progress(&client, job.into_inner())
        .await?
        .ok_or_else(|| ApiError::NotFound("no such rebalance job".into()))?;
    Ok(HttpResponse::Ok().json(progress))
}
