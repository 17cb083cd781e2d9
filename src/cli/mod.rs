//! The `tenantry` command line. Exit codes: 0 success, 2 usage error (bad
//! arguments or input), 1 any other failure.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::audit::{self, Action, Entry, Pseudonyms};
use crate::auth::Role;
use crate::configuration::{DatabaseTarget, Settings};
use crate::db::Target;
use crate::domain::{Email, Username};
use crate::embedded::{self, Cluster};
use crate::provisioning::{self, AuditContext, NewAccount};
use crate::startup::{Application, Context, StartupError};

mod backup;
mod fleet;
mod outbox;
mod password;
mod templates;
mod webhooks;

#[derive(Parser, Debug)]
#[command(
    name = "tenantry",
    version,
    about = "Schema-per-tenant provisioning for PostgreSQL",
    after_help = "Environment (every command reads the same; see docs/configuration.md):\n  \
DATABASE_URL                 PostgreSQL to use (with libpq's sslmode, sslrootcert, sslcert, sslkey); unset: the embedded cluster under TENANTRY_DATA_DIR\n  \
TENANTRY_DATA_DIR            embedded cluster, generated secret, audit anchors [./.tenantry]\n  \
TENANTRY_BIND                HTTP address of serve [127.0.0.1:8080]\n  \
JWT_SECRET                   token, export and audit-pseudonym key (required with DATABASE_URL)\n  \
JWT_PREVIOUS_SECRET          the secret before a rotation: its access tokens stay valid until they expire\n  \
BCRYPT_COST                  [12]\n  \
TENANTRY_TEMPLATES_DIR       tenant templates to publish instead of the built-in ones (all use the published set)\n  \
TENANTRY_POOL_SIZE           [16]\n  \
TENANTRY_RATE_LIMIT_AUTH / _ANON / _USER   per minute, 0 = off [10 / 20 / 100]\n  \
TENANTRY_LOGIN_MAX_FAILURES  [10]\n  \
TENANTRY_TRUSTED_PROXIES     addresses whose X-Forwarded-For is believed\n  \
TENANTRY_CLIENT_TIMEOUT      seconds a client may stall sending or reading [10]\n  \
TENANTRY_STATEMENT_TIMEOUT   seconds per statement of a tenant's request, 0 = none [5]\n  \
TENANTRY_EXPORT_CONCURRENCY  exports streamed at once [4]\n  \
TENANTRY_EXPORT_TIMEOUT      seconds one export may run [600]\n  \
TENANTRY_EXTRA_CONNECTIONS   connections serve opens outside its pool at most [export concurrency + 12]\n  \
TENANTRY_AUDIT_ANCHOR_FILE   [<data dir>/audit-anchors]\n  \
TENANTRY_MAINTENANCE_INTERVAL seconds [60]\n  \
TENANTRY_METRICS_TOKEN       bearer token for /metrics (unset: loopback only)\n  \
TENANTRY_TLS_CERT / _KEY     PEM certificate chain and key: serve speaks HTTPS\n  \
TENANTRY_SMTP_URL            smtp://host:port, smtps://user:pass@host, ?tls=starttls (unset: .eml files in <data dir>/mail)\n  \
TENANTRY_MAIL_FROM           [Tenantry <tenantry@localhost>]\n  \
TENANTRY_PUBLIC_URL          where links in mails point [http://<TENANTRY_BIND>]\n  \
TENANTRY_MAIL_MAX_ATTEMPTS / _BACKOFF_MS / _RETENTION   [10 / 5000 / 604800 s]\n  \
TENANTRY_UNVERIFIED_TTL      seconds before an unverified account is erased, 0 = never [604800]\n  \
TENANTRY_LOG_FORMAT          text or json [text]\n  \
DATABASE_URL, JWT_SECRET, JWT_PREVIOUS_SECRET, TENANTRY_METRICS_TOKEN, TENANTRY_SMTP_URL: also NAME_FILE, a file holding the value\n  \
RUST_LOG                     log filter [info for serve, warn otherwise]"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the HTTP service (starts the embedded PostgreSQL when DATABASE_URL is unset)
    Serve,
    /// Manage the embedded PostgreSQL cluster
    Db {
        #[command(subcommand)]
        action: DbCommand,
    },
    /// Manage the system schema
    System {
        #[command(subcommand)]
        action: SystemCommand,
    },
    /// Tenants: list, show, create, export, import, suspend, resume, delete, move to another node
    Tenants {
        #[command(subcommand)]
        action: TenantsCommand,
    },
    /// The tenant templates published in the database (what every process uses), and publishing new versions
    Templates {
        #[command(subcommand)]
        action: templates::TemplatesCommand,
    },
    /// Roll template versions out to every tenant; fleet status and drift
    Fleet {
        #[command(subcommand)]
        action: fleet::FleetCommand,
    },
    /// Manage admin and auditor accounts (no tenant schema)
    Admin {
        #[command(subcommand)]
        action: AdminCommand,
    },
    /// Check the tamper-evident audit log
    Audit {
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// The mail outbox: what waits, what was given up on, sending it again
    Outbox {
        #[command(subcommand)]
        action: outbox::OutboxCommand,
    },
    /// Webhooks: the endpoints that get lifecycle events (Standard Webhooks), their deliveries
    Webhooks {
        #[command(subcommand)]
        action: webhooks::WebhooksCommand,
    },
    /// Back up the whole installation (its roles, database, audit anchors) into a new directory, as the service role
    Backup {
        /// The directory to write: must not exist (its parent must) or be empty
        dir: std::path::PathBuf,
    },
    /// Restore a backup into an empty database: a new embedded data dir, or DATABASE_URL's
    Restore {
        /// A directory written by `tenantry backup`
        dir: std::path::PathBuf,
    },
    /// A Citus cluster's nodes and where the tenants are
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Nodes, with the tenants and bytes each holds (Citus only)
    Status {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Even out the tenants over the workers, moving whole tenants, with progress (Citus only)
    Rebalance,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Recompute the hash chain and compare it with the anchors; exit 1 naming the first broken entry
    Verify {
        /// The anchor file (default: TENANTRY_AUDIT_ANCHOR_FILE, or audit-anchors in the data dir)
        #[arg(long)]
        anchors: Option<std::path::PathBuf>,
    },
    /// Append the chain's current head to the anchor file now (serve does it periodically)
    Anchor {
        /// The anchor file (default: TENANTRY_AUDIT_ANCHOR_FILE, or audit-anchors in the data dir)
        #[arg(long)]
        anchors: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create an admin account (or an auditor with --auditor); asks for the password (or reads it from stdin)
    Create {
        /// The username (3 to 32 of a-z, 0-9, _; starts with a letter)
        name: String,
        /// The account's email address
        #[arg(long)]
        email: String,
        /// An auditor (reads the audit log) instead of an admin
        #[arg(long)]
        auditor: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DbCommand {
    /// Start the embedded cluster (or report the one already running)
    Start,
    /// Stop the embedded cluster
    Stop,
    /// Is the embedded cluster running? (exit 0 running, 3 stopped)
    Status,
    /// Print a connection string psql accepts (starts the cluster if needed)
    Url,
}

#[derive(Subcommand, Debug)]
enum SystemCommand {
    /// Apply pending system migrations (idempotent)
    Migrate,
}

#[derive(Subcommand, Debug)]
enum TenantsCommand {
    /// List every tenant
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show one tenant
    Show {
        /// The tenant's username
        name: String,
        /// Print a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Create a user and their tenant; asks for the password (or reads it from stdin)
    Create {
        /// The username (3 to 32 of a-z, 0-9, _; starts with a letter); the schema is tenant_<NAME>
        name: String,
        /// The user's email address
        #[arg(long)]
        email: String,
    },
    /// Export every row of a tenant and its account data as one signed JSON document on stdout
    Export {
        /// The tenant's username
        name: String,
    },
    /// Recreate a tenant from an export (one transaction); asks for the new password (or reads it from stdin)
    Import {
        /// A file written by `tenants export`
        file: std::path::PathBuf,
        /// Under another name (default: the exported username)
        #[arg(long = "as")]
        as_name: Option<String>,
        /// With another email (default: the exported one)
        #[arg(long)]
        email: Option<String>,
    },
    /// Suspend a tenant's account (restriction of processing): login and its tokens get 403, its data stays; the user is mailed
    Suspend {
        /// The tenant's username
        name: String,
        /// Why (shown in `tenants show` and sent to the user; at most 500 characters)
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a tenant's suspension: its sessions and tokens work again; the user is mailed
    Resume {
        /// The tenant's username
        name: String,
    },
    /// Bytes each tenant's schema takes (tables, indexes, TOAST) as last measured, and its quota
    Usage {
        /// One tenant's username (default: every tenant)
        name: Option<String>,
        /// Measure now instead of showing the last measurement (`serve` measures every TENANTRY_USAGE_INTERVAL)
        #[arg(long)]
        refresh: bool,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's own storage quota: over it, its writes get 403 quota_exceeded (reads, deletions, export and erasure still work)
    Quota {
        /// The tenant's username
        name: String,
        /// BYTES (e.g. 500000000, 500MB, 2GiB), `none` (no quota for this tenant) or `default` (TENANTRY_TENANT_QUOTA_BYTES)
        quota: String,
    },
    /// Move a tenant's tables to another Citus worker (online when wal_level = logical)
    Move {
        /// The tenant's username
        name: String,
        /// The worker, as HOST:PORT (see `cluster status`)
        #[arg(long)]
        node: String,
    },
    /// Erase a tenant for good: schema, role, account, sessions (GDPR art. 17); prints a receipt
    Delete {
        /// The tenant's username
        name: String,
        /// Really erase (without it nothing happens)
        #[arg(long)]
        yes: bool,
        /// Print the receipt as JSON
        #[arg(long)]
        json: bool,
    },
}

/// A command's failure: usage (exit 2) or anything else (exit 1).
#[derive(Debug)]
pub(crate) enum Failure {
    Usage(String),
    Other(String),
    /// Exit with this code, having said all there is to say.
    Code(u8),
}

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(crate::api::error::cause_chain(&e))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(e) = init_tracing(matches!(cli.command, Command::Serve)) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
        Err(Failure::Code(code)) => ExitCode::from(code),
    }
}

/// Logs go to stderr: text, or one JSON object per line with
/// `TENANTRY_LOG_FORMAT=json` (spans included: request id, route, tenant).
/// Text is coloured only on a terminal, and never with `NO_COLOR` set
/// (no-color.org): escape codes in a log file are noise.
fn init_tracing(serving: bool) -> Result<(), String> {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_wanted())
        .with_writer(std::io::stderr);
    match std::env::var("TENANTRY_LOG_FORMAT").ok().as_deref() {
        None | Some("") | Some("text") => {
            let _ = builder.try_init();
        }
        Some("json") => {
            let _ = builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .try_init();
        }
        Some(other) => {
            return Err(format!(
                "TENANTRY_LOG_FORMAT is invalid: {other:?} (expected text or json)"
            ))
        }
    }
    Ok(())
}

fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let settings = Settings::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    match cli.command {
        Command::Serve => serve(settings).await,
        Command::Db { action } => db(settings, action).await,
        Command::System {
            action: SystemCommand::Migrate,
        } => {
            let target = Target::resolve(&settings).await?;
            let mut client = target.connect().await?;
            let (_, applied) = crate::db::bootstrap(&mut client).await?;
            for name in &applied {
                println!("applied {name}");
            }
            let version: Option<i32> = client
                .query_one(
                    "SELECT max(version) FROM tenantry.refinery_schema_history",
                    &[],
                )
                .await?
                .get(0);
            println!(
                "system schema is up to date at version {}",
                version.unwrap_or(0)
            );
            Ok(())
        }
        Command::Tenants { action } => tenants(settings, action).await,
        Command::Fleet { action } => fleet::run(settings, action).await,
        Command::Admin { action } => admin(settings, action).await,
        Command::Audit { action } => audit_command(settings, action).await,
        Command::Outbox { action } => outbox::run(settings, action).await,
        Command::Webhooks { action } => webhooks::run(settings, action).await,
        Command::Templates { action } => templates::run(settings, action).await,
        Command::Backup { dir } => backup::backup(settings, &dir).await,
        Command::Restore { dir } => backup::restore(settings, &dir).await,
        Command::Cluster {
            action: ClusterCommand::Status { json },
        } => cluster_status(settings, json).await,
        Command::Cluster {
            action: ClusterCommand::Rebalance,
        } => cluster_rebalance(settings).await,
    }
}

const NOT_CITUS: &str = "this database is not a Citus coordinator (see docs/scaling-out.md)";

async fn cluster_status(settings: Settings, json: bool) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    if !ctx.installation.citus {
        return Err(Failure::Other(NOT_CITUS.into()));
    }
    let client = ctx.pool.get().await?;
    let nodes = crate::db::citus::cluster_status(&client).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<7} {:>8} {:>14}",
        "NODE", "ROLE", "ACTIVE", "TENANTS", "BYTES"
    );
    for n in &nodes {
        println!(
            "{:<32} {:<12} {:<7} {:>8} {:>14}",
            format!("{}:{}", n.host, n.port),
            n.role,
            if n.active { "yes" } else { "no" },
            n.tenants,
            n.bytes
        );
    }
    Ok(())
}

async fn cluster_rebalance(settings: Settings) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let ctx = Context::open(&settings, 1).await?;
    if !ctx.installation.citus {
        return Err(Failure::Other(NOT_CITUS.into()));
    }
    let client = ctx.pool.get().await?;
    let mode = crate::db::citus::move_mode(&client).await?;
    eprintln!(
        "rebalancing: {}",
        if mode == "force_logical" {
            "tenants move online (logical replication; writes continue)"
        } else {
            "writes to each tenant are blocked while it is copied (wal_level is not logical)"
        }
    );
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} moves, {elapsed} (eta {eta})",
            )
            .expect("a valid template"),
        );
        bar
    });
    let outcome = crate::db::citus::rebalance(&client, &|done, total| match &bar {
        Some(bar) => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        None => eprintln!("rebalance: {done}/{total} moves done"),
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match outcome.state.as_str() {
        "balanced" => {
            println!("the tenants are balanced already: nothing to move");
            Ok(())
        }
        "finished" => {
            println!(
                "rebalanced: {} move(s) (Citus job {})",
                outcome.moves,
                outcome.job.unwrap_or_default()
            );
            Ok(())
        }
        other => Err(Failure::Other(format!(
            "the rebalance (Citus job {}) ended {other} after {} move(s); see citus_rebalance_status()",
            outcome.job.unwrap_or_default(),
            outcome.moves
        ))),
    }
}

/// `tenants move NAME --node HOST:PORT`.
async fn move_tenant(settings: Settings, name: String, node: String) -> Result<(), Failure> {
    use crate::db::citus::{parse_node, MoveError, MovePlan};
    let username = Username::parse(&name).map_err(|e| Failure::Usage(e.to_string()))?;
    let to = parse_node(&node)
        .ok_or_else(|| Failure::Usage(format!("--node must be HOST:PORT, not {node:?}")))?;
    let ctx = Context::open(&settings, 1).await?;
    if !ctx.installation.citus {
        return Err(Failure::Other(NOT_CITUS.into()));
    }
    let client = ctx.pool.get().await?;
    let tenant = crate::tenants::find(&**client, &username)
        .await?
        .ok_or_else(|| Failure::Other(format!("no tenant {username}")))?;
    let plan = MovePlan::new(&client, &tenant, to)
        .await
        .map_err(|e| match e {
            MoveError::NotAWorker(..) => {
                Failure::Usage(format!("{e} (see `tenantry cluster status`)"))
            }
            other => other.into(),
        })?;
    let (to_host, to_port) = &plan.to;
    if plan.done_already() {
        println!("{username} is on {to_host}:{to_port} already");
        return Ok(());
    }
    eprintln!(
        "moving {username} from {}:{} to {to_host}:{to_port}: {}",
        plan.from.0,
        plan.from.1,
        if plan.online {
            "online (logical replication; writes continue)"
        } else {
            "writes to this tenant are blocked while it is copied (wal_level is not logical); other tenants are unaffected"
        }
    );
    let started = std::time::Instant::now();
    plan.execute(&client).await.map_err(|e| match e {
        MoveError::Postgres(e) => e.into(),
        other => Failure::Other(other.to_string()),
    })?;
    println!(
        "moved {username} to {to_host}:{to_port} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn serve(settings: Settings) -> Result<(), Failure> {
    let app = Application::build(settings.clone())
        .await
        .map_err(|e| match e {
            StartupError::Settings(s) => Failure::Usage(s.to_string()),
            other => Failure::Other(format!(
                "refusing to start: {}",
                crate::api::error::cause_chain(&other)
            )),
        })?;
    tracing::info!(
        address = %format!("http://{}:{}", settings.bind.ip(), app.port()),
        "tenantry is listening"
    );
    let embedded = app.target().embedded.clone();
    let served = app.run_until_stopped().await;
    if let Some((cluster, running)) = embedded {
        if running.started_here {
            // Only the server it started: after a `db stop` / `db start`
            // while serving, the running one belongs to whoever started it.
            tokio::task::spawn_blocking(move || match cluster.running()? {
                Some(now) if now.pid == running.pid => cluster.stop().map(drop),
                _ => Ok(()),
            })
            .await??;
        }
    }
    served?;
    Ok(())
}

async fn db(settings: Settings, action: DbCommand) -> Result<(), Failure> {
    if let DatabaseTarget::Url(_) = settings.database {
        return Err(Failure::Usage(
            "DATABASE_URL is set: tenantry manages no cluster of its own (unset it to use the embedded one)".into(),
        ));
    }
    match action {
        DbCommand::Start | DbCommand::Url => {
            let target = Target::resolve(&settings).await?;
            let (cluster, running) = target.embedded.expect("embedded mode");
            if matches!(action, DbCommand::Url) {
                println!("{}", cluster.url(&running, embedded::DATABASE_NAME));
            } else {
                println!(
                    "{} (pid {}, port {}, socket {})",
                    if running.started_here {
                        "started"
                    } else {
                        "already running"
                    },
                    running.pid,
                    running.port,
                    running.socket_dir.display()
                );
            }
        }
        DbCommand::Stop => {
            let data_dir = settings.data_dir.clone();
            // A running service's pool (application_name "tenantry"): say
            // what stopping does to it.
            let open = tokio::task::spawn_blocking({
                let data_dir = data_dir.clone();
                move || Cluster::open(&data_dir).and_then(|c| Ok(c.running()?.map(|r| (c, r))))
            })
            .await??;
            if let Some((cluster, running)) = open {
                let superuser = crate::db::Connector::embedded(
                    cluster.pg_config(&running, "postgres"),
                    cluster.clone(),
                );
                if let Ok(client) = superuser.connect(crate::db::Dedicated::Command).await {
                    let serving: i64 = client
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity
                             WHERE application_name = 'tenantry' AND pid <> pg_backend_pid()",
                            &[],
                        )
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0);
                    if serving > 0 {
                        eprintln!(
                            "warning: a running `tenantry serve` has {serving} connection(s) open: its requests get 503 until `tenantry db start` (it reconnects by itself)"
                        );
                    }
                }
            }
            let stopped = tokio::task::spawn_blocking(move || {
                Cluster::open(&data_dir).and_then(|c| c.stop())
            })
            .await??;
            println!("{}", if stopped { "stopped" } else { "not running" });
        }
        DbCommand::Status => {
            let data_dir = settings.data_dir.clone();
            let running = tokio::task::spawn_blocking(move || {
                Cluster::open(&data_dir).and_then(|c| c.running())
            })
            .await??;
            match running {
                Some(r) => println!(
                    "running (pid {}, port {}, socket {})",
                    r.pid,
                    r.port,
                    r.socket_dir.display()
                ),
                None => {
                    // pg_ctl's convention: 3 when not running.
                    println!("stopped");
                    return Err(Failure::Code(3));
                }
            }
        }
    }
    Ok(())
}

async fn tenants(settings: Settings, action: TenantsCommand) -> Result<(), Failure> {
    match action {
        TenantsCommand::Move { name, node } => return move_tenant(settings, name, node).await,
        TenantsCommand::List { json } => {
            let ctx = Context::open(&settings, 1).await?;
            let client = ctx.pool.get().await?;
            let all = crate::tenants::list(&**client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no tenants");
            } else {
                println!(
                    "{:<32} {:<40} {:>7} {:<10} {:<8} CREATED",
                    "USERNAME", "SCHEMA", "VERSION", "STATUS", "VERIFIED"
                );
                for t in &all {
                    println!(
                        "{:<32} {:<40} {:>7} {:<10} {:<8} {}",
                        t.username,
                        t.schema,
                        t.template_version,
                        t.status,
                        yes_no(t.email_verified),
                        t.created_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        TenantsCommand::Show { name, json } => {
            let username = Username::parse(&name).map_err(|e| Failure::Usage(e.to_string()))?;
            let ctx = Context::open(&settings, 1).await?;
            let client = ctx.pool.get().await?;
            let detail = crate::tenants::detail(&client, &username, ctx.installation.citus)
                .await?
                .ok_or_else(|| Failure::Other(format!("no tenant named {username}")))?;
            if json {
                // The same object as `tenants list --json` has for it.
                println!("{}", serde_json::to_string_pretty(&detail.tenant)?);
            } else {
                let tenant = &detail.tenant;
                let usage = crate::tenancy::usage::usage(
                    &**client,
                    Some(&username),
                    settings.tenant_quota_bytes,
                )
                .await?;
                println!("username:         {}", tenant.username);
                println!("email:            {}", tenant.email);
                println!("email verified:   {}", yes_no(tenant.email_verified));
                println!("user id:          {}", tenant.user_id);
                println!("schema:           {}", tenant.schema);
                println!("role:             {}", tenant.role);
                println!("template version: {}", tenant.template_version);
                println!("status:           {}", tenant.status);
                if let Some(at) = tenant.suspended_at {
                    println!("suspended:        {}", at.to_rfc3339());
                    let reason = tenant.suspension_reason.as_deref();
                    println!("reason:           {}", reason.unwrap_or("(none given)"));
                }
                println!("created:          {}", tenant.created_at.to_rfc3339());
                println!("sessions:         {}", detail.sessions);
                if let Some(node) = &detail.node {
                    println!("node:             {node}");
                }
                if let Some(u) = usage.first() {
                    let (bytes, quota, state) = usage_line(u);
                    println!("usage:            {bytes}");
                    println!("quota:            {quota}");
                    println!("quota state:      {state}");
                }
            }
        }
        TenantsCommand::Export { name } => export_tenant(&settings, &name).await?,
        TenantsCommand::Import {
            file,
            as_name,
            email,
        } => import_tenant(&settings, &file, as_name, email).await?,
        TenantsCommand::Delete { name, yes, json } => {
            delete_tenant(&settings, &name, yes, json).await?;
        }
        TenantsCommand::Create { name, email } => create_tenant(&settings, &name, &email).await?,
        TenantsCommand::Suspend { name, reason } => {
            suspend_tenant(&settings, &name, reason.as_deref()).await?;
        }
        TenantsCommand::Resume { name } => resume_tenant(&settings, &name).await?,
        TenantsCommand::Usage {
            name,
            refresh,
            json,
        } => tenants_usage(&settings, name.as_deref(), refresh, json).await?,
        TenantsCommand::Quota { name, quota } => set_quota(&settings, &name, &quota).await?,
    }
    Ok(())
}

/// A number of bytes as people read it (`1.5 MiB`).
fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn usage_line(u: &crate::tenancy::usage::Usage) -> (String, String, String) {
    let bytes = u
        .bytes
        .map(human_bytes)
        .unwrap_or_else(|| "not measured".into());
    let quota = match u.quota_bytes {
        Some(q) => format!("{} ({})", human_bytes(q), u.quota_source),
        None => format!("none ({})", u.quota_source),
    };
    let state = match u.over_quota_since {
        Some(at) => format!("over quota since {}", at.format("%Y-%m-%d %H:%M:%S")),
        None => "ok".into(),
    };
    (bytes, quota, state)
}

/// `tenants usage [NAME] [--refresh] [--json]`.
async fn tenants_usage(
    settings: &Settings,
    name: Option<&str>,
    refresh: bool,
    json: bool,
) -> Result<(), Failure> {
    use crate::tenancy::usage;
    let username = name
        .map(Username::parse)
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let ctx = Context::open(settings, 1).await?;
    let mut client = ctx.pool.get().await?;
    if refresh {
        let measured = match &username {
            Some(one) => {
                usage::measure_now(
                    &ctx.target.connector,
                    ctx.installation.citus,
                    one,
                    settings.tenant_quota_bytes,
                )
                .await?
            }
            None => usage::measure(
                &mut client,
                ctx.installation.citus,
                None,
                settings.tenant_quota_bytes,
            )
            .await?
            .ok_or_else(|| {
                Failure::Other("another process is measuring the fleet; retry".into())
            })?,
        };
        if !json {
            eprintln!(
                "measured {} tenant(s): {} in all",
                measured.tenants,
                human_bytes(measured.bytes)
            );
        }
    }
    let all = usage::usage(&**client, username.as_ref(), settings.tenant_quota_bytes).await?;
    if let (Some(username), true) = (&username, all.is_empty()) {
        return Err(Failure::Other(format!("no tenant named {username}")));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no tenants");
    } else {
        println!(
            "{:<32} {:>12} {:<24} {:<20} MEASURED",
            "USERNAME", "USAGE", "QUOTA", "STATE"
        );
        for u in &all {
            let (bytes, quota, state) = usage_line(u);
            let at = u
                .measured_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<32} {bytes:>12} {quota:<24} {state:<20} {at}",
                u.username
            );
        }
    }
    Ok(())
}

/// `tenants quota NAME BYTES|none|default`.
async fn set_quota(settings: &Settings, name: &str, quota: &str) -> Result<(), Failure> {
    use crate::tenancy::usage::{self, Quota};
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    let quota = Quota::parse(quota).map_err(Failure::Usage)?;
    let pseudonyms = pseudonyms(settings)?;
    let ctx = Context::open(settings, 1).await?;
    let mut client = ctx.pool.get().await?;
    let u = usage::set_quota(
        &mut client,
        &username,
        quota,
        settings.tenant_quota_bytes,
        &cli_change(),
        &pseudonyms,
    )
    .await?
    .ok_or_else(|| Failure::Other(format!("no tenant named {username}")))?;
    let (bytes, quota, state) = usage_line(&u);
    println!("{username}: quota {quota}; usage {bytes}; {state}");
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The CLI's part in a suspension: the actor `cli`, no client, and the mail
/// written to the outbox (a running `serve` delivers it).
pub(crate) fn cli_change() -> crate::tenancy::suspension::ChangedBy {
    crate::tenancy::suspension::ChangedBy {
        actor: "cli".into(),
        client: None,
    }
}

fn suspension_failure(e: crate::tenancy::suspension::SuspensionError) -> Failure {
    use crate::tenancy::suspension::SuspensionError;
    match e {
        SuspensionError::InvalidReason(message) => Failure::Usage(format!("--reason: {message}")),
        SuspensionError::Postgres(e) => e.into(),
        other => Failure::Other(other.to_string()),
    }
}

/// `tenants suspend NAME [--reason R]`.
async fn suspend_tenant(
    settings: &Settings,
    name: &str,
    reason: Option<&str>,
) -> Result<(), Failure> {
    use crate::tenancy::suspension::{self, Reason};
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    let reason = reason
        .map(Reason::parse)
        .transpose()
        .map_err(suspension_failure)?
        .flatten();
    let pseudonyms = pseudonyms(settings)?;
    let letters = crate::mail::Letters::new(&settings.mail.public_url);
    let ctx = Context::open(settings, 1).await?;
    let mut client = ctx.pool.get().await?;
    let changed = suspension::suspend(
        &mut client,
        &username,
        reason.as_ref(),
        &cli_change(),
        &pseudonyms,
        &letters,
    )
    .await
    .map_err(suspension_failure)?;
    println!(
        "suspended {username} at {}: login and its tokens get 403 account_suspended; its data is kept; the user is mailed",
        changed.suspended_at.unwrap_or_default().to_rfc3339()
    );
    Ok(())
}

/// `tenants resume NAME`.
async fn resume_tenant(settings: &Settings, name: &str) -> Result<(), Failure> {
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    let pseudonyms = pseudonyms(settings)?;
    let letters = crate::mail::Letters::new(&settings.mail.public_url);
    let ctx = Context::open(settings, 1).await?;
    let mut client = ctx.pool.get().await?;
    crate::tenancy::suspension::resume(
        &mut client,
        &username,
        &cli_change(),
        &pseudonyms,
        &letters,
    )
    .await
    .map_err(suspension_failure)?;
    println!("resumed {username}: its sessions and tokens work again; the user is mailed");
    Ok(())
}

async fn create_tenant(settings: &Settings, name: &str, email: &str) -> Result<(), Failure> {
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    let email = Email::parse(email).map_err(|e| Failure::Usage(e.to_string()))?;
    let pseudonyms = pseudonyms(settings)?;
    let ctx = Context::open(settings, 1).await?;
    fleet::verify_templates(&ctx).await?;
    provisioning::check_available(&ctx.pool.get().await?, &username, &email)
        .await
        .map_err(|e| Failure::Other(e.to_string()))?;
    let password = password::read(&username)?;
    let password_hash = crate::auth::hash_password(&password, settings.bcrypt_cost).await?;
    let account = NewAccount {
        username,
        email,
        password_hash,
        role: Role::User,
        refresh_token: None,
        idempotency_key: None,
        verification: None,
        audit: Some(AuditContext {
            pseudonyms,
            actor: Some("cli".into()),
            client: None,
        }),
    };
    // Only now (the password read): a new database's first tenant
    // publishes the templates.
    ctx.ready_to_provision().await?;
    let mut client = ctx.pool.get().await?;
    let t =
        provisioning::provision(&mut client, &ctx.installation, &ctx.templates, &account).await?;
    println!(
        "created tenant {} (schema {}, role {}, template version {})",
        t.username, t.schema, t.role, t.template_version
    );
    Ok(())
}

fn export_key(settings: &Settings) -> Result<crate::tenancy::export::ExportKey, Failure> {
    let secret = settings
        .jwt_secret()
        .map_err(|e| Failure::Usage(format!("{e} (exports are signed with it)")))?;
    Ok(crate::tenancy::export::ExportKey::from_secret(
        secret.expose().as_bytes(),
    ))
}

async fn export_tenant(settings: &Settings, name: &str) -> Result<(), Failure> {
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    let key = export_key(settings)?;
    let ctx = Context::open(settings, 1).await?;
    let user_id = {
        let client = ctx.pool.get().await?;
        crate::tenants::find(&**client, &username)
            .await?
            .ok_or_else(|| Failure::Other(format!("no tenant named {username}")))?
            .user_id
    };
    let mut client = ctx.target.connect().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let task = tokio::spawn(async move {
        crate::tenancy::export::export(&mut client, user_id, &key, tx, None).await
    });
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = rx.recv().await {
        tokio::io::AsyncWriteExt::write_all(&mut stdout, &chunk).await?;
    }
    tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
    task.await??;
    Ok(())
}

async fn import_tenant(
    settings: &Settings,
    file: &std::path::Path,
    as_name: Option<String>,
    email: Option<String>,
) -> Result<(), Failure> {
    use crate::tenancy::import::{ImportError, RestoreError};
    let key = export_key(settings)?;
    let pseudonyms = pseudonyms(settings)?;
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
    // Signed before a key rotation: the previous secret's key opens it.
    let previous = settings
        .jwt_previous_secret
        .as_ref()
        .map(|p| crate::tenancy::export::ExportKey::from_secret(p.expose().as_bytes()));
    let document = match (key.open(&bytes), previous) {
        (Err(ImportError::Tampered), Some(previous)) => previous.open(&bytes),
        (opened, _) => opened,
    }
    .map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
    let name = as_name
        .or_else(|| document.account.username.clone())
        .ok_or_else(|| Failure::Usage("the export names no user; pass --as NAME".into()))?;
    let username = Username::parse(&name).map_err(|e| Failure::Usage(e.to_string()))?;
    let email = email
        .or_else(|| document.account.email.clone())
        .ok_or_else(|| Failure::Usage("the export has no email; pass --email".into()))?;
    let email = Email::parse(&email).map_err(|e| Failure::Usage(e.to_string()))?;
    let ctx = Context::open(settings, 1).await?;
    fleet::verify_templates(&ctx).await?;
    provisioning::check_available(&ctx.pool.get().await?, &username, &email)
        .await
        .map_err(taken_on_import)?;
    let password = password::read(&username)?;
    let account = NewAccount {
        username,
        email,
        password_hash: crate::auth::hash_password(&password, settings.bcrypt_cost).await?,
        role: Role::User,
        refresh_token: None,
        idempotency_key: None,
        verification: None,
        audit: None,
    };
    ctx.ready_to_provision().await?;
    let mut client = ctx.pool.get().await?;
    let restored = crate::tenancy::import::import(
        &mut client,
        &ctx.installation,
        &ctx.templates,
        &document,
        &account,
        &pseudonyms,
    )
    .await
    .map_err(|e| match e {
        RestoreError::File(ImportError::Format(_))
        | RestoreError::NewerVersion(..)
        | RestoreError::UnknownTable(..)
        | RestoreError::InvalidRow { .. } => Failure::Usage(format!("{}: {e}", file.display())),
        RestoreError::Provision(p) => taken_on_import(p),
        other => Failure::Other(crate::api::error::cause_chain(&other)),
    })?;
    println!(
        "imported tenant {} (schema {}): {} in {}, exported at template version {}, now at {}",
        restored.username,
        restored.schema,
        count(restored.rows, "row", "rows"),
        count(restored.tables, "table", "tables"),
        restored.from_version,
        restored.template_version
    );
    Ok(())
}

/// A name or address taken: say which option picks another.
fn taken_on_import(e: provisioning::ProvisionError) -> Failure {
    use provisioning::ProvisionError::{EmailTaken, UsernameTaken};
    match e {
        EmailTaken => Failure::Other(format!("{e}: pass --email to import under another address")),
        UsernameTaken(_) => Failure::Other(format!("{e}: pass --as to import under another name")),
        other => Failure::Other(crate::api::error::cause_chain(&other)),
    }
}

async fn delete_tenant(
    settings: &Settings,
    name: &str,
    yes: bool,
    json: bool,
) -> Result<(), Failure> {
    let username = Username::parse(name).map_err(|e| Failure::Usage(e.to_string()))?;
    if !yes {
        return Err(Failure::Usage(format!(
            "erasing {username} removes its schema, data, role, account and sessions for good; nothing was done. Run again with --yes to erase it"
        )));
    }
    let pseudonyms = pseudonyms(settings)?;
    let ctx = Context::open(settings, 1).await?;
    let mut client = ctx.target.connect().await?;
    let receipt = crate::tenancy::erasure::erase(
        &mut client,
        &username,
        &pseudonyms,
        &crate::tenancy::erasure::Requester {
            actor: "cli".into(),
            client: None,
            reason: "admin",
            only_unverified: false,
        },
        std::time::Duration::from_secs(5),
    )
    .await?;
    // Mail written as files in this installation's data dir goes too.
    if let Some(dir) = crate::mail::delivery::files_dir(&settings.mail, &settings.data_dir) {
        crate::mail::delivery::forget_files(&dir, &receipt.mail);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&receipt)?);
    } else {
        println!(
            "erased tenant {} at {}: schema {}, role {}, {}, {}, {} revoked; audit entry {}",
            receipt.username,
            receipt.erased_at.to_rfc3339(),
            receipt.schema,
            receipt.role,
            count(receipt.tables.len(), "table", "tables"),
            count(receipt.rows, "row", "rows"),
            count(receipt.sessions_revoked, "session", "sessions"),
            receipt.audit_entry
        );
        for t in &receipt.tables {
            println!(
                "  {:<40} {:>10} {}",
                t.table,
                t.rows,
                if t.rows == 1 { "row" } else { "rows" }
            );
        }
        println!("verified absent: {}", receipt.verified_absent.join(", "));
    }
    Ok(())
}

async fn admin(settings: Settings, action: AdminCommand) -> Result<(), Failure> {
    let AdminCommand::Create {
        name,
        email,
        auditor,
    } = action;
    let username = Username::parse(&name).map_err(|e| Failure::Usage(e.to_string()))?;
    let email = Email::parse(&email).map_err(|e| Failure::Usage(e.to_string()))?;
    let role = if auditor { Role::Auditor } else { Role::Admin };
    let pseudonyms = pseudonyms(&settings)?;
    let ctx = Context::open(&settings, 1).await?;
    provisioning::check_available(&ctx.pool.get().await?, &username, &email)
        .await
        .map_err(|e| Failure::Other(e.to_string()))?;
    let password = password::read(&username)?;
    let password_hash = crate::auth::hash_password(&password, settings.bcrypt_cost).await?;
    let mut client = ctx.target.connect().await?;
    let id = uuid::Uuid::new_v4();
    let tx = client.transaction().await?;
    let created = tx
        .execute(
            "INSERT INTO tenantry.users (id, username, email, password_hash, role)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &id,
                &username.as_str(),
                &email.as_str(),
                &password_hash,
                &role.as_str(),
            ],
        )
        .await;
    match created {
        Ok(_) => {
            audit::append(
                &tx,
                &Entry::new(Action::AdminCreated)
                    .actor("cli")
                    .subject(pseudonyms.user(id))
                    .detail("role", role),
            )
            .await?;
            tx.commit().await?;
            println!("created {role} {username} (no tenant schema)");
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            let what = match e.as_db_error().and_then(|d| d.constraint()) {
                Some("users_email_key") => "email is already registered".to_string(),
                _ => format!("username {username} is already taken"),
            };
            Err(Failure::Other(what))
        }
        Err(e) => Err(e.into()),
    }
}

async fn audit_command(settings: Settings, action: AuditCommand) -> Result<(), Failure> {
    let (AuditCommand::Verify { anchors } | AuditCommand::Anchor { anchors }) = &action;
    let path = anchors
        .clone()
        .unwrap_or_else(|| settings.audit_anchor_file.clone());
    let ctx = Context::open(&settings, 1).await?;
    let client = ctx.pool.get().await?;
    let installation = ctx.installation.id.as_str();
    match action {
        AuditCommand::Anchor { .. } => {
            match audit::write_anchor(&**client, &path, installation).await? {
                Some(a) => println!(
                    "anchored entry {} ({}) in {}",
                    a.seq,
                    hex::encode(a.hash),
                    path.display()
                ),
                None => println!("nothing new to anchor"),
            }
            Ok(())
        }
        AuditCommand::Verify { .. } => {
            let anchors = audit::read_anchors(&path, installation)?;
            match audit::verify(&**client, &anchors).await? {
                audit::Verdict::Intact { entries, anchors } => {
                    println!(
                        "audit log intact: {}, chain verified, {anchors} anchor(s) from {} match",
                        count(entries, "entry", "entries"),
                        path.display()
                    );
                    Ok(())
                }
                audit::Verdict::Broken { seq, reason } => Err(Failure::Other(format!(
                    "audit log broken at entry {seq}: {reason}"
                ))),
            }
        }
    }
}

/// "1 row", "2 rows".
fn count<N: PartialEq + From<u8> + std::fmt::Display>(n: N, one: &str, many: &str) -> String {
    let noun = if n == N::from(1) { one } else { many };
    format!("{n} {noun}")
}

/// The audit log's pseudonym key, from the service secret (`JWT_SECRET`,
/// or the one generated into the embedded data dir).
pub(crate) fn pseudonyms(settings: &Settings) -> Result<Pseudonyms, Failure> {
    let secret = settings.jwt_secret().map_err(|e| {
        Failure::Usage(format!(
            "{e} (the audit log's pseudonyms are keyed with it)"
        ))
    })?;
    Ok(Pseudonyms::from_secret(secret.expose().as_bytes()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// `--help` describes every command and every argument of each.
    #[test]
    fn every_command_and_argument_has_a_description() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tenantry", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:?}");
    }

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1i64, "row", "rows"), "1 row");
        assert_eq!(count(0usize, "row", "rows"), "0 rows");
        assert_eq!(count(2u64, "entry", "entries"), "2 entries");
    }
}
