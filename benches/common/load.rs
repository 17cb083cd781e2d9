//! Load generation for the throughput benchmarks (routing, scale): wrk
//! against the service, pgbench against the database, and the backends'
//! memory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use tenantry::auth::JwtKeys;
use tenantry::db::{self, ConnectionLimits, Installation};
use tenantry::domain::{Email, Username};
use tenantry::provisioning::{provision, NewAccount};
use tenantry::tenancy::publication::Templates;

/// A user account named `name` (`name@example.com`) with `hash` as its
/// password hash, and nothing else: what the benchmarks sign up.
pub fn account(name: &str, hash: &str) -> NewAccount {
    NewAccount {
        username: Username::parse(name).unwrap(),
        email: Email::parse(&format!("{name}@example.com")).unwrap(),
        password_hash: hash.to_owned(),
        role: tenantry::auth::Role::User,
        refresh_token: None,
        idempotency_key: None,
        verification: None,
        audit: None,
    }
}

/// Provision tenants `rt1000`… (`n` of them, four at a time, with a
/// progress bar) as the service (`service`), each with a quick summary and
/// three experiences; their access tokens (signed with `secret` once all
/// are made).
pub async fn provision_seeded(
    service: &tokio_postgres::Config,
    installation: &Installation,
    templates: &Templates,
    n: usize,
    secret: &str,
) -> Vec<String> {
    let pool = db::pool(service.clone(), 4, ConnectionLimits::default()).unwrap();
    let hash = bcrypt::hash("not used to log in here", 4).unwrap();
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}").unwrap(),
    );
    let keys = JwtKeys::new(secret.as_bytes());
    let tenants = stream::iter(0..n)
        .map(|i| {
            let (pool, hash, bar) = (&pool, &hash, &bar);
            async move {
                let account = account(&format!("rt{}", 1000 + i), hash);
                let mut client = pool.get().await.unwrap();
                let t = provision(&mut client, installation, templates, &account)
                    .await
                    .unwrap();
                client.batch_execute(&seed_sql(&t.schema, i)).await.unwrap();
                bar.inc(1);
                t
            }
        })
        .buffered(4)
        .collect::<Vec<_>>()
        .await;
    bar.finish_and_clear();
    // Signed once all are made: access tokens live 15 minutes, and
    // provisioning thousands of tenants on Citus takes longer than that.
    tenants
        .iter()
        .map(|t| {
            keys.issue(&tenantry::auth::Subject {
                user_id: t.user_id,
                username: t.username.as_str(),
                schema: Some(t.schema.as_str()),
                db_role: Some(t.role.as_str()),
                role: tenantry::auth::Role::User,
                generation: 0,
                session: None,
            })
            .unwrap()
        })
        .collect()
}

/// The rows every seeded tenant holds (the `i`th): a quick summary and
/// three experiences, one of which matches a search for "engineer".
pub fn seed_sql(schema: &tenantry::domain::SchemaName, i: usize) -> String {
    format!(
        "INSERT INTO {s}.summaries (kind, headline, content)
         VALUES ('quick', 'Engineer', 'Data engineer, eight years, tenant {i}.');
         INSERT INTO {s}.experiences (title, organization, started_on, description, details) VALUES
         ('Data engineer', 'Acme', '2019-01-01', 'Pipelines and warehouses', '{{\"skills\": [\"SQL\"]}}'),
         ('Analyst', 'Initech', '2016-01-01', 'Reports; worked with the engineering team', '{{}}'),
         ('Barista', 'Cafe', '2014-01-01', 'Coffee', '{{}}');",
        s = schema.quoted()
    )
}

/// The service as the load benchmarks run it: on `database_url`, tokens
/// signed with `secret`, the default pool size (or `TENANTRY_POOL_SIZE`),
/// rate limits off (the benchmark is one client making thousands of
/// requests), its audit anchors in `anchor_file`. Returns its address.
pub async fn start_service(
    database_url: &str,
    secret: &str,
    data_dir: &Path,
    anchor_file: std::path::PathBuf,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    start_service_with(
        database_url,
        secret,
        data_dir,
        anchor_file,
        tenantry::configuration::Limits::off(),
    )
    .await
}

/// The same, with these rate limits.
pub async fn start_service_with(
    database_url: &str,
    secret: &str,
    data_dir: &Path,
    anchor_file: std::path::PathBuf,
    limits: tenantry::configuration::Limits,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    start_service_adjusted(database_url, secret, data_dir, anchor_file, |s| {
        s.limits = limits
    })
    .await
}

/// The same, with its settings changed by `adjust` (rate limits off).
pub async fn start_service_adjusted(
    database_url: &str,
    secret: &str,
    data_dir: &Path,
    anchor_file: std::path::PathBuf,
    adjust: impl FnOnce(&mut tenantry::configuration::Settings),
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    use tenantry::configuration::{DatabaseTarget, SecretString, Settings};
    let limits = tenantry::configuration::Limits::off();
    let mut settings = Settings {
        database: DatabaseTarget::Url(SecretString::new(database_url.to_owned())),
        data_dir: data_dir.to_path_buf(),
        bind: "127.0.0.1:0".parse().unwrap(),
        jwt_previous_secret: None,
        jwt_secret: Some(SecretString::new(secret.to_owned())),
        bcrypt_cost: 4,
        templates_dir: None,
        pool_size: Settings::from_env().map(|s| s.pool_size).unwrap_or(16),
        limits,
        client_timeout: Duration::from_secs(10),
        audit_anchor_file: anchor_file,
        maintenance_interval: Duration::from_secs(60),
        tenant_quota_bytes: 0,
        usage_interval: Settings::from_env().ok().and_then(|s| s.usage_interval),
        metrics_token: None,
        export_concurrency: 4,
        spare_roles: Settings::from_env().map(|s| s.spare_roles).unwrap_or(1000),
        spare_schemas: Settings::from_env().map(|s| s.spare_schemas).unwrap_or(100),
        router_roles: Settings::from_env().map(|s| s.router_roles).unwrap_or(8),
        citus_routing: Settings::from_env()
            .map(|s| s.citus_routing)
            .unwrap_or_default(),
        citus_refresh_interval: Settings::from_env()
            .map(|s| s.citus_refresh_interval)
            .unwrap_or(Some(Duration::from_secs(10))),
        extra_connections: 16,
        export_timeout: std::time::Duration::from_secs(600),
        statement_timeout: std::time::Duration::from_secs(5),
        mail: tenantry::configuration::MailSettings::new("http://127.0.0.1"),
        webhooks: Default::default(),
        tls: None,
    };
    adjust(&mut settings);
    let app = tenantry::startup::Application::build(settings)
        .await
        .unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    (address, tokio::spawn(app.run_until_stopped()))
}

/// One load run's figures.
#[derive(Debug)]
pub struct Run {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub backend_mb: f64,
    /// Answers that were errors (non-2xx) or never came (wrk's socket
    /// errors, timeouts included), where they are counted
    /// ([`Answers::Counted`]); 0 otherwise.
    pub errors: u64,
}

/// What a wrk run expects of the service's answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// Every answer a success; an error stops the benchmark.
    Success,
    /// Every answer an error (a 401 of an anonymous request); a success
    /// stops the benchmark.
    Refused,
    /// Errors are counted in [`Run::errors`] (a service under strain may
    /// time out a request).
    Counted,
}

/// A wrk Lua script: GET with a random one of `tokens` as the bearer.
pub fn wrk_script(tokens: &[String]) -> String {
    let mut lua = String::from("local tokens = {\n");
    for t in tokens {
        lua.push_str(&format!("  \"{t}\",\n"));
    }
    lua.push_str(
        "}\nmath.randomseed(os.time())\n\
         request = function()\n\
           local t = tokens[math.random(#tokens)]\n\
           return wrk.format(\"GET\", nil, {[\"Authorization\"] = \"Bearer \" .. t})\n\
         end\n\
         local bad = 0\n\
         response = function(status, headers, body)\n\
           if status ~= 200 then bad = bad + 1 end\n\
         end\n",
    );
    lua
}

/// wrk at `concurrency` against `address` + `path` for `seconds` (after a
/// 2-second warm-up), with the service's backends' memory at the end
/// (`superuser_url`: the database, as a superuser).
pub async fn run_wrk(
    wrk: &Path,
    lua: &Path,
    target: (&str, &str),
    concurrency: usize,
    seconds: u64,
    superuser_url: &str,
) -> Run {
    run_wrk_answered(
        wrk,
        lua,
        target,
        concurrency,
        seconds,
        superuser_url,
        Answers::Success,
    )
    .await
}

/// The same, expecting `answers`.
pub async fn run_wrk_answered(
    wrk: &Path,
    lua: &Path,
    (address, path): (&str, &str),
    concurrency: usize,
    seconds: u64,
    superuser_url: &str,
    answers: Answers,
) -> Run {
    // Warm the pool's connections first, as a running service would be.
    let _ = Command::new(wrk)
        .args(["-t2", &format!("-c{concurrency}"), "-d2s", "-s"])
        .arg(lua)
        .arg(format!("{address}{path}"))
        .output()
        .unwrap();
    let out = Command::new(wrk)
        .args([
            "-t2",
            &format!("-c{concurrency}"),
            &format!("-d{seconds}s"),
            "--latency",
            // A stalled request is measured, not dropped (wrk gives up
            // after 2 s by default and leaves it out of the latencies).
            "--timeout",
            "30s",
            "-s",
        ])
        .arg(lua)
        .arg(format!("{address}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |prefix: &str| -> u64 {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map_or(0, |rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            })
    };
    let errors = count("Non-2xx or 3xx responses:") + count("Socket errors:");
    if answers == Answers::Refused {
        let total = text
            .lines()
            .find_map(|l| l.trim().split_once(" requests in "))
            .map(|(n, _)| n.trim().to_owned());
        let errors = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .map(|n| n.trim().to_owned());
        assert_eq!(total, errors, "every answer should be refused:\n{text}");
    } else if answers == Answers::Success {
        assert!(
            !text.contains("Non-2xx"),
            "the service answered with errors:\n{text}"
        );
    }
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"));
    let percentile = |p: &str| -> f64 {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(|v| wrk_ms(v.trim()))
            .unwrap_or_else(|| panic!("no {p} in wrk's output:\n{text}"))
    };
    let backend_mb = backend_memory(superuser_url, "tenantry").await;
    Run {
        rate,
        p50_ms: percentile("50%"),
        p99_ms: percentile("99%"),
        backend_mb,
        errors: if answers == Answers::Counted {
            errors
        } else {
            0
        },
    }
}

/// wrk prints latencies as `812.00us`, `1.23ms` or `1.02s`.
fn wrk_ms(v: &str) -> f64 {
    let (number, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let x: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => x / 1000.0,
        "ms" => x,
        "s" => x * 1000.0,
        _ => f64::NAN,
    }
}

/// Where pgbench runs: the server binaries, the server (a socket dir or a
/// host), its port and the database.
pub struct PgTarget<'a> {
    pub bindir: &'a Path,
    pub host: String,
    pub port: u16,
    pub dbname: &'a str,
}

impl PgTarget<'_> {
    pub fn url(&self, user: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={}",
            self.host, self.port, self.dbname
        )
    }
}

/// pgbench with `sql` (`:tenants` set to `tenants`) as `user`, at
/// `concurrency`, for `seconds`, its sessions opened as `session` says.
pub async fn run_pgbench(
    pg: &PgTarget<'_>,
    work: &Path,
    sql: &str,
    tenants: usize,
    load: (usize, u64),
    user: &str,
    session: &Session<'_>,
) -> Run {
    try_run_pgbench(pg, work, sql, tenants, load, user, session)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The same, for a run that may fail (a client aborted by an error): the
/// error is pgbench's first error line.
pub async fn try_run_pgbench(
    pg: &PgTarget<'_>,
    work: &Path,
    sql: &str,
    tenants: usize,
    (concurrency, seconds): (usize, u64),
    user: &str,
    session: &Session<'_>,
) -> Result<Run, String> {
    let (bindir, host, port) = (pg.bindir, &pg.host, pg.port);
    let script = work.join("bench.sql");
    std::fs::write(&script, sql).unwrap();
    let logs = work.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    // pgbench writes its transaction logs into the current directory.
    let child = tokio::process::Command::new(bindir.join("pgbench"))
        .current_dir(&logs)
        .args(["-n", "-M", session.protocol, "-j", "2", "-l"])
        .arg(format!("-c{concurrency}"))
        .arg(format!("-T{seconds}"))
        .arg(format!("-Dtenants={tenants}"))
        .arg("-f")
        .arg(&script)
        .arg("-h")
        .arg(host)
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", user, pg.dbname])
        .args(session.connect_each.then_some("-C"))
        .env("PGOPTIONS", session.options)
        .env("PGSSLMODE", session.sslmode)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Its connections close when it exits: measure them a second before.
    tokio::time::sleep(Duration::from_secs(seconds.saturating_sub(1).max(1))).await;
    let backend_mb = backend_memory(&pg.url("postgres"), "pgbench").await;
    // A run whose sessions wait for a connection slot that never frees
    // (Citus's shared pool full of cached connections) does not end: it
    // is stopped and reported, not waited for.
    let out = match tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            return Err(format!(
                "pgbench stalled: still running 30 s after its {seconds} s run (stopped)"
            ))
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let errors = String::from_utf8_lossy(&out.stderr);
        let first = errors
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("pgbench failed");
        return Err(format!(
            "pgbench failed: {first}\n{text}\n{}",
            errors.lines().take(20).collect::<Vec<_>>().join("\n")
        ));
    }
    let rate: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{text}"));
    let mut latencies: Vec<f64> = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let body = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        latencies.extend(
            body.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter_map(|us| us.parse::<f64>().ok())
                .map(|us| us / 1000.0),
        );
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Ok(Run {
        rate,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        backend_mb,
        errors: 0,
    })
}

/// How pgbench's sessions are opened.
pub struct Session<'a> {
    /// `PGOPTIONS`: settings for every session (`-c name=value …`).
    pub options: &'a str,
    /// A new connection for every transaction (`pgbench -C`).
    pub connect_each: bool,
    /// `PGSSLMODE`.
    pub sslmode: &'a str,
    /// `pgbench -M`: `simple`, or `extended` (needed by `\startpipeline`).
    pub protocol: &'a str,
}

impl Session<'_> {
    /// Persistent sessions, server defaults, TLS only if the server offers it.
    pub const PLAIN: Session<'static> = Session {
        options: "",
        connect_each: false,
        sslmode: "prefer",
        protocol: "simple",
    };
}

/// Sum of the private memory of the client backends of `application`
/// (`tenantry`: the service's pool; `pgbench`) on the database (of this
/// machine's servers: on Citus, the coordinator's backends).
pub async fn backend_memory(superuser_url: &str, application: &str) -> f64 {
    let config: tokio_postgres::Config = superuser_url.parse().unwrap();
    let client = db::connect(&config).await.unwrap();
    let pids: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE backend_type = 'client backend' AND application_name = $1
               AND datname = current_database() AND pid <> pg_backend_pid()",
            &[&application],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut kb = 0u64;
    for pid in pids {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            for line in text.lines() {
                if line.starts_with("Private_Clean:") || line.starts_with("Private_Dirty:") {
                    kb += line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    kb as f64 / 1024.0
}

/// `program` on PATH.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.exists())
    })
}
