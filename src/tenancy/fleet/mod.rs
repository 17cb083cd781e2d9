//! Fleet migrations: bring every tenant behind the target template version
//! up to it, one transaction per tenant, on dedicated connections.
//!
//! The run model:
//! - one run at a time per database: the runner holds a session-level
//!   advisory lock (`RUN_LOCK`) on its control connection for the whole run,
//!   so a crash frees it with the connection; a `fleet_runs` row still
//!   'running' whose lock is free was interrupted;
//! - the plan is ONE indexed query over the registry (tenants behind the
//!   target), so a run with nothing to do costs one query;
//! - each worker connection is the run's alone, so its `lock_timeout` and
//!   `statement_timeout` are set once for the session, when it connects;
//! - each tenant is one transaction, sent as one pipeline: `BEGIN`,
//!   `tenantry.fleet_claim` (a transaction-scoped advisory lock on the
//!   tenant, and a check that it is still at the planned version), the
//!   pending templates as the tenant's role with their history rows, the
//!   registry update and the result row, `COMMIT`. Killed or disconnected at
//!   any instant, a tenant is wholly at its old version or wholly at the new
//!   one, and the next run picks up exactly the tenants still behind;
//! - canaries first, then the rest with bounded concurrency; failures are
//!   recorded and the run goes on until `max_failures`.

mod check;
mod run;
mod status;

pub use check::{find_drift, repair_drift, Drift, DriftKind, DriftReport};
pub use run::{
    plan_only, prepare, prepare_with, Plan, PlannedTenant, PreparedRun, Progress, RunSummary,
    Source, TenantResult,
};
pub use status::{fleet_status, run_report, FleetStatus, RunReport};

use std::time::Duration;

use crate::domain::{TemplateVersion, Username};
use crate::tenancy::integrity::IntegrityError;

/// The session-level advisory lock a run holds (two-key form: the class is
/// 'flt', the second key unused). Advisory locks are per database.
pub const RUN_LOCK: (i32, i32) = (0x666c74, 0);

pub use crate::db::TENANT_LOCK_CLASS;

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The version to reach; the latest template when `None`.
    pub target: Option<TemplateVersion>,
    pub concurrency: usize,
    /// How many tenants go first, alone; any failure among them stops the run.
    pub canary: usize,
    /// Stop starting tenants after this many failures.
    pub max_failures: Option<usize>,
    /// Migrate this tenant only.
    pub only_tenant: Option<Username>,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// Who started the run, for the record (`cli:<os user>`, `admin:<name>`).
    pub started_by: String,
    /// Who started it, for the audit log: a user pseudonym; `cli` when
    /// `None`.
    pub audit_actor: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            target: None,
            concurrency: 4,
            canary: 1,
            max_failures: None,
            only_tenant: None,
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
            started_by: "unknown".into(),
            audit_actor: None,
        }
    }
}

/// Largest `--concurrency`: each worker holds a connection of its own.
pub const MAX_CONCURRENCY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    #[error("another fleet migration is running ({0}); wait for it to finish")]
    AlreadyRunning(String),
    #[error("there is no template V{target}: the latest is V{latest}")]
    UnknownTarget { target: i32, latest: i32 },
    #[error(
        "{count} tenant(s) are already at a version after V{target} (up to V{highest}): \
         templates only go forward; to undo a change, write a new version that reverses it"
    )]
    Backwards {
        target: i32,
        count: i64,
        highest: i32,
    },
    #[error("no tenant named {0}")]
    NoSuchTenant(String),
    #[error("concurrency must be between 1 and {MAX_CONCURRENCY}")]
    BadConcurrency,
    /// The published templates cannot be used (see `tenancy::publication`).
    #[error("{0}")]
    Published(String),
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl From<crate::tenancy::publication::Problem> for FleetError {
    fn from(p: crate::tenancy::publication::Problem) -> Self {
        match p {
            crate::tenancy::publication::Problem::Integrity(e) => FleetError::Integrity(e),
            other => FleetError::Published(other.to_string()),
        }
    }
}

impl FleetError {
    /// Errors of the request (bad options, a busy fleet) rather than of the
    /// system.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            FleetError::UnknownTarget { .. }
                | FleetError::Backwards { .. }
                | FleetError::NoSuchTenant(_)
                | FleetError::BadConcurrency
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    /// Every planned tenant is at the target (or was moved there by someone else).
    Succeeded,
    /// Finished with failures below the limit.
    Failed,
    /// Stopped early: a canary failed or `max_failures` was reached.
    Aborted,
    /// The runner died or was stopped before it finished.
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Aborted => "aborted",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "aborted" => RunStatus::Aborted,
            _ => RunStatus::Interrupted,
        }
    }
}

/// One tenant's outcome in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Not at the planned version any more (moved on by someone else, or gone).
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// `5s` for a PostgreSQL setting.
fn pg_interval(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}
