//! What the fleet looks like: tenants per version, what is pending or
//! failed, the runs and their per-tenant results. Read-only, a few queries
//! whatever the fleet's size.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, Row};

use super::{check, RunStatus, RUN_LOCK};
use crate::db::Installation;
use crate::tenancy::integrity;
use crate::tenancy::templates::TemplateSet;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionCount {
    pub version: i32,
    pub tenants: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FleetStatus {
    /// The latest template version: what new signups get and runs aim at.
    pub target_version: i32,
    pub tenants: i64,
    pub versions: Vec<VersionCount>,
    /// Tenants behind the target.
    pub pending: i64,
    /// Tenants behind the target whose latest attempt failed.
    pub failed: i64,
    /// Registry/catalog disagreements (`fleet check` lists them).
    pub drift: usize,
    /// Why `serve` and `fleet migrate` would refuse these templates, if they would.
    pub template_problem: Option<String>,
    pub active_run: Option<i64>,
    pub last_run: Option<RunReport>,
}

/// A run as recorded, with its progress and its failures.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunReport {
    pub run_id: i64,
    pub status: RunStatus,
    pub reason: Option<String>,
    pub started_by: String,
    pub target_version: i32,
    pub concurrency: i32,
    pub canary: i32,
    pub max_failures: Option<i32>,
    pub only_tenant: Option<String>,
    pub planned: i32,
    pub succeeded: i64,
    pub failed: i64,
    pub skipped: i64,
    /// Tenants done so far (all three outcomes).
    pub done: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub failures: Vec<FailedTenant>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FailedTenant {
    pub username: String,
    pub from_version: i32,
    pub to_version: i32,
    pub error: Option<String>,
    pub finished_at: DateTime<Utc>,
}

/// The fleet's state for `fleet status` and `GET /admin/fleet`.
pub async fn fleet_status(
    client: &Client,
    installation: &Installation,
    templates: &TemplateSet,
) -> Result<FleetStatus, tokio_postgres::Error> {
    let target = templates.latest().get();
    let template_problem = match integrity::verify(client, templates).await {
        Ok(()) => None,
        Err(integrity::IntegrityError::Postgres(e)) => return Err(e),
        Err(problem) => Some(problem.to_string()),
    };
    let versions: Vec<VersionCount> = client
        .query(
            "SELECT template_version, count(*) FROM tenantry.tenants
             GROUP BY template_version ORDER BY template_version",
            &[],
        )
        .await?
        .iter()
        .map(|r| VersionCount {
            version: r.get(0),
            tenants: r.get(1),
        })
        .collect();
    let tenants = versions.iter().map(|v| v.tenants).sum();
    let pending = versions
        .iter()
        .filter(|v| v.version < target)
        .map(|v| v.tenants)
        .sum();
    let failed: i64 = client
        .query_one(
            // A success moves the registry row (updated_at); a failure
            // after the tenant's last move is its latest attempt.
            "SELECT count(*) FROM tenantry.tenants t
             WHERE t.template_version < $1
               AND EXISTS (SELECT 1 FROM tenantry.fleet_results r
                           WHERE r.user_id = t.user_id AND r.status = 'failed'
                             AND r.finished_at >= t.updated_at)",
            &[&target],
        )
        .await?
        .get(0);
    let drift = check::catalog_drift(client, installation).await?.len();
    let last_id: Option<i64> = client
        .query_opt(
            "SELECT id FROM tenantry.fleet_runs ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let last_run = match last_id {
        Some(id) => run_report(client, id).await?,
        None => None,
    };
    let active_run = last_run
        .as_ref()
        .filter(|r| r.status == RunStatus::Running)
        .map(|r| r.run_id);
    Ok(FleetStatus {
        target_version: target,
        tenants,
        versions,
        pending,
        failed,
        drift,
        template_problem,
        active_run,
        last_run,
    })
}

/// One run, with counts (live while it runs) and its failed tenants.
pub async fn run_report(
    client: &Client,
    run_id: i64,
) -> Result<Option<RunReport>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT r.*,
                    (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'succeeded') AS n_succeeded,
                    (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'failed') AS n_failed,
                    (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'skipped') AS n_skipped,
                    EXISTS (SELECT 1 FROM pg_locks l
                            WHERE l.locktype = 'advisory' AND l.granted
                              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                              AND l.classid::int8 = $2 AND l.objid::int8 = $3 AND l.objsubid = 2) AS lock_held
             FROM tenantry.fleet_runs r WHERE r.id = $1",
            &[&run_id, &(RUN_LOCK.0 as i64), &(RUN_LOCK.1 as i64)],
        )
        .await?
    else {
        return Ok(None);
    };
    let failures = client
        .query(
            "SELECT username, from_version, to_version, error, finished_at
             FROM tenantry.fleet_results WHERE run_id = $1 AND status = 'failed'
             ORDER BY finished_at LIMIT 1000",
            &[&run_id],
        )
        .await?
        .iter()
        .map(|r| FailedTenant {
            username: r.get("username"),
            from_version: r.get("from_version"),
            to_version: r.get("to_version"),
            error: r.get("error"),
            finished_at: r.get("finished_at"),
        })
        .collect();
    Ok(Some(report_from_row(&row, failures)))
}

fn report_from_row(row: &Row, failures: Vec<FailedTenant>) -> RunReport {
    let mut status = RunStatus::parse(row.get("status"));
    let mut reason: Option<String> = row.get("reason");
    // A run marked running whose lock nobody holds died with its runner.
    if status == RunStatus::Running && !row.get::<_, bool>("lock_held") {
        status = RunStatus::Interrupted;
        reason.get_or_insert_with(|| "the runner stopped before it finished".into());
    }
    let (succeeded, failed, skipped): (i64, i64, i64) = (
        row.get("n_succeeded"),
        row.get("n_failed"),
        row.get("n_skipped"),
    );
    RunReport {
        run_id: row.get("id"),
        status,
        reason,
        started_by: row.get("started_by"),
        target_version: row.get("target_version"),
        concurrency: row.get("concurrency"),
        canary: row.get("canary"),
        max_failures: row.get("max_failures"),
        only_tenant: row.get("only_tenant"),
        planned: row.get("planned"),
        succeeded,
        failed,
        skipped,
        done: succeeded + failed + skipped,
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
        failures,
    }
}
