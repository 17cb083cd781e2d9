//! `GET /health` (readiness, with reasons) and `GET /health/live`.

use std::time::Duration;

use actix_web::{get, web, HttpResponse};
use serde::Serialize;

use crate::startup::AppState;

/// The pool, as deadpool sees it now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

pub fn pool_status(pool: &crate::db::RequestPool) -> PoolStatus {
    let s = pool.status();
    PoolStatus {
        max_size: s.max_size,
        size: s.size,
        available: s.available,
        waiting: s.waiting,
    }
}

/// Readiness, with the reasons when not `healthy`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthReport {
    /// `healthy`, `degraded` or `unhealthy`.
    #[schema(example = "healthy")]
    pub status: &'static str,
    /// Why the service is not `healthy`; empty when it is.
    pub reasons: Vec<String>,
    /// `up`, `busy` (every pooled connection in use) or `unreachable`.
    pub database: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    /// The latest template version (what signups get).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_version: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants_pending_migration: Option<i64>,
    /// How the last fleet run ended (`succeeded`, `failed`, …), if any ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fleet_run: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,
    /// Present when `unhealthy` (the error shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::api::openapi::ErrorDetail>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Liveness {
    #[schema(example = "alive")]
    pub status: &'static str,
}

/// What the database says about the fleet, in one query.
const FLEET_FACTS: &str = "\
SELECT (SELECT count(*) FROM tenantry.tenants WHERE template_version < $1) AS pending,
       (SELECT count(*) FROM tenantry.tenants WHERE status = 'deleting') AS deleting,
       (SELECT status FROM tenantry.fleet_runs ORDER BY id DESC LIMIT 1) AS last_run";

/// `healthy` (200), `degraded` (200, with the reasons: the pool is
/// saturated, tenants are behind the latest template version, the last
/// fleet run failed or was cut short, an erasure did not finish) or
/// `unhealthy` (503 with `Retry-After`: the database does not answer
/// within 3 s).
#[utoipa::path(
    tag = "health",
    responses(
        (status = 200, description = "Healthy or degraded", body = HealthReport),
        (status = 503, description = "Unhealthy: the database does not answer", body = HealthReport,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
#[get("/health")]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let latest = state.templates.latest().get();
    let before = pool_status(&state.pool);
    let saturated = before.size >= before.max_size && before.available == 0;
    let check = async {
        if saturated {
            // Every pooled connection is busy: ask on a connection of our
            // own rather than queue behind the requests.
            let client = crate::db::connect(&state.db_config).await.ok()?;
            client.query_one(FLEET_FACTS, &[&latest]).await.ok()
        } else {
            let client = state.pool.get().await.ok()?;
            client.query_one(FLEET_FACTS, &[&latest]).await.ok()
        }
    };
    let facts = match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Some(facts)) => facts,
        // Busy connections mean the database was answering a moment ago.
        _ if saturated => {
            return HttpResponse::Ok().json(HealthReport {
                status: "degraded",
                reasons: vec![format!(
                    "the connection pool is saturated ({} requests waiting for {} connections)",
                    before.waiting, before.max_size
                )],
                database: "busy",
                version: Some(env!("CARGO_PKG_VERSION")),
                template_version: Some(latest),
                tenants_pending_migration: None,
                last_fleet_run: None,
                pool: Some(before),
                error: None,
            });
        }
        _ => {
            return HttpResponse::ServiceUnavailable()
                .insert_header(("Retry-After", "5"))
                .json(HealthReport {
                    status: "unhealthy",
                    reasons: vec!["the database does not answer".into()],
                    database: "unreachable",
                    version: None,
                    template_version: None,
                    tenants_pending_migration: None,
                    last_fleet_run: None,
                    pool: None,
                    error: Some(crate::api::openapi::ErrorDetail {
                        code: "unavailable".into(),
                        message: "the database is unreachable".into(),
                    }),
                });
        }
    };
    let pool = before;
    let pending: i64 = facts.get("pending");
    let deleting: i64 = facts.get("deleting");
    let last_run: Option<String> = facts.get("last_run");
    let mut reasons = Vec::new();
    if pool.available == 0 && pool.waiting > 0 {
        reasons.push(format!(
            "the connection pool is saturated ({} requests waiting for {} connections)",
            pool.waiting, pool.max_size
        ));
    }
    if pending > 0 {
        reasons.push(format!(
            "{pending} tenant(s) behind template version {latest}: run `tenantry fleet migrate`"
        ));
    }
    if let Some(run) = last_run
        .as_deref()
        .filter(|s| *s != "succeeded" && *s != "running")
    {
        reasons.push(format!("the last fleet run ended {run}"));
    }
    if deleting > 0 {
        reasons.push(format!(
            "{deleting} erasure(s) did not finish: run `tenantry tenants delete NAME --yes` again"
        ));
    }
    HttpResponse::Ok().json(HealthReport {
        status: if reasons.is_empty() {
            "healthy"
        } else {
            "degraded"
        },
        reasons,
        database: "up",
        version: Some(env!("CARGO_PKG_VERSION")),
        template_version: Some(latest),
        tenants_pending_migration: Some(pending),
        last_fleet_run: Some(last_run),
        pool: Some(pool),
        error: None,
    })
}

/// `GET /health/live`: the process serves requests (no database work).
#[utoipa::path(tag = "health", responses((status = 200, description = "Alive", body = Liveness)))]
#[get("/health/live")]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(Liveness { status: "alive" })
}
