//! Admin routes for the fleet: its status, starting a migration run (which
//! goes on in the background, past the request) and following a run.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api::extract::AdminUser;
use crate::api::ApiError;
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
#[tracing::instrument(skip_all, fields(admin = %admin.0.username))]
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
        started_by: format!("admin:{}", admin.0.username),
        ..defaults
    };
    let prepared = fleet::prepare(&state.db_config, state.templates.clone(), options).await?;
    let run_id = prepared.run_id();
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
