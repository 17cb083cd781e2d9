//! `GET /health` (readiness, with reasons) and `GET /health/live`.

use std::time::{Duration, Instant};

use actix_web::{get, web, HttpResponse};
use serde::Serialize;

use crate::api::AppState;

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
    /// PostgreSQL's connections as the service can use them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionStatus>,
    /// Exports running, and how many may.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exports: Option<ExportStatus>,
    /// Present when `unhealthy` (the error shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::api::openapi::ErrorDetail>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Liveness {
    #[schema(example = "alive")]
    pub status: &'static str,
}

/// What the database says about the fleet and its connections, in one
/// query. Connections count against the server's slots (less those kept for
/// superusers) and the service role's own `CONNECTION LIMIT`, if any.
const FACTS: &str = "\
SELECT (SELECT count(*) FROM tenantry.tenants WHERE template_version < $1) AS pending,
       (SELECT count(*) FROM tenantry.tenants WHERE status = 'deleting') AS deleting,
       (SELECT status FROM tenantry.fleet_runs ORDER BY id DESC LIMIT 1) AS last_run,
       (SELECT count(*) FROM pg_catalog.pg_stat_activity
        WHERE backend_type = 'client backend'
           -- another role's session: its type is hidden from us, its role is not
           OR (backend_type IS NULL AND usesysid IS NOT NULL))::int8 AS connections,
       (current_setting('max_connections')::int8
        - current_setting('superuser_reserved_connections')::int8
        - coalesce(current_setting('reserved_connections', true)::int8, 0)) AS connection_slots,
       (SELECT rolconnlimit FROM pg_catalog.pg_roles WHERE rolname = current_user)::int8 AS role_limit,
       (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE usename = current_user)::int8
           AS role_connections";

/// One reading of [`FACTS`].
#[derive(Debug, Clone)]
struct Facts {
    pending: i64,
    deleting: i64,
    last_run: Option<String>,
    connections: ConnectionStatus,
    /// Why this process cannot provision at the newest published version.
    templates: Option<String>,
    /// The version signups get (this process's published set, read again
    /// by the probe when a newer one was published).
    latest: i32,
}

/// PostgreSQL's connections as the service can use them: the tighter of the
/// server's slots and the service role's limit.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConnectionStatus {
    pub in_use: i64,
    pub limit: i64,
}

impl ConnectionStatus {
    /// Fewer than a tenth of the slots (and at least two) left.
    fn short(&self) -> bool {
        self.limit - self.in_use < (self.limit / 10).max(2)
    }
}

impl Facts {
    fn from_row(row: &tokio_postgres::Row, latest: i32) -> Facts {
        let server = ConnectionStatus {
            in_use: row.get("connections"),
            limit: row.get("connection_slots"),
        };
        let role_limit: i64 = row.get("role_limit");
        let role = ConnectionStatus {
            in_use: row.get("role_connections"),
            limit: role_limit,
        };
        let tighter = if role_limit >= 0 && role.limit - role.in_use < server.limit - server.in_use
        {
            role
        } else {
            server
        };
        Facts {
            pending: row.get("pending"),
            deleting: row.get("deleting"),
            last_run: row.get("last_run"),
            connections: tighter,
            templates: None,
            latest,
        }
    }
}

/// `/health` asks the database once at a time: calls that arrive while a
/// probe runs share its answer. When every pooled connection is busy it
/// asks on one spare connection of its own, kept for that, rather than
/// queue behind the requests or open a session per call.
#[derive(Default)]
pub struct HealthProbe(tokio::sync::Mutex<ProbeState>);

#[derive(Default)]
struct ProbeState {
    spare: Option<crate::db::Connection>,
    /// When the last probe finished, and what it found (`None`: no answer).
    last: Option<(Instant, Option<Facts>)>,
}

/// Where `/health` asks: the pool, or (every pooled connection busy) its
/// spare connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AskOn {
    Pool,
    Spare,
}

impl HealthProbe {
    async fn facts(&self, state: &AppState, on: AskOn) -> Option<Facts> {
        let arrived = Instant::now();
        let mut probe = self.0.lock().await;
        if let Some((at, facts)) = &probe.last {
            if *at >= arrived {
                return facts.clone();
            }
        }
        let asked = tokio::time::timeout(Duration::from_secs(3), probe.ask(state, on));
        let facts = asked.await.ok().flatten();
        probe.last = Some((Instant::now(), facts.clone()));
        facts
    }
}

impl ProbeState {
    async fn ask(&mut self, state: &AppState, on: AskOn) -> Option<Facts> {
        if on == AskOn::Pool {
            let client = state.pool.get().await.ok()?;
            let problem = template_problem(&client, state).await;
            let latest = state.templates.get().latest().get();
            let mut facts = client
                .query_one(FACTS, &[&latest])
                .await
                .ok()
                .map(|r| Facts::from_row(&r, latest))?;
            facts.templates = problem;
            return Some(facts);
        }
        if self.spare.as_ref().is_none_or(|c| c.is_closed()) {
            // The closed one gives its place under the cap back first.
            self.spare = None;
            self.spare = state
                .connector
                .connect(crate::db::Dedicated::Health)
                .await
                .ok();
        }
        let spare = self.spare.as_ref()?;
        let problem = template_problem(spare, state).await;
        let latest = state.templates.get().latest().get();
        let answer = spare.query_one(FACTS, &[&latest]).await;
        let Ok(row) = answer else {
            self.spare = None;
            return None;
        };
        let mut facts = Facts::from_row(&row, latest);
        facts.templates = problem;
        Some(facts)
    }
}

/// Why this process cannot provision at the newest published template
/// version (one it could not read, tenants ahead of the published set), as
/// the fleet's own check words it, with how to fix it. Reads the published
/// set again first when a version was published since.
async fn template_problem(client: &tokio_postgres::Client, state: &AppState) -> Option<String> {
    use crate::tenancy::integrity::{self, IntegrityError};
    if let Err(e) = state.templates.refresh(client).await {
        return Some(format!("the published templates cannot be read: {e}"));
    }
    match integrity::verify(client, &state.templates.get()).await {
        Ok(()) => None,
        Err(IntegrityError::Postgres(e)) => Some(format!(
            "this process's templates could not be checked against the database: {e}"
        )),
        Err(problem) => Some(format!("this process's templates are refused: {problem}")),
    }
}

/// The export budget, as `/health` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExportStatus {
    pub running: usize,
    pub max: usize,
}

/// How long `/health` waits for each Citus worker (direct routing).
const NODE_PROBE: Duration = Duration::from_secs(1);

/// `healthy` (200), `degraded` (200, with the reasons: the pool is
/// saturated, PostgreSQL's connections run short, every export place is
/// taken, tenants are behind the latest template version, the last fleet
/// run failed or was cut short, an erasure did not finish, a Citus worker
/// does not answer within 1 s, asked at most every 5 s) or `unhealthy`
/// (503 with `Retry-After`: the database does not answer within 3 s).
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
    let before = pool_status(&state.pool);
    let saturated = before.size >= before.max_size && before.available == 0;
    let exports = ExportStatus {
        running: state.exports.running(),
        max: state.exports.size(),
    };
    let on = if saturated { AskOn::Spare } else { AskOn::Pool };
    let facts = match state.health.facts(&state, on).await {
        Some(facts) => facts,
        // Busy connections mean the database was answering a moment ago.
        None if saturated => {
            return HttpResponse::Ok().json(HealthReport {
                status: "degraded",
                reasons: vec![format!(
                    "the connection pool is saturated ({} requests waiting for {} connections)",
                    before.waiting, before.max_size
                )],
                database: "busy",
                version: Some(env!("CARGO_PKG_VERSION")),
                template_version: Some(state.templates.get().latest().get()),
                tenants_pending_migration: None,
                last_fleet_run: None,
                pool: Some(before),
                connections: None,
                exports: Some(exports),
                error: None,
            });
        }
        None => {
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
                    connections: None,
                    exports: None,
                    error: Some(crate::api::openapi::ErrorDetail {
                        code: "unavailable".into(),
                        message: "the database is unreachable".into(),
                    }),
                });
        }
    };
    let pool = before;
    let latest = facts.latest;
    let mut reasons = reasons(&facts, &pool, &exports, latest);
    if let Some(direct) = state.pool.direct() {
        for (host, port) in direct.unreachable(NODE_PROBE).await {
            reasons.push(format!(
                "the worker {host}:{port} does not answer: requests for its tenants get 503 node_unavailable"
            ));
        }
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
        tenants_pending_migration: Some(facts.pending),
        last_fleet_run: Some(facts.last_run),
        pool: Some(pool),
        connections: Some(facts.connections),
        exports: Some(exports),
        error: None,
    })
}

/// Why the service is not `healthy`.
fn reasons(facts: &Facts, pool: &PoolStatus, exports: &ExportStatus, latest: i32) -> Vec<String> {
    let mut reasons = Vec::new();
    if pool.available == 0 && pool.waiting > 0 {
        reasons.push(format!(
            "the connection pool is saturated ({} requests waiting for {} connections)",
            pool.waiting, pool.max_size
        ));
    }
    if facts.connections.short() {
        reasons.push(format!(
            "PostgreSQL connections are running short ({} of {} in use)",
            facts.connections.in_use, facts.connections.limit
        ));
    }
    if exports.running >= exports.max {
        reasons.push(format!(
            "every export place is taken ({} of {}): further exports get 503",
            exports.running, exports.max
        ));
    }
    if facts.pending > 0 {
        reasons.push(format!(
            "{} tenant(s) behind template version {latest}: run `tenantry fleet migrate`",
            facts.pending
        ));
    }
    if let Some(run) = facts
        .last_run
        .as_deref()
        .filter(|s| *s != "succeeded" && *s != "running")
    {
        reasons.push(format!("the last fleet run ended {run}"));
    }
    if let Some(problem) = &facts.templates {
        reasons.push(problem.clone());
    }
    if facts.deleting > 0 {
        reasons.push(format!(
            "{} erasure(s) did not finish: run `tenantry tenants delete NAME --yes` again",
            facts.deleting
        ));
    }
    reasons
}

/// `GET /health/live`: the process serves requests (no database work).
#[utoipa::path(tag = "health", responses((status = 200, description = "Alive", body = Liveness)))]
#[get("/health/live")]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(Liveness { status: "alive" })
}
