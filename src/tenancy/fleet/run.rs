//! Planning and running one fleet migration. See the module docs of `fleet`
//! for the run model.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};
use uuid::Uuid;

use super::{pg_interval, FleetError, Outcome, RunOptions, RunStatus, MAX_CONCURRENCY, RUN_LOCK};
use crate::audit::{self, Action, Entry};
use crate::db;
use crate::domain::{RoleName, SchemaName, TemplateVersion};
use crate::tenancy::apply::{ApplyStep, Request, TemplateApplication};
use crate::tenancy::integrity;
use crate::tenancy::publication;
use crate::tenancy::templates::TemplateSet;

/// A tenant the plan will migrate.
#[derive(Debug, Clone)]
pub struct PlannedTenant {
    pub user_id: Uuid,
    pub username: String,
    pub schema: SchemaName,
    pub role: RoleName,
    pub from_version: i32,
}

/// The tenants behind the target, in the order they will be migrated
/// (by username; the first `canary` of them go first).
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: TemplateVersion,
    pub tenants: Vec<PlannedTenant>,
}

impl Plan {
    /// The template files a tenant of the plan will get.
    pub fn files_for(&self, templates: &TemplateSet, tenant: &PlannedTenant) -> Vec<String> {
        templates
            .between(tenant.from_version, self.target)
            .iter()
            .map(|t| t.file_name())
            .collect()
    }
}

/// One tenant's result, as reported to `Progress` and in the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TenantResult {
    #[serde(skip)]
    pub user_id: Uuid,
    pub username: String,
    pub from_version: i32,
    pub to_version: i32,
    pub outcome: Outcome,
    pub error: Option<String>,
    #[serde(skip)]
    pub duration: Duration,
}

/// Told about a run as it goes (a progress bar, progress lines).
pub trait Progress: Send + Sync {
    fn start(&self, _run_id: i64, _planned: usize) {}
    fn tenant(&self, _result: &TenantResult) {}
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_id: i64,
    pub target_version: i32,
    pub status: RunStatus,
    pub reason: Option<String>,
    pub planned: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Planned but never started (the run stopped early).
    pub not_started: usize,
    #[serde(skip)]
    pub elapsed: Duration,
    pub failures: Vec<TenantResult>,
}

/// Plan a run without taking the run lock or changing anything: for
/// `--dry-run`. The template set is checked as a real run would check it.
pub async fn plan_only(
    client: &Client,
    templates: &TemplateSet,
    options: &RunOptions,
) -> Result<Plan, FleetError> {
    integrity::verify(client, templates).await?;
    plan(client, templates, options).await
}

/// A run that holds the run lock, has a recorded id and a plan, and is
/// ready to execute (in the foreground for the CLI, in a background task for
/// `POST /admin/fleet/migrations`).
pub struct PreparedRun {
    control: db::Connection,
    connector: db::Connector,
    templates: Arc<TemplateSet>,
    options: RunOptions,
    plan: Plan,
    run_id: i64,
    stop: Arc<AtomicBool>,
    /// A Citus coordinator: history is written after the templates.
    citus: bool,
    /// The versions this run published (`Source::Publishing`), as files.
    published: Vec<String>,
}

/// Take the run lock, check the template set against the published one, make the plan and
/// record the run. Refused (nothing changed) while another run holds the
/// lock, for a bad target, or for templates that disagree with the database.
pub async fn prepare(
    connector: &db::Connector,
    templates: Arc<TemplateSet>,
    options: RunOptions,
) -> Result<PreparedRun, FleetError> {
    prepare_with(connector, Source::Published(templates), options).await
}

/// Where a run's templates come from.
pub enum Source<'a> {
    /// The published set, as the caller read it.
    Published(Arc<TemplateSet>),
    /// `fleet migrate`: publish what these proposals add, up to the run's
    /// target, once the run lock is held (a refused run publishes nothing),
    /// then run with the published set.
    Publishing {
        installation: &'a db::Installation,
        proposals: &'a publication::Proposals,
    },
}

/// [`prepare`], from either source.
pub async fn prepare_with(
    connector: &db::Connector,
    source: Source<'_>,
    options: RunOptions,
) -> Result<PreparedRun, FleetError> {
    if !(1..=MAX_CONCURRENCY).contains(&options.concurrency) {
        return Err(FleetError::BadConcurrency);
    }
    let control = connector.connect(db::Dedicated::Fleet).await?;
    let locked: bool = control
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&RUN_LOCK.0, &RUN_LOCK.1],
        )
        .await?
        .get(0);
    if !locked {
        let holder = control
            .query_opt(
                "SELECT id, started_by, started_at FROM tenantry.fleet_runs
                 WHERE status = 'running' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await?;
        let who = match holder {
            Some(row) => format!(
                "run {} started by {} at {}",
                row.get::<_, i64>("id"),
                row.get::<_, String>("started_by"),
                row.get::<_, chrono::DateTime<chrono::Utc>>("started_at")
                    .format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => "a run is starting".into(),
        };
        return Err(FleetError::AlreadyRunning(who));
    }
    // From here the lock is ours until `control` is dropped.
    let (templates, published) = match source {
        Source::Published(templates) => (templates, Vec::new()),
        Source::Publishing {
            installation,
            proposals,
        } => {
            // What would refuse the run refuses it before anything is
            // published (the target is checked below).
            if let Some(name) = &options.only_tenant {
                let known = control
                    .query_opt(
                        "SELECT 1 FROM tenantry.tenants WHERE username = $1",
                        &[&name.as_str()],
                    )
                    .await?;
                if known.is_none() {
                    return Err(FleetError::NoSuchTenant(name.to_string()));
                }
            }
            let scratch = connector.connect(db::Dedicated::Command).await?;
            let publication = match options.target {
                // Beyond the proposals: refused before anything is
                // published, unless it is published already.
                Some(target) if target > proposals.set.latest() => {
                    let published: Option<i32> = control
                        .query_one("SELECT max(version) FROM tenantry.templates", &[])
                        .await?
                        .get(0);
                    let latest = published.unwrap_or(0).max(proposals.set.latest().get());
                    if target.get() > latest {
                        return Err(FleetError::UnknownTarget {
                            target: target.get(),
                            latest,
                        });
                    }
                    Default::default()
                }
                Some(target) => {
                    let up_to = publication::Proposals {
                        set: proposals.set.up_to(target),
                        explicit: proposals.explicit,
                        by: proposals.by.clone(),
                    };
                    publication::publish(&control, &scratch, installation, &up_to).await?
                }
                None => publication::publish(&control, &scratch, installation, proposals).await?,
            };
            if let Some(diverged) = &publication.diverged {
                tracing::warn!("the built-in templates were not published: {diverged}");
            }
            let set = publication::load(&*control).await?.set().clone();
            (set, publication.published)
        }
    };
    integrity::verify(&*control, &templates).await?;
    let citus: bool = control
        .query_one("SELECT mode = 'citus' FROM tenantry.installation", &[])
        .await?
        .get(0);
    let plan = plan(&control, &templates, &options).await?;
    // Tenants only ever go to a published version (`fleet migrate`
    // publishes first; `tenancy::publication`).
    let newest: Option<i32> = control
        .query_one("SELECT max(version) FROM tenantry.templates", &[])
        .await?
        .get(0);
    if newest.is_none_or(|n| n < plan.target.get()) {
        return Err(FleetError::Published(format!(
            "template V{} is not published: `tenantry templates publish` publishes it (`tenantry fleet migrate` does too)",
            plan.target
        )));
    }
    // We hold the lock, so a run still marked running is a dead one.
    control
        .execute(
            "UPDATE tenantry.fleet_runs r SET status = 'interrupted',
                 reason = coalesce(r.reason, 'the runner stopped before it finished'),
                 finished_at = now(),
                 succeeded = (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'succeeded'),
                 failed = (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'failed'),
                 skipped = (SELECT count(*) FROM tenantry.fleet_results x WHERE x.run_id = r.id AND x.status = 'skipped')
             WHERE r.status = 'running'",
            &[],
        )
        .await?;
    let planned = i32::try_from(plan.tenants.len()).unwrap_or(i32::MAX);
    let max_failures = options
        .max_failures
        .map(|f| i32::try_from(f).unwrap_or(i32::MAX));
    // The run's record and its audit entry, in one transaction.
    control.batch_execute("BEGIN").await?;
    let recorded = async {
        let run_id: i64 = control
            .query_one(
                "INSERT INTO tenantry.fleet_runs
                     (started_by, target_version, concurrency, canary, max_failures, only_tenant, planned)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                &[
                    &options.started_by,
                    &plan.target.get(),
                    &(options.concurrency as i32),
                    &i32::try_from(options.canary).unwrap_or(i32::MAX),
                    &max_failures,
                    &options.only_tenant.as_ref().map(|u| u.as_str()),
                    &planned,
                ],
            )
            .await?
            .get(0);
        audit::append(
            &*control,
            &Entry::new(Action::FleetRunStarted)
                .actor(options.audit_actor.clone().unwrap_or_else(|| "cli".into()))
                .detail("run", run_id)
                .detail("target_version", plan.target.get())
                .detail("planned", planned),
        )
        .await?;
        control.batch_execute("COMMIT").await?;
        Ok::<i64, tokio_postgres::Error>(run_id)
    }
    .await;
    let run_id = match recorded {
        Ok(id) => id,
        Err(e) => {
            let _ = control.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    };
    Ok(PreparedRun {
        control,
        connector: connector.clone(),
        templates,
        options,
        plan,
        run_id,
        stop: Arc::new(AtomicBool::new(false)),
        citus,
        published,
    })
}

/// The registry query behind every plan: the tenants not at the target, in
/// one indexed query (a run with nothing to do costs just this).
async fn plan(
    client: &Client,
    templates: &TemplateSet,
    options: &RunOptions,
) -> Result<Plan, FleetError> {
    let latest = templates.latest();
    let target = options.target.unwrap_or(latest);
    if target > latest {
        return Err(FleetError::UnknownTarget {
            target: target.get(),
            latest: latest.get(),
        });
    }
    let rows = match &options.only_tenant {
        Some(name) => {
            let rows = client
                .query(
                    "SELECT user_id, username, schema_name, role_name, template_version
                     FROM tenantry.tenants WHERE username = $1",
                    &[&name.as_str()],
                )
                .await?;
            if rows.is_empty() {
                return Err(FleetError::NoSuchTenant(name.to_string()));
            }
            rows
        }
        None => {
            client
                .query(
                    "SELECT user_id, username, schema_name, role_name, template_version
                     FROM tenantry.tenants
                     WHERE template_version < $1 OR template_version > $1
                     ORDER BY username",
                    &[&target.get()],
                )
                .await?
        }
    };
    let ahead: Vec<i32> = rows
        .iter()
        .map(|r| r.get::<_, i32>("template_version"))
        .filter(|v| *v > target.get())
        .collect();
    if let Some(highest) = ahead.iter().max() {
        return Err(FleetError::Backwards {
            target: target.get(),
            count: ahead.len() as i64,
            highest: *highest,
        });
    }
    let tenants = rows
        .iter()
        .filter(|r| r.get::<_, i32>("template_version") < target.get())
        .map(planned_tenant)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan { target, tenants })
}

fn planned_tenant(row: &Row) -> Result<PlannedTenant, FleetError> {
    let username: String = row.get("username");
    let corrupt = |what: &str| {
        FleetError::Db(db::DbError::Corrupt(format!(
            "tenant {username} has an invalid {what} in the registry"
        )))
    };
    Ok(PlannedTenant {
        user_id: row.get("user_id"),
        schema: SchemaName::parse(row.get("schema_name")).map_err(|_| corrupt("schema name"))?,
        role: RoleName::parse(row.get("role_name")).map_err(|_| corrupt("role name"))?,
        from_version: row.get("template_version"),
        username,
    })
}

impl PreparedRun {
    /// The versions this run published before it started, as files.
    pub fn published(&self) -> &[String] {
        &self.published
    }

    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Set to stop the run at the next tenant boundary (Ctrl-C, shutdown).
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Migrate the plan: canaries one by one, then the rest on
    /// `concurrency` dedicated connections. Records every result and the
    /// run's end, then releases the run lock.
    #[tracing::instrument(skip_all, fields(run = self.run_id))]
    pub async fn execute(self, progress: &dyn Progress) -> Result<RunSummary, FleetError> {
        let started = Instant::now();
        let tenants = &self.plan.tenants;
        progress.start(self.run_id, tenants.len());
        let lock_timeout = pg_interval(self.options.lock_timeout);
        // Every worker connection is the run's alone, so the per-tenant
        // settings are set once per connection rather than in every tenant's
        // transaction: the timeouts (durations we formatted), and commits
        // that do not wait for their WAL flush. The latter is safe here, and
        // only here: a tenant's migration is atomic and re-runnable, with
        // its registry row and result in the same transaction, so a server
        // crash can only roll back the last few tenants as a whole (old
        // schema, old registry row, no result), and the next run redoes
        // exactly them. The run's end is committed synchronously (on the
        // control connection), which flushes every tenant's commit before
        // it: a run recorded as finished is durable.
        let session = format!(
            "SET lock_timeout = '{lock_timeout}'; SET statement_timeout = '{}'; \
             SET synchronous_commit = off",
            pg_interval(self.options.statement_timeout)
        );
        let ctx = TenantContext {
            run_id: self.run_id,
            citus: self.citus,
            target: self.plan.target,
            templates: &self.templates,
            lock_timeout,
        };
        let tally = Tally::new(self.options.max_failures, self.stop.clone());
        let workers = self.options.concurrency.min(tenants.len()).max(1);
        let mut connections: Vec<Worker> = (0..workers).map(|_| Worker::new(&session)).collect();

        let canaries = self.options.canary.min(tenants.len());
        let (first, rest) = tenants.split_at(canaries);
        run_batch(
            &mut connections[..1],
            first,
            &ctx,
            &self.connector,
            &tally,
            progress,
        )
        .await;
        if tally.failed() > 0 {
            tally.abort(format!(
                "a canary failed ({}): the other {} tenant(s) were not touched",
                tally.first_failure().unwrap_or_default(),
                rest.len()
            ));
        }
        if !tally.stopped() {
            run_batch(
                &mut connections,
                rest,
                &ctx,
                &self.connector,
                &tally,
                progress,
            )
            .await;
        }
        drop(connections);
        self.finish(tally, started).await
    }

    async fn finish(self, tally: Tally, started: Instant) -> Result<RunSummary, FleetError> {
        let state = tally.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let (status, reason) = match (state.abort_reason, self.stop.load(Ordering::SeqCst)) {
            (Some(reason), _) => (RunStatus::Aborted, Some(reason)),
            (None, true) => (
                RunStatus::Interrupted,
                Some(
                    state
                        .stop_reason
                        .unwrap_or_else(|| "stopped on request".into()),
                ),
            ),
            (None, false) if state.failed > 0 => (RunStatus::Failed, None),
            (None, false) => (RunStatus::Succeeded, None),
        };
        let done = state.succeeded + state.failed + state.skipped;
        let summary = RunSummary {
            run_id: self.run_id,
            target_version: self.plan.target.get(),
            status,
            reason,
            planned: self.plan.tenants.len(),
            succeeded: state.succeeded,
            failed: state.failed,
            skipped: state.skipped,
            not_started: self.plan.tenants.len().saturating_sub(done),
            elapsed: started.elapsed(),
            failures: state.failures,
        };
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        // Each success's result row was written in its tenant's transaction;
        // its duration is only known now.
        let (ids, ms): (Vec<Uuid>, Vec<f64>) = state.durations.into_iter().unzip();
        self.control
            .execute(
                "UPDATE tenantry.fleet_results r SET duration_ms = d.ms
                 FROM unnest($2::uuid[], $3::float8[]) AS d(id, ms)
                 WHERE r.run_id = $1 AND r.user_id = d.id",
                &[&self.run_id, &ids, &ms],
            )
            .await?;
        let finished = Entry::new(Action::FleetRunFinished)
            .actor(
                self.options
                    .audit_actor
                    .clone()
                    .unwrap_or_else(|| "cli".into()),
            )
            .detail("run", self.run_id)
            .detail("status", status.as_str())
            .detail("succeeded", summary.succeeded)
            .detail("failed", summary.failed)
            .detail("skipped", summary.skipped);
        let recorded = async {
            self.control.batch_execute("BEGIN").await?;
            self.control
                .execute(
                    "UPDATE tenantry.fleet_runs SET status = $2, reason = $3, succeeded = $4,
                         failed = $5, skipped = $6, finished_at = now()
                     WHERE id = $1",
                    &[
                        &self.run_id,
                        &status.as_str(),
                        &summary.reason,
                        &count(summary.succeeded),
                        &count(summary.failed),
                        &count(summary.skipped),
                    ],
                )
                .await?;
            audit::append(&*self.control, &finished).await?;
            let event = crate::webhooks::Event::new(
                crate::webhooks::EventType::FleetRunFinished,
                None,
                serde_json::json!({
                    "run_id": self.run_id,
                    "status": status.as_str(),
                    "target_version": self.plan.target.get(),
                    "succeeded": summary.succeeded,
                    "failed": summary.failed,
                    "skipped": summary.skipped,
                }),
            );
            crate::webhooks::record(&*self.control, &event).await?;
            self.control.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = recorded {
            let _ = self.control.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        self.control
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&RUN_LOCK.0, &RUN_LOCK.1],
            )
            .await?;
        tracing::info!(
            status = status.as_str(),
            succeeded = summary.succeeded,
            failed = summary.failed,
            skipped = summary.skipped,
            "fleet run finished"
        );
        Ok(summary)
    }
}

/// What every tenant's transaction needs.
struct TenantContext<'a> {
    run_id: i64,
    /// On Citus a transaction may not touch a tenant's shards as two roles
    /// in turn: the history is written after the templates (as the service,
    /// after `RESET ROLE`) rather than by the claim before them.
    citus: bool,
    target: TemplateVersion,
    templates: &'a TemplateSet,
    lock_timeout: String,
}

/// Counts, failures and the reasons to stop, shared by the workers.
struct Tally {
    max_failures: Option<usize>,
    stop: Arc<AtomicBool>,
    state: Mutex<TallyState>,
}

#[derive(Default)]
struct TallyState {
    /// Who succeeded and how long it took (written to the results at the end).
    durations: Vec<(Uuid, f64)>,
    succeeded: usize,
    failed: usize,
    skipped: usize,
    failures: Vec<TenantResult>,
    abort_reason: Option<String>,
    stop_reason: Option<String>,
}

impl Tally {
    fn new(max_failures: Option<usize>, stop: Arc<AtomicBool>) -> Tally {
        Tally {
            max_failures,
            stop,
            state: Mutex::new(TallyState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TallyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, result: &TenantResult) {
        let mut s = self.lock();
        match result.outcome {
            Outcome::Succeeded => {
                s.succeeded += 1;
                s.durations
                    .push((result.user_id, result.duration.as_secs_f64() * 1000.0));
            }
            Outcome::Skipped => s.skipped += 1,
            Outcome::Failed => {
                s.failed += 1;
                s.failures.push(result.clone());
                if self.max_failures.is_some_and(|max| s.failed >= max) && s.abort_reason.is_none()
                {
                    s.abort_reason = Some(format!(
                        "stopped after {} failure(s) (--max-failures)",
                        s.failed
                    ));
                }
            }
        }
    }

    fn failed(&self) -> usize {
        self.lock().failed
    }

    fn first_failure(&self) -> Option<String> {
        self.lock()
            .failures
            .first()
            .map(|f| format!("{}: {}", f.username, f.error.as_deref().unwrap_or("")))
    }

    fn abort(&self, reason: String) {
        self.lock().abort_reason.get_or_insert(reason);
    }

    fn interrupt(&self, reason: String) {
        self.lock().stop_reason.get_or_insert(reason);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.lock().abort_reason.is_some()
    }
}

/// A worker's dedicated connection (not from the request pool), opened on
/// first use and again after it is lost, with the run's session settings
/// (`setup`, see `execute`) and the statements every tenant's transaction
/// runs prepared once.
struct Worker {
    setup: String,
    connection: Option<Connection>,
}

struct Connection {
    client: db::Connection,
    claim: Statement,
}

impl Worker {
    fn new(setup: &str) -> Worker {
        Worker {
            setup: setup.to_owned(),
            connection: None,
        }
    }

    async fn connection(&mut self, connector: &db::Connector) -> Result<&Connection, db::DbError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.client.is_closed())
        {
            // The closed one gives its place under the cap back first.
            self.connection = None;
            let client = connector.connect(db::Dedicated::Fleet).await?;
            client.batch_execute(&self.setup).await?;
            let claim = client
                .prepare_typed(
                    CLAIM,
                    &[
                        Type::UUID,
                        Type::INT4,
                        Type::INT4,
                        Type::INT8,
                        Type::TEXT,
                        Type::INT4_ARRAY,
                        Type::TEXT_ARRAY,
                        Type::TEXT_ARRAY,
                    ],
                )
                .await?;
            self.connection = Some(Connection { client, claim });
        }
        Ok(self.connection.as_ref().expect("just connected"))
    }

    async fn client(&mut self, connector: &db::Connector) -> Result<&Client, db::DbError> {
        Ok(&*self.connection(connector).await?.client)
    }
}

/// Migrate `tenants` with one worker per connection in `workers`, each
/// taking the next tenant until none is left or the run stops.
async fn run_batch(
    workers: &mut [Worker],
    tenants: &[PlannedTenant],
    ctx: &TenantContext<'_>,
    connector: &db::Connector,
    tally: &Tally,
    progress: &dyn Progress,
) {
    let next = AtomicUsize::new(0);
    let work = workers.iter_mut().map(|worker| {
        let next = &next;
        async move {
            while !tally.stopped() {
                let Some(tenant) = tenants.get(next.fetch_add(1, Ordering::SeqCst)) else {
                    break;
                };
                match migrate_tenant(worker, tenant, ctx, connector).await {
                    Ok(result) => {
                        tally.record(&result);
                        progress.tenant(&result);
                    }
                    Err(lost) => {
                        tally.interrupt(format!("lost the database: {lost}"));
                    }
                }
            }
        }
    });
    futures::future::join_all(work).await;
}

/// Migrate one tenant and record its result. `Err` only when the database
/// cannot be reached at all (the run stops).
#[tracing::instrument(skip_all, fields(user = %tenant.user_id))]
async fn migrate_tenant(
    worker: &mut Worker,
    tenant: &PlannedTenant,
    ctx: &TenantContext<'_>,
    connector: &db::Connector,
) -> Result<TenantResult, db::DbError> {
    let started = Instant::now();
    let connection = worker.connection(connector).await?;
    let attempt = one_transaction(connection, tenant, ctx).await;
    let (outcome, error) = match attempt {
        Ok(()) => (Outcome::Succeeded, None),
        Err(Failure::Skipped(why)) => (Outcome::Skipped, Some(why)),
        Err(Failure::Failed(why)) => (Outcome::Failed, Some(why)),
        Err(Failure::Lost(e)) => {
            // Whether the COMMIT made it is unknown: the registry knows (the
            // registry row moves in the tenant's own transaction).
            let client = worker.client(connector).await?;
            let now: Option<i32> = client
                .query_opt(
                    "SELECT template_version FROM tenantry.tenants WHERE user_id = $1",
                    &[&tenant.user_id],
                )
                .await?
                .map(|r| r.get(0));
            if now == Some(ctx.target.get()) {
                (Outcome::Succeeded, None)
            } else {
                (
                    Outcome::Failed,
                    Some(format!("the connection was lost mid-migration: {e}")),
                )
            }
        }
    };
    let result = TenantResult {
        user_id: tenant.user_id,
        username: tenant.username.clone(),
        from_version: tenant.from_version,
        to_version: ctx.target.get(),
        outcome,
        error,
        duration: started.elapsed(),
    };
    if outcome != Outcome::Succeeded {
        let client = worker.client(connector).await?;
        record_result(client, ctx.run_id, tenant, &result).await?;
        tracing::warn!(
            outcome = outcome.as_str(),
            error = result.error.as_deref().unwrap_or(""),
            "tenant not migrated"
        );
    }
    Ok(result)
}

/// Why a tenant's transaction did not commit.
enum Failure {
    Skipped(String),
    Failed(String),
    Lost(tokio_postgres::Error),
}

/// Lock the tenant, check its version, write its history, registry row and
/// result: see `tenantry.fleet_claim` in system_migrations/ (the latest
/// migration that replaces the function holds its current body).
const CLAIM: &str = "SELECT tenantry.fleet_claim($1, $2, $3, $4, $5, $6, $7, $8)";

#[derive(Clone, Copy)]
enum Step<'t> {
    Begin,
    Claim,
    Apply(ApplyStep<'t>),
    Commit,
}

/// The tenant's one transaction, as one pipeline (one round trip) of three
/// messages for one pending version: `BEGIN`, the claim
/// (lock, check, history, registry, result), and the template with
/// `RESET ROLE; COMMIT` at its end. A failing request aborts the
/// transaction, every later one fails with it, and a `ROLLBACK` (one more
/// round trip, on failure only) ends it.
async fn one_transaction(
    connection: &Connection,
    tenant: &PlannedTenant,
    ctx: &TenantContext<'_>,
) -> Result<(), Failure> {
    let client = &connection.client;
    let pending = ctx.templates.between(tenant.from_version, ctx.target);
    let application = if ctx.citus {
        TemplateApplication::for_citus(&tenant.schema, &tenant.role, pending)
    } else {
        TemplateApplication::new(&tenant.schema, &tenant.role, pending).end_with("COMMIT")
    };
    let target = ctx.target.get();
    let [schema, mut versions, mut names, mut checksums] =
        application.history_params().map(|(p, _)| p);
    let (no_versions, no_text): (Vec<i32>, Vec<String>) = (Vec::new(), Vec::new());
    if ctx.citus {
        (versions, names, checksums) = (&no_versions, &no_text, &no_text);
    }
    let claim_params: [&(dyn ToSql + Sync); 8] = [
        &tenant.user_id,
        &tenant.from_version,
        &target,
        &ctx.run_id,
        schema,
        versions,
        names,
        checksums,
    ];

    // In the tenant's transaction: rolled back with it if a template fails.
    let migrated = crate::webhooks::Event::tenant(
        crate::webhooks::EventType::TenantMigrated,
        tenant.user_id,
        &tenant.username,
        serde_json::json!({
            "from_version": tenant.from_version,
            "to_version": target,
            "run_id": ctx.run_id,
        }),
    );
    let event_params = migrated.params();
    let mut steps: Vec<Step> = vec![Step::Begin, Step::Claim, Step::Claim];
    let mut requests: Vec<Request<'_>> = vec![
        Box::pin(client.batch_execute("BEGIN")),
        Box::pin(async {
            client
                .execute(&connection.claim, &claim_params)
                .await
                .map(drop)
        }),
        Box::pin(async {
            client
                .execute_typed(crate::webhooks::RECORD, &event_params)
                .await
                .map(drop)
        }),
    ];
    for (step, request) in application.requests(client) {
        steps.push(Step::Apply(step));
        requests.push(request);
    }
    if ctx.citus {
        let (step, request) = application.history_request(client);
        steps.push(Step::Apply(step));
        requests.push(request);
        steps.push(Step::Commit);
        requests.push(Box::pin(client.batch_execute("COMMIT")));
    }

    let replies = db::pipeline(requests).await;
    let Some((step, error)) = steps
        .into_iter()
        .zip(replies)
        .find_map(|(step, reply)| reply.err().map(|e| (step, e)))
    else {
        return Ok(());
    };
    // The connection is gone (a network error, the backend terminated):
    // whether the COMMIT made it is for the registry to say.
    if error.is_closed() || client.is_closed() {
        return Err(Failure::Lost(error));
    }
    // The failing batch never reached its COMMIT: end the aborted
    // transaction, so the connection is clean for the next tenant.
    if let Err(e) = client.batch_execute("ROLLBACK").await {
        return Err(Failure::Lost(e));
    }
    let code = error.code().map(SqlState::code);
    Err(match (step, code) {
        (Step::Claim, Some("TY001" | "TY002")) => Failure::Skipped(db_message(&error)),
        (Step::Claim, Some(c)) if c == SqlState::LOCK_NOT_AVAILABLE.code() => {
            Failure::Failed(format!(
                "the tenant is busy: its lock was not free within {} ({})",
                ctx.lock_timeout,
                db_message(&error)
            ))
        }
        (Step::Apply(ApplyStep::Template(t)), _) => {
            Failure::Failed(format!("{}: {}", t.file_name(), db_message(&error)))
        }
        _ => Failure::Failed(db_message(&error)),
    })
}

/// The server's message, DETAIL, HINT and SQLSTATE, or the client's error:
/// the DETAIL names the offending row (a duplicate key, say), which is what
/// an admin needs to fix it.
fn db_message(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let mut message = db.message().to_owned();
    if let Some(detail) = db.detail() {
        message.push_str(&format!("; DETAIL: {detail}"));
    }
    if let Some(hint) = db.hint() {
        message.push_str(&format!("; HINT: {hint}"));
    }
    format!("{message} (SQLSTATE {})", db.code().code())
}

async fn record_result(
    client: &Client,
    run_id: i64,
    tenant: &PlannedTenant,
    result: &TenantResult,
) -> Result<(), tokio_postgres::Error> {
    // A tenant erased meanwhile has no user row to point at.
    client
        .execute(
            "INSERT INTO tenantry.fleet_results
                 (run_id, user_id, username, from_version, to_version, status, error, duration_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8
             WHERE EXISTS (SELECT 1 FROM tenantry.users WHERE id = $2)
             ON CONFLICT (run_id, user_id) DO NOTHING",
            &[
                &run_id,
                &tenant.user_id,
                &tenant.username,
                &tenant.from_version,
                &result.to_version,
                &result.outcome.as_str(),
                &result.error,
                &(result.duration.as_secs_f64() * 1000.0),
            ],
        )
        .await
        .map(drop)
}
