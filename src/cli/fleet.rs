//! `tenantry fleet status|migrate|check`, and the template check that the
//! commands which provision (`tenants create`, `tenants import`) run first.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::Failure;
use crate::configuration::Settings;
use crate::domain::{TemplateVersion, Username};
use crate::startup::Context;
use crate::tenancy::fleet::{self, FleetError, Outcome, Progress, RunOptions, TenantResult};
use crate::tenancy::integrity;

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Tenants per template version, what is pending or failed, the last run
    Status {
        /// Print a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Bring every tenant behind the target version up to it
    Migrate(MigrateArgs),
    /// Compare the registry with the catalog (schemas, roles, histories)
    Check {
        /// Print a JSON object
        #[arg(long)]
        json: bool,
        /// Remove orphan schemas, roles and users (never a schema a registry row names)
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Target template version (default: the latest)
    #[arg(long = "to", value_name = "V")]
    to: Option<i64>,
    /// Tenants migrated at once, each on a dedicated connection
    #[arg(long, default_value_t = 4, value_name = "N")]
    concurrency: usize,
    /// Migrate this many tenants first, one by one; stop if any of them fails
    #[arg(long, default_value_t = 1, value_name = "K")]
    canary: usize,
    /// Stop starting tenants after this many failures (default: no limit)
    #[arg(long, value_name = "F", value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: Option<u32>,
    /// Print the plan (tenants and versions) and change nothing
    #[arg(long)]
    dry_run: bool,
    /// Migrate this tenant only
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// Per tenant: how long to wait for a lock on its tables before it counts as failed
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    lock_timeout: f64,
    /// Per tenant: how long one statement may run
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    statement_timeout: f64,
    /// One line per tenant instead of a progress bar
    #[arg(long, short)]
    verbose: bool,
}

pub async fn run(settings: Settings, command: FleetCommand) -> Result<(), Failure> {
    match command {
        FleetCommand::Status { json } => status(settings, json).await,
        FleetCommand::Migrate(args) => migrate(settings, args).await,
        FleetCommand::Check { json, repair } => check(settings, json, repair).await,
    }
}

async fn status(settings: Settings, json: bool) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    let client = ctx.target.connect().await?;
    // What the next run would do: with the proposals it would publish.
    let templates = ctx.proposed();
    let s = fleet::fleet_status(&client, &ctx.installation, &templates).await?;
    // Refused templates are a failure of the command, whatever it printed.
    let refused = || {
        match &s.template_problem {
        Some(_) => Err(Failure::Other(
            "the templates are refused (`templates` in the status, `template_problem` in --json); fix them before the next fleet run"
                .into(),
        )),
        None => Ok(()),
    }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return refused();
    }
    let latest = templates.all().last().expect("never empty");
    let published = ctx.templates.get().latest();
    println!(
        "target version: V{} ({}{})",
        s.target_version,
        latest.file_name(),
        if latest.version() > published {
            format!(
                "; not published yet, proposed by {}: `fleet migrate` publishes it",
                ctx.proposals.set.origin()
            )
        } else {
            String::new()
        }
    );
    println!("tenants:        {}", s.tenants);
    for v in &s.versions {
        println!("  at V{:<4} {}", v.version, v.tenants);
    }
    println!(
        "pending:        {} (of which failed in their last attempt: {})",
        s.pending, s.failed
    );
    println!(
        "drift:          {} (`tenantry fleet check` lists it)",
        s.drift
    );
    if let Some(problem) = &s.template_problem {
        println!("templates:      REFUSED: {problem}");
    }
    match &s.last_run {
        None => println!("last run:       none"),
        Some(r) => {
            println!(
                "last run:       {} {} (target V{}, started by {} at {}{})",
                r.run_id,
                r.status.as_str(),
                r.target_version,
                r.started_by,
                r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
                r.finished_at
                    .map(|f| format!(", finished {}", f.format("%H:%M:%S")))
                    .unwrap_or_default()
            );
            println!(
                "                {} of {} done: {} succeeded, {} failed, {} skipped",
                r.done, r.planned, r.succeeded, r.failed, r.skipped
            );
            if let Some(reason) = &r.reason {
                println!("                {reason}");
            }
            for f in r.failures.iter().take(20) {
                print_failure(
                    &f.username,
                    f.from_version,
                    f.to_version,
                    f.error.as_deref(),
                );
            }
        }
    }
    refused()
}

fn print_failure(username: &str, from: i32, to: i32, error: Option<&str>) {
    println!(
        "  failed {username}  V{from} → V{to}  {}",
        error.unwrap_or("")
    );
}

fn options(args: &MigrateArgs) -> Result<RunOptions, Failure> {
    let usage = |m: String| Failure::Usage(m);
    let target = args
        .to
        .map(TemplateVersion::parse)
        .transpose()
        .map_err(|_| usage("--to must be a template version (1, 2, …)".into()))?;
    if !(1..=fleet::MAX_CONCURRENCY).contains(&args.concurrency) {
        return Err(usage(format!(
            "--concurrency must be between 1 and {}",
            fleet::MAX_CONCURRENCY
        )));
    }
    let seconds = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(usage(format!("{name} must be a number of seconds above 0")))
        }
    };
    let only_tenant = args
        .tenant
        .as_deref()
        .map(Username::parse)
        .transpose()
        .map_err(|e| usage(e.to_string()))?;
    Ok(RunOptions {
        target,
        concurrency: args.concurrency,
        canary: args.canary,
        max_failures: args.max_failures.map(|f| f as usize),
        only_tenant,
        lock_timeout: seconds("--lock-timeout", args.lock_timeout)?,
        statement_timeout: seconds("--statement-timeout", args.statement_timeout)?,
        started_by: format!("cli:{}", crate::startup::os_user()),
        audit_actor: None,
    })
}

fn fleet_failure(e: FleetError) -> Failure {
    if e.is_usage() {
        Failure::Usage(e.to_string())
    } else {
        Failure::Other(crate::api::error::cause_chain(&e))
    }
}

async fn migrate(settings: Settings, args: MigrateArgs) -> Result<(), Failure> {
    let options = options(&args)?;
    if args.dry_run {
        let ctx = Context::open(&settings, 1).await?;
        // As if the proposals were published: nothing is.
        let templates = ctx.proposed();
        let client = ctx.target.connect().await?;
        let plan = fleet::plan_only(&client, &templates, &options)
            .await
            .map_err(fleet_failure)?;
        println!(
            "dry run: {} tenant(s) would be migrated to V{}; nothing was changed",
            plan.tenants.len(),
            plan.target
        );
        for t in &plan.tenants {
            println!(
                "  {:<32} V{} → V{}  {}",
                t.username,
                t.from_version,
                plan.target,
                plan.files_for(&templates, t).join(", ")
            );
        }
        return Ok(());
    }
    // A run publishes what it applies (the proposals' new versions, up to
    // its target) once it holds the run lock.
    let ctx = Context::open(&settings, 1).await?;
    let source = fleet::Source::Publishing {
        installation: &ctx.installation,
        proposals: &ctx.proposals,
    };
    let prepared = fleet::prepare_with(&ctx.target.connector, source, options)
        .await
        .map_err(fleet_failure)?;
    for file in prepared.published() {
        println!("published {file} from {}", ctx.proposals.set.origin());
    }
    let stop = prepared.stop_handle();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "stopping at the next tenant boundary (tenants in flight finish or roll back)…"
            );
            stop.store(true, Ordering::SeqCst);
        }
    });
    let progress = CliProgress::new(args.verbose);
    let summary = prepared.execute(&progress).await.map_err(fleet_failure)?;
    progress.finish();

    let secs = summary.elapsed.as_secs_f64();
    let moved = summary.succeeded + summary.failed + summary.skipped;
    println!(
        "run {} {}: {} tenant(s) to V{} in {:.1} s ({:.0} tenants/s): {} migrated, {} failed, {} skipped{}",
        summary.run_id,
        summary.status.as_str(),
        summary.planned,
        summary.target_version,
        secs,
        if secs > 0.0 { moved as f64 / secs } else { 0.0 },
        summary.succeeded,
        summary.failed,
        summary.skipped,
        if summary.not_started > 0 {
            format!(", {} not started", summary.not_started)
        } else {
            String::new()
        }
    );
    if let Some(reason) = &summary.reason {
        println!("{reason}");
    }
    for f in &summary.failures {
        print_failure(
            &f.username,
            f.from_version,
            f.to_version,
            f.error.as_deref(),
        );
    }
    if summary.failed > 0 || summary.not_started > 0 {
        return Err(Failure::Other(format!(
            "{} tenant(s) failed, {} not started; they stay at their old version and the next run retries them",
            summary.failed, summary.not_started
        )));
    }
    Ok(())
}

/// A progress bar with rate and ETA on a terminal; progress lines (every few
/// seconds) otherwise; a line per tenant with `--verbose`.
struct CliProgress {
    bar: Option<ProgressBar>,
    verbose: bool,
    lines: Mutex<Lines>,
}

struct Lines {
    total: usize,
    done: usize,
    failed: usize,
    started: Instant,
    last: Instant,
}

impl CliProgress {
    fn new(verbose: bool) -> CliProgress {
        let bar = (!verbose && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::hidden();
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tenants, {per_sec}, ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            bar
        });
        CliProgress {
            bar,
            verbose,
            lines: Mutex::new(Lines {
                total: 0,
                done: 0,
                failed: 0,
                started: Instant::now(),
                last: Instant::now(),
            }),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for CliProgress {
    fn start(&self, run_id: i64, planned: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(planned as u64);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        } else {
            eprintln!("run {run_id}: {planned} tenant(s) to migrate");
        }
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.total = planned;
        l.started = Instant::now();
        l.last = Instant::now();
    }

    fn tenant(&self, result: &TenantResult) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.done += 1;
        if result.outcome == Outcome::Failed {
            l.failed += 1;
        }
        let line = format!(
            "{} {}  V{} → V{}  {:.0} ms{}",
            result.outcome.as_str(),
            result.username,
            result.from_version,
            result.to_version,
            result.duration.as_secs_f64() * 1000.0,
            result
                .error
                .as_deref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        );
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if l.failed > 0 {
                bar.set_message(format!("({} failed)", l.failed));
            }
            if result.outcome == Outcome::Failed {
                bar.println(line);
            }
        } else if self.verbose || result.outcome == Outcome::Failed {
            eprintln!("{line}");
        } else if l.last.elapsed() >= Duration::from_secs(2) || l.done == l.total {
            l.last = Instant::now();
            let elapsed = l.started.elapsed().as_secs_f64();
            let rate = if elapsed > 0.0 {
                l.done as f64 / elapsed
            } else {
                0.0
            };
            let eta = if rate > 0.0 {
                (l.total - l.done) as f64 / rate
            } else {
                0.0
            };
            eprintln!(
                "progress: {}/{} ({:.0}%), {} failed, {:.0} tenants/s, ETA {:.0} s",
                l.done,
                l.total,
                100.0 * l.done as f64 / l.total.max(1) as f64,
                l.failed,
                rate,
                eta
            );
        }
    }
}

async fn check(settings: Settings, json: bool, repair: bool) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    let mut client = ctx.target.connect().await?;
    // What killed Citus signups left goes first (each re-checked under its
    // name's lock); what is left is drift.
    let swept = if repair && ctx.installation.citus {
        crate::provisioning::sweep_pending(&client).await?
    } else {
        0
    };
    let drift = fleet::find_drift(&client, &ctx.installation).await?;
    let repaired = if repair {
        fleet::repair_drift(&mut client, &ctx.installation, &drift).await?
    } else {
        Vec::new()
    };
    let remaining = drift.len() - repaired.len();
    if json {
        let report = fleet::DriftReport {
            drift: drift.clone(),
            repaired: repaired.clone(),
            remaining,
            swept_signups: swept,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if swept > 0 {
            println!("removed what {swept} killed signup(s) left");
        }
        if drift.is_empty() {
            println!("no drift: the registry and the catalog agree");
            return Ok(());
        }
        for d in &drift {
            let tag = if repaired
                .iter()
                .any(|r| r.name == d.name && r.kind == d.kind)
            {
                "repaired"
            } else if d.kind.repairable() {
                "repairable"
            } else {
                "needs attention"
            };
            println!(
                "{:<20} {:<40} {}  [{tag}]",
                serde_json::to_value(d.kind)?.as_str().unwrap_or(""),
                d.name,
                d.detail
            );
        }
        println!(
            "{} finding(s), {} repaired{}",
            drift.len(),
            repaired.len(),
            if !repair && drift.iter().any(|d| d.kind.repairable()) {
                " (run with --repair to remove the orphans)"
            } else {
                ""
            }
        );
    }
    if remaining > 0 {
        return Err(Failure::Other(format!("{remaining} finding(s) remain")));
    }
    Ok(())
}

/// Check the published set (what `serve` and `tenants create` do before
/// they provision anything): refused with the fix when a published version
/// cannot be read or tenants are ahead of it.
pub async fn verify_templates(ctx: &Context) -> Result<(), Failure> {
    // On the context's pool: the command goes on with the same connection.
    let client = ctx.pool.get().await?;
    integrity::verify(&**client, &ctx.templates.get()).await?;
    Ok(())
}

/// Say what opening the database published.
pub fn print_publication(ctx: &Context) {
    for file in &ctx.publication.published {
        println!("published {file} from {}", ctx.proposals.set.origin());
    }
    if let Some(diverged) = &ctx.publication.diverged {
        eprintln!("note: the built-in templates were not published: {diverged}");
    }
}
