//! `GET /metrics`: Prometheus text (see `crate::metrics` for the names).
//! With `TENANTRY_METRICS_TOKEN` set it wants `Authorization: Bearer
//! <token>` (401 otherwise); without, it answers loopback clients only (403
//! for others).

use actix_web::{get, web, HttpRequest, HttpResponse};

use crate::api::error::error_body;
use crate::api::AppState;

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    tag = "health",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text", content_type = "text/plain", body = String),
        (status = 401, description = "`TENANTRY_METRICS_TOKEN` is set and was not presented", body = crate::api::openapi::ErrorBody),
        (status = 403, description = "No token is configured and the client is not on loopback", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    match &state.metrics_token {
        Some(token) => {
            let presented = crate::api::middleware::bearer_token(&request);
            let ok = presented.is_some_and(|p| {
                use sha2::Digest;
                // Compare digests: equal length, no early exit on content.
                sha2::Sha256::digest(p.as_bytes())
                    == sha2::Sha256::digest(token.expose().as_bytes())
            });
            if !ok {
                return HttpResponse::Unauthorized()
                    .insert_header(("WWW-Authenticate", "Bearer"))
                    .json(error_body(
                        "unauthorized",
                        "/metrics wants its bearer token",
                    ));
            }
        }
        None => {
            if !request.peer_addr().is_some_and(|a| a.ip().is_loopback()) {
                return HttpResponse::Forbidden().json(error_body(
                    "forbidden",
                    "/metrics answers loopback clients only (set TENANTRY_METRICS_TOKEN to allow others)",
                ));
            }
        }
    }
    record_gauges(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::metrics::handle().render())
}

/// What is read at scrape time: the pool now, and the registry and the
/// latest fleet run from the database (skipped when it does not answer).
async fn record_gauges(state: &AppState) {
    let pool = crate::api::health::pool_status(&state.pool);
    for (name, value) in [
        ("max", pool.max_size),
        ("open", pool.size),
        ("idle", pool.available),
        ("in_use", pool.size.saturating_sub(pool.available)),
    ] {
        ::metrics::gauge!("tenantry_pool_connections", "state" => name).set(value as f64);
    }
    ::metrics::gauge!("tenantry_pool_waiting").set(pool.waiting as f64);
    ::metrics::gauge!("tenantry_router_roles").set(state.pool.routers() as f64);

    let latest = state.templates.get().latest().get();
    let read = async {
        let client = state.pool.get().await.ok()?;
        let versions = client
            .query(
                "SELECT template_version, count(*) FROM tenantry.tenants GROUP BY 1",
                &[],
            )
            .await
            .ok()?;
        let run = client
            .query_opt(
                "SELECT r.id, r.status, r.planned,
                        (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'succeeded'),
                        (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'failed'),
                        (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'skipped')
                 FROM tenantry.fleet_runs r ORDER BY r.id DESC LIMIT 1",
                &[],
            )
            .await
            .ok()?;
        let outbox = client
            .query_one(
                "SELECT count(*) FILTER (WHERE dead_at IS NULL), count(*) FILTER (WHERE dead_at IS NOT NULL),
                        (SELECT count(*) FROM tenantry.spare_roles),
                        (SELECT count(template_version) FROM tenantry.spare_roles)
                 FROM tenantry.outbox WHERE delivered_at IS NULL",
                &[],
            )
            .await
            .ok()?;
        let usage = crate::tenancy::usage::distribution(&**client).await.ok()?;
        let hooks = crate::webhooks::backlog(&**client).await.ok()?;
        Some((versions, run, outbox, usage, hooks))
    };
    let Ok(Some((versions, run, outbox, usage, hooks))) =
        tokio::time::timeout(std::time::Duration::from_secs(2), read).await
    else {
        return;
    };
    let mut pending = 0i64;
    for row in versions {
        let version: i32 = row.get(0);
        let count: i64 = row.get(1);
        if version < latest {
            pending += count;
        }
        ::metrics::gauge!("tenantry_tenants", "template_version" => version.to_string())
            .set(count as f64);
    }
    ::metrics::gauge!("tenantry_tenants_pending_migration").set(pending as f64);
    for (state_name, column) in [("pending", 0), ("dead", 1)] {
        ::metrics::gauge!("tenantry_outbox_mails", "state" => state_name)
            .set(outbox.get::<_, i64>(column) as f64);
    }
    ::metrics::gauge!("tenantry_spare_roles").set(outbox.get::<_, i64>(2) as f64);
    ::metrics::gauge!("tenantry_spare_schemas").set(outbox.get::<_, i64>(3) as f64);
    let bounds = crate::tenancy::usage::USAGE_BUCKETS
        .iter()
        .map(i64::to_string);
    for (le, count) in bounds.chain(std::iter::once("+Inf".to_string())).zip(
        usage
            .at_or_under
            .iter()
            .chain(std::iter::once(&usage.measured)),
    ) {
        ::metrics::gauge!("tenantry_tenants_by_usage_bytes", "le" => le).set(*count as f64);
    }
    ::metrics::gauge!("tenantry_tenants_usage_bytes_sum").set(usage.bytes as f64);
    ::metrics::gauge!("tenantry_tenants_over_quota").set(usage.over_quota as f64);
    ::metrics::gauge!("tenantry_webhook_deliveries", "state" => "pending").set(hooks.0 as f64);
    ::metrics::gauge!("tenantry_webhook_deliveries", "state" => "dead").set(hooks.1 as f64);
    if let Some(run) = run {
        let id: i64 = run.get(0);
        let status: String = run.get(1);
        let planned = i64::from(run.get::<_, i32>(2));
        let (ok, failed, skipped): (i64, i64, i64) = (run.get(3), run.get(4), run.get(5));
        let run_label = id.to_string();
        for (state_name, value) in [
            ("planned", planned),
            ("succeeded", ok),
            ("failed", failed),
            ("skipped", skipped),
            ("pending", (planned - ok - failed - skipped).max(0)),
        ] {
            ::metrics::gauge!("tenantry_fleet_run_tenants", "run" => run_label.clone(), "state" => state_name)
                .set(value as f64);
        }
        ::metrics::gauge!("tenantry_fleet_run_running").set(if status == "running" {
            1.0
        } else {
            0.0
        });
    }
}
