//! Admin routes: the tenant registry, the audit log (admins and auditors),
//! and the fleet: its status, starting a migration run (which goes on in
//! the background, past the request) and following a run.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api::extract::{AdminUser, AuditReader};
use crate::api::paging::{cursor_part, invalid, make_cursor, Page};
use crate::api::ApiError;
use crate::audit::{self, Action, Entry};
use crate::domain::{TemplateVersion, Username};
use crate::startup::AppState;
use crate::tenancy::fleet::{self, Progress, RunOptions};

/// `GET /admin/fleet`: tenants per version, pending, failed, drift, last run.
pub async fn fleet_status(
    state: web::Data<AppState>,
    _admin: AdminUser,
) -> Result<HttpResponse, ApiError> {
    let client = state.pool.get().await?;
    let status = fleet::fleet_status(&client, &state.installation, &state.templates).await?;
    Ok(HttpResponse::Ok().json(status))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    target_version: Option<i64>,
    concurrency: Option<usize>,
    canary: Option<usize>,
    max_failures: Option<usize>,
    tenant: Option<String>,
}

/// Nobody watches a background run's progress in-process: its results are
/// in the control plane, where `GET /admin/fleet/migrations/{id}` reads them.
struct Unwatched;
impl Progress for Unwatched {}

/// `POST /admin/fleet/migrations`: take the run lock, plan and record the
/// run, answer 202 with its id, and run it in the background. 409 while
/// another run (from any process) holds the lock.
#[tracing::instrument(skip_all, fields(admin = %admin.0.claims.username))]
pub async fn start_migration(
    state: web::Data<AppState>,
    admin: AdminUser,
    body: web::Json<StartRun>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
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
    let prepared = fleet::prepare(&state.db_config, state.templates.clone(), options).await?;
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
        .json(json!({
            "run_id": run_id,
            "target_version": target,
            "planned": planned,
        })))
}

/// `GET /admin/fleet/migrations/{run_id}`: a run's status, progress and
/// failed tenants (live while it runs).
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

/// `?status=&version=&limit=&cursor=` of `GET /admin/tenants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsQuery {
    status: Option<String>,
    version: Option<i32>,
    limit: Option<i64>,
    cursor: Option<String>,
}

const TENANT_STATUSES: [&str; 4] = ["active", "migrating", "failed", "deleting"];

/// `GET /admin/tenants`: the registry by username, a page at a time,
/// optionally only one status and/or template version.
pub async fn tenants(
    state: web::Data<AppState>,
    _admin: AdminUser,
    query: web::Query<TenantsQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    if let Some(status) = &q.status {
        if !TENANT_STATUSES.contains(&status.as_str()) {
            return Err(invalid(
                "status",
                "must be one of active, migrating, failed, deleting",
            ));
        }
    }
    if q.version.is_some_and(|v| v < 1) {
        return Err(invalid("version", "must be at least 1"));
    }
    let paging = crate::api::paging::ListQuery {
        q: None,
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = paging.limit()?;
    let after: Option<String> = paging
        .cursor("t", 1)?
        .map(|parts| cursor_part(&parts[0]))
        .transpose()?;
    let client = state.pool.get().await?;
    let items = crate::tenants::page(
        &**client,
        q.status.as_deref(),
        q.version,
        after.as_deref(),
        limit + 1,
    )
    .await?;
    let page = Page::from_rows(items, limit, |t| {
        make_cursor("t", std::slice::from_ref(&t.username))
    });
    Ok(HttpResponse::Ok().json(page))
}

/// `GET /admin/tenants/{name}`: one tenant, 404 if there is none.
pub async fn tenant(
    state: web::Data<AppState>,
    _admin: AdminUser,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let username =
        Username::parse(&name).map_err(|_| ApiError::NotFound("no such tenant".into()))?;
    let client = state.pool.get().await?;
    let tenant = crate::tenants::find(&**client, &username)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such tenant".into()))?;
    Ok(HttpResponse::Ok().json(tenant))
}

/// `DELETE /admin/tenants/{name}`: erase a tenant (GDPR art. 17) → 200
/// with the receipt; 404 if there is none, 409 while it is busy.
#[tracing::instrument(skip_all, fields(admin = %admin.0.claims.username))]
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
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(receipt))
}

/// Filters of `GET /admin/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// One action name (`login_failed`, …).
    action: Option<String>,
    /// Entries whose actor or subject is this user (looked up by name and
    /// turned into its pseudonym; entries of erased users stay findable
    /// by pseudonym only).
    user: Option<String>,
    /// A pseudonym (`u_…`, `n_…`), as actor or subject.
    pseudonym: Option<String>,
    /// RFC 3339 times, inclusive.
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// One audit entry as `GET /admin/audit` shows it.
#[derive(Debug, serde::Serialize)]
pub struct AuditItem {
    pub seq: i64,
    /// Hex of the entry's chain hash.
    pub hash: String,
    #[serde(flatten)]
    pub entry: Entry,
}

/// `GET /admin/audit` (admins and auditors): newest first, filtered, a page
/// at a time.
#[tracing::instrument(skip_all, fields(reader = %reader.0.claims.username))]
pub async fn audit_log(
    state: web::Data<AppState>,
    reader: AuditReader,
    query: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let action = q
        .action
        .as_deref()
        .map(|a| Action::parse(a).ok_or_else(|| invalid("action", "is not an audited action")))
        .transpose()?
        .map(Action::as_str);
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
