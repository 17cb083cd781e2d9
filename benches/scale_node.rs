//! Ten thousand tenants on one node (issue 28): what the service's signups,
//! its routed reads and a session's first `SET ROLE` cost as the fleet
//! grows, on plain PostgreSQL with the embedded default settings.
//!
//! 1. Signups through the real service over HTTP (`POST /api/auth/register`,
//!    4 clients, bcrypt cost 4, rate limits off, a non-superuser service
//!    role), in blocks of 500 up to N; after each service block the same
//!    number of tenants provisioned raw on a second private cluster: the
//!    built-in templates' SQL that the service runs for a new schema (the
//!    baseline, `B5`, and any version after it), with its role, schema,
//!    grants, history and registry row, one transaction per tenant as a superuser,
//!    4 sessions (a superuser needs no membership to act as a role). The
//!    two sides take turns which goes first. Printed: each side's rate per
//!    block, their ratio, and the first `SET ROLE` of a new session as what
//!    the request pool logs in as (a tenant's router, `db::routers`, or the
//!    service without routers) after the block.
//! 2. Each service tenant holds a quick summary; `wrk` (8 connections)
//!    drives `GET /api/summaries/quick` for a random tenant, once beside a
//!    stream of 2 signups/s to warm the pool's backends, then quiet and
//!    beside the stream, each of these three started with the service's
//!    stock of spare schemas full; then at once beside the stream again,
//!    the stock now drawn down towards the mark from which it is built
//!    under load (`tenancy::spares`): throughput, p50/p99, errors, their
//!    ratios, and the streams' signup latencies.
//!    The same on the raw side, for the baseline: `pgbench` (8 sessions,
//!    as a superuser) enters a random raw tenant's schema and role and
//!    reads its summaries, quiet and beside 2 raw signups/s: what the
//!    signups' DDL alone takes from the reads on this machine.
//! 3. With every tenant in place: a new session's first `SET ROLE` as the
//!    service role right after a signup, its next one, and the first one of
//!    a session that was warm before the signup (what every pooled
//!    connection paid after each signup before spare roles); then a new
//!    session's first as a tenant's router, what the pool pays now.
//!
//! No thresholds: the figures are for reading side by side.
//!
//! Usage: `cargo bench --bench scale_node -- [N] [SECONDS]` (defaults
//! 10000 and 30), or `scripts/bench-scale-node [N] [SECONDS]`. With
//! `SCALE_NODE_KEEP=DIR` the service's cluster stays in DIR, and a later
//! run with the same N starts the service on it and measures phases 2 and
//! 3 only (about two minutes instead of twenty): to try a change against a
//! large fleet. `SCALE_NODE_PG="name=value,…"` adds server settings
//! (`log_min_duration_statement=20`, say).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::load::{run_wrk_answered, start_service, which, wrk_script, Answers, Run};
use common::{bench_db, record, record_fact, BenchDb, Better};
use futures::stream::{self, StreamExt};
use tenantry::auth::{JwtKeys, Role, Subject};
use tenantry::db;
use tenantry::domain::{RoleName, Username};
use tenantry::templates::TemplateSet;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-01";
const BLOCK: usize = 500;
const CLIENTS: usize = 4;
const WRK_CONNECTIONS: usize = 8;
const SIGNUPS_PER_SECOND: u64 = 2;
const ROUNDS: usize = 5;
const PASSWORD: &str = "a perfectly fine password";

/// This run's random id: the names it signs up are unique across runs on a
/// kept fleet.
fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned())
}

/// Whether the fleet is new or kept from an earlier run (`SCALE_NODE_KEEP`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fleet {
    New,
    Kept,
}

/// The service side: its address, its role's connection settings, the
/// database as a superuser.
struct Service {
    address: String,
    http: reqwest::Client,
    role: tokio_postgres::Config,
    superuser: tokio_postgres::Config,
    superuser_url: String,
}

/// The raw side: a second cluster, its sessions and the SQL per tenant.
struct Raw {
    bench: BenchDb,
    sessions: Vec<tokio_postgres::Client>,
    templates_sql: String,
    version: i32,
}

#[tokio::main]
async fn main() {
    // The service's errors (a refused signup's cause) go to stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let n: usize = common::arg(0, "N", 10_000);
    let seconds: u64 = common::arg(1, "SECONDS", 30);
    let wrk = which("wrk").expect("wrk is not installed (scripts/bench-scale-node installs it)");

    // SCALE_NODE_KEEP=DIR keeps the service's cluster in DIR after the run;
    // a later run with the same N starts from it, skipping phase 1 and the
    // raw side (to try a change of the service against a large fleet in a
    // minute). SCALE_NODE_PG="name=value,…" adds server settings.
    let keep = std::env::var_os("SCALE_NODE_KEEP").map(std::path::PathBuf::from);
    let fleet = if keep.as_ref().is_some_and(|dir| dir.join("ready").exists()) {
        Fleet::Kept
    } else {
        Fleet::New
    };
    let extra = std::env::var("SCALE_NODE_PG").unwrap_or_default();
    let settings: Vec<(&str, &str)> = extra
        .split(',')
        .filter_map(|setting| setting.split_once('='))
        .collect();
    let bench = match &keep {
        Some(dir) => common::bench_db_in(dir.clone(), &settings).await,
        None => bench_db("scale-node", &settings).await,
    };
    let service = start(&bench, fleet).await;
    let version: String = db::connect(&service.superuser)
        .await
        .unwrap()
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    record_fact("scale-node", "postgres", &version);
    record_fact(
        "scale-node",
        "size",
        &format!("{n} tenants, blocks of {BLOCK}, {seconds} s per read run"),
    );
    println!("PostgreSQL {version}, embedded default settings; {n} tenants\n");

    if fleet == Fleet::Kept {
        println!(
            "(the fleet kept in {}: phase 1 and the raw side skipped)\n",
            bench.dir.display()
        );
        reads(&service, &bench, &wrk, n, seconds).await;
    } else {
        let raw = raw_side().await;
        let started = Instant::now();
        let seeding = signups(&service, &raw, n).await;
        println!(
            "(phase 1 took {:.0} s, giving the tenants their rows {:.0} s of it)\n",
            started.elapsed().as_secs_f64(),
            seeding.as_secs_f64()
        );
        reads(&service, &bench, &wrk, n, seconds).await;
        raw_reads(&raw, n, seconds).await;
        raw.bench.cluster.stop().unwrap();
        let _ = std::fs::remove_dir_all(&raw.bench.dir);
    }
    first_set_role(&service).await;

    bench.cluster.stop().unwrap();
    match keep {
        Some(dir) => std::fs::write(dir.join("ready"), n.to_string()).unwrap(),
        None => {
            let _ = std::fs::remove_dir_all(&bench.dir);
        }
    }
}

/// The service's own database and non-superuser role (as in production),
/// bootstrapped with the built-in templates published; the service on it.
async fn start(bench: &BenchDb, fleet: Fleet) -> Service {
    if fleet == Fleet::New {
        common::service_database(bench, "node").await;
    }
    let socket = bench.running.socket_dir.display();
    let port = bench.running.port;
    let service_url = format!("host={socket} port={port} user=node_svc dbname=node");
    let superuser_url = format!("host={socket} port={port} user=postgres dbname=node");
    let role: tokio_postgres::Config = service_url.parse().unwrap();
    let mut boot = db::connect(&role).await.unwrap();
    let (installation, _) = db::bootstrap(&mut boot).await.unwrap();
    if fleet == Fleet::New {
        common::builtin_published(&boot, &installation).await;
    }
    let anchors = bench.dir.join("audit-anchors");
    let (address, _server) = start_service(&service_url, SECRET, &bench.dir, anchors).await;
    Service {
        address,
        http: reqwest::Client::new(),
        role,
        superuser: superuser_url.parse().unwrap(),
        superuser_url,
    }
}

/// A second private cluster with a bootstrapped database (the templates
/// may refer to its shared objects) and [`CLIENTS`] superuser sessions.
async fn raw_side() -> Raw {
    let bench = bench_db("scale-node-raw", &[]).await;
    bench
        .boot
        .batch_execute(
            "CREATE TABLE public.raw_registry (schema_name text PRIMARY KEY,
             template_version int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        sessions.push(bench.target.connect().await.unwrap().into_client());
    }
    let set = TemplateSet::builtin().unwrap();
    // What the service runs for a new schema: the baseline, if any, and
    // the versions after it.
    let templates_sql = set
        .to_build(set.latest())
        .iter()
        .map(|t| t.sql())
        .collect::<Vec<_>>()
        .join("\n;\n");
    Raw {
        version: set.latest().get(),
        bench,
        sessions,
        templates_sql,
    }
}

fn username(i: usize) -> Username {
    Username::parse(&format!("node{i}")).unwrap()
}

/// Phase 1: signups per block through the service and raw, side by side.
/// Returns the time spent seeding the tenants' rows between blocks.
async fn signups(service: &Service, raw: &Raw, n: usize) -> Duration {
    println!(
        "signups per block of {BLOCK}: the service over HTTP ({CLIENTS} clients, bcrypt cost 4, limits off) \
         and raw (the same SQL, {CLIENTS} superuser sessions, second cluster)"
    );
    println!(
        "{:>8} | {:>11} {:>9} {:>12} | {:>24} {:>5}",
        "tenants", "service /s", "raw /s", "service/raw", "first SET ROLE ms (pool)", "5xx"
    );
    let mut first_role = None;
    let (mut svc_rates, mut raw_rates) = (Vec::new(), Vec::new());
    let (mut svc_total, mut raw_total) = (Duration::ZERO, Duration::ZERO);
    let mut seeding = Duration::ZERO;
    let mut refused_total = 0;
    let mut made = 0;
    while made < n {
        let block = made..(made + BLOCK).min(n);
        let size = block.len() as f64;
        let ((svc, refused), raw_time) = if svc_rates.len() % 2 == 0 {
            let svc = service_block(service, block.clone()).await;
            (svc, raw_block(raw, block.clone()).await)
        } else {
            let raw_time = raw_block(raw, block.clone()).await;
            (service_block(service, block.clone()).await, raw_time)
        };
        refused_total += refused;
        svc_total += svc;
        raw_total += raw_time;
        let t = Instant::now();
        seed(service, block.clone()).await;
        seeding += t.elapsed();
        let mut role_times = Vec::new();
        if first_role.is_none() {
            first_role = Some(role_of(service, &username(0)).await);
        }
        let first_role = first_role.as_ref().expect("the first block's");
        let (login, _) = pool_login(service, &username(0)).await;
        for _ in 0..3 {
            let session = db::connect(&login).await.unwrap();
            role_times.push(set_role(&session, first_role).await);
        }
        let role_ms = median_ms(&mut role_times);
        let (svc_rate, raw_rate) = (size / svc.as_secs_f64(), size / raw_time.as_secs_f64());
        println!(
            "{:>8} | {svc_rate:>11.1} {raw_rate:>9.1} {:>12.2} | {role_ms:>24.2} {refused:>5}",
            block.end,
            svc_rate / raw_rate
        );
        svc_rates.push(svc_rate);
        raw_rates.push(raw_rate);
        made = block.end;
    }
    let ratio = |rates: &[f64]| rates[rates.len() - 1] / rates[0];
    let (svc_ratio, raw_ratio) = (ratio(&svc_rates), ratio(&raw_rates));
    println!(
        "{:>8} | {svc_ratio:>11.2} {raw_ratio:>9.2} {:>12} |",
        "last/1st", ""
    );
    println!(
        "{:>8} | {:>10.0}s {:>8.0}s {:>12.2} | (whole run: {:.1} and {:.1} signups/s; {refused_total} attempts refused with a 5xx, each tried again)\n",
        "total",
        svc_total.as_secs_f64(),
        raw_total.as_secs_f64(),
        raw_total.as_secs_f64() / svc_total.as_secs_f64(),
        n as f64 / svc_total.as_secs_f64(),
        n as f64 / raw_total.as_secs_f64()
    );
    record(
        "scale-node",
        "signup rate, last block / first block",
        "×",
        Better::Higher,
        svc_ratio,
        ("raw, same templates", raw_ratio),
    );
    record(
        "scale-node",
        &format!("signups up to {n} tenants"),
        "tenants/s",
        Better::Higher,
        n as f64 / svc_total.as_secs_f64(),
        ("raw, same templates", n as f64 / raw_total.as_secs_f64()),
    );
    seeding
}

/// Sign up `block`'s users through the service, [`CLIENTS`] at a time:
/// the time, and how many attempts the service refused with a 5xx.
async fn service_block(service: &Service, block: std::ops::Range<usize>) -> (Duration, usize) {
    let t = Instant::now();
    let refused = stream::iter(block)
        .map(|i| sign_up_surely(service, format!("node{i}")))
        .buffer_unordered(CLIENTS)
        .map(|(_, refused)| refused)
        .collect::<Vec<_>>()
        .await;
    (t.elapsed(), refused.iter().sum())
}

/// A signup's failure, with the service's word: a 5xx, which leaves no
/// account (a signup is complete or absent), or a 409 (taken: made by an
/// attempt before).
struct Refused(reqwest::StatusCode, String);

/// One signup over HTTP; its time. A 5xx or 409 is returned; any other
/// answer but a 201 stops the benchmark.
async fn sign_up(http: &reqwest::Client, address: &str, name: &str) -> Result<Duration, Refused> {
    let t = Instant::now();
    let response = http
        .post(format!("{address}/api/auth/register"))
        .json(&serde_json::json!({
            "username": name,
            "email": format!("{name}@example.com"),
            "password": PASSWORD,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    if status == reqwest::StatusCode::CREATED {
        return Ok(t.elapsed());
    }
    let body = response.text().await.unwrap_or_default();
    if status.is_server_error() || status == reqwest::StatusCode::CONFLICT {
        return Err(Refused(status, format!("{status}: {body}")));
    }
    panic!("the signup of {name} answered {status}: {body}");
}

/// A signup that must happen: tried again after a 5xx (up to 5 times; a
/// 409 then says an attempt made it after all); the last attempt's time and
/// how many were refused.
async fn sign_up_surely(service: &Service, name: String) -> (Duration, usize) {
    let mut refused = 0;
    loop {
        match sign_up(&service.http, &service.address, &name).await {
            Ok(time) => return (time, refused),
            Err(Refused(reqwest::StatusCode::CONFLICT, _)) if refused > 0 => {
                return (Duration::ZERO, refused)
            }
            Err(Refused(status, why)) if status.is_server_error() && refused < 5 => {
                eprintln!("the signup of {name} was refused ({why}); again in a second");
                refused += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(Refused(_, why)) => panic!("the signup of {name} failed: {why}"),
        }
    }
}

/// Provision `block`'s tenants raw, on [`CLIENTS`] sessions.
async fn raw_block(raw: &Raw, block: std::ops::Range<usize>) -> Duration {
    let next = AtomicUsize::new(block.start);
    let group = raw.bench.installation.group_role();
    let t = Instant::now();
    futures::future::join_all(raw.sessions.iter().map(|session| {
        let (next, group, end) = (&next, &group, block.end);
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                session
                    .batch_execute(&raw_sql(raw, i, group))
                    .await
                    .unwrap();
            }
        }
    }))
    .await;
    t.elapsed()
}

/// The service's work for one tenant sent raw in one transaction: role,
/// schema with grants, history table, the templates as the role, history
/// rows, registry row, group membership. Names are generated here.
fn raw_sql(raw: &Raw, i: usize, group: &RoleName) -> String {
    format!(
        "BEGIN; CREATE ROLE raw_{i}_r NOLOGIN; CREATE SCHEMA raw_{i};
         GRANT USAGE, CREATE ON SCHEMA raw_{i} TO raw_{i}_r;
         CREATE TABLE raw_{i}.refinery_schema_history (version int4 PRIMARY KEY,
             name varchar(255), applied_on varchar(255), checksum varchar(255));
         SET LOCAL search_path TO raw_{i}; SET LOCAL ROLE raw_{i}_r;\n{sql}\n; RESET ROLE;
         INSERT INTO raw_{i}.refinery_schema_history
             SELECT v, 'v', now()::text, '0' FROM generate_series(1, {v}) v;
         INSERT INTO public.raw_registry (schema_name, template_version) VALUES ('raw_{i}', {v});
         GRANT {g} TO raw_{i}_r; COMMIT;",
        sql = raw.templates_sql,
        v = raw.version,
        g = group.quoted(),
    )
}

/// Give `block`'s tenants their rows (a quick summary among them), on a
/// connection of its own (a backend keeps every table it touched).
async fn seed(service: &Service, block: std::ops::Range<usize>) {
    let client = db::connect(&service.superuser).await.unwrap();
    let block: Vec<usize> = block.collect();
    for chunk in block.chunks(50) {
        let sql: String = chunk
            .iter()
            .map(|&i| common::load::seed_sql(&username(i).schema(), i))
            .collect();
        client.batch_execute(&sql).await.unwrap();
    }
}

/// A tenant's role, from the registry (a spare's name carries no username).
async fn role_of(service: &Service, username: &Username) -> RoleName {
    let client = db::connect(&service.role).await.unwrap();
    let name: String = client
        .query_one(
            "SELECT role_name FROM tenantry.tenants WHERE username = $1",
            &[&username.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    RoleName::parse(&name).unwrap()
}

/// What the request pool's sessions for `username`'s tenant log in as: its
/// router (`db::routers`), or the service without routers. With the
/// router's name, or "service".
async fn pool_login(service: &Service, username: &Username) -> (tokio_postgres::Config, String) {
    let admin = db::connect(&service.superuser).await.unwrap();
    let row = admin
        .query_one(
            "SELECT i.id, i.routers, t.user_id FROM tenantry.installation i, tenantry.tenants t
             WHERE t.username = $1",
            &[&username.as_str()],
        )
        .await
        .unwrap();
    let (id, routers, user): (String, i32, uuid::Uuid) = (row.get(0), row.get(1), row.get(2));
    let router = tenantry::db::routers::router_of(user, routers as usize) as i32;
    let login = admin
        .query_opt(
            "SELECT password FROM tenantry.router_logins WHERE router = $1 AND $2 > 0",
            &[&router, &routers],
        )
        .await
        .unwrap();
    match login {
        Some(login) => {
            let (name, password): (String, String) = (format!("tnt_{id}__r{router}"), login.get(0));
            let mut config = service.role.clone();
            config.user(&name);
            config.password(password);
            (config, name)
        }
        None => (service.role.clone(), "service".into()),
    }
}

/// `SET ROLE role; RESET ROLE` on `session`: its time in ms.
async fn set_role(session: &tokio_postgres::Client, role: &RoleName) -> f64 {
    let t = Instant::now();
    session
        .batch_execute(&format!("SET ROLE {}; RESET ROLE", role.quoted()))
        .await
        .unwrap();
    t.elapsed().as_secs_f64() * 1000.0
}

fn median_ms(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The times of a stream's signups that were made, shortest first.
fn made_sorted(signups: &[Result<Duration, Refused>]) -> Vec<Duration> {
    let mut made: Vec<Duration> = signups
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .copied()
        .collect();
    made.sort();
    made
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    let at = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[at].as_secs_f64() * 1000.0
}

/// Phase 2: routed reads quiet and beside a signup stream.
async fn reads(service: &Service, bench: &BenchDb, wrk: &std::path::Path, n: usize, seconds: u64) {
    let admin = db::connect(&service.superuser).await.unwrap();
    admin.batch_execute("CHECKPOINT").await.unwrap();
    // Signed now, not at signup: access tokens live 15 minutes, and the
    // signups may take longer than that.
    let keys = JwtKeys::new(SECRET.as_bytes());
    let rows = admin
        .query(
            "SELECT user_id, username, schema_name, role_name FROM tenantry.tenants
             WHERE username ~ '^node[0-9]+$'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), n, "every signup made a tenant");
    let tokens: Vec<String> = rows
        .iter()
        .map(|row| {
            keys.issue(&Subject {
                user_id: row.get("user_id"),
                username: row.get("username"),
                schema: Some(row.get("schema_name")),
                db_role: Some(row.get("role_name")),
                role: Role::User,
                generation: 0,
                session: None,
            })
            .unwrap()
        })
        .collect();
    let lua = bench.dir.join("tokens.lua");
    std::fs::write(&lua, wrk_script(&tokens)).unwrap();
    let read = || {
        run_wrk_answered(
            wrk,
            &lua,
            (&service.address, "/api/summaries/quick"),
            WRK_CONNECTIONS,
            seconds,
            &service.superuser_url,
            Answers::Counted,
        )
    };
    // Reads beside a signup stream: the reads and the signups.
    let beside_signups = || async {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stream = tokio::spawn(signup_stream(
            service.http.clone(),
            service.address.clone(),
            stopped,
        ));
        let run = read().await;
        stop.send(()).unwrap();
        (run, stream.await.unwrap())
    };
    // The pool's tenant connections are new after the signups (which ran
    // on the service's own), and a backend's first read of a tenant builds
    // its caches; the service's own connections are new too: one run first,
    // beside signups, to warm both as a service taking signups has them,
    // so that quiet and beside compare the same state.
    // When each run starts, on stderr: to find it in the server's log.
    let mark = |run: &str| eprintln!("{} {run}", chrono::Utc::now().format("%H:%M:%S%.3f"));
    // The service builds its stock of spare schemas in the background
    // (`tenancy::spares`); the reads are measured with it full, as in a
    // service that has been up a while.
    let built = || async {
        let row = admin
            .query_one(
                "SELECT count(schema_name), count(*) FROM tenantry.spare_roles",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let target: i64 = std::env::var("TENANTRY_SPARE_SCHEMAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // Each run but the last starts with the stock full: since the builder
    // waits for a quiet moment while a quarter or more of the stock is
    // built, a stream shorter than the stock's worth of signups runs no
    // template DDL beside the reads, and the last run shows one that has
    // drawn the stock down to that mark.
    let full = |when: &'static str| async move {
        let waited = Instant::now();
        mark("spare schemas");
        loop {
            let (ready, spares) = built().await;
            if ready >= target.min(spares) || waited.elapsed() > Duration::from_secs(900) {
                println!(
                    "(spare schemas built {when}: {ready}, after {:.0} s)",
                    waited.elapsed().as_secs_f64()
                );
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    full("before the reads").await;
    mark("warm-up");
    let (warm, _) = beside_signups().await;
    full("before the quiet run").await;
    mark("quiet");
    let quiet = read().await;
    // Whether a batch of spare roles commits during the run (one per ~500
    // signups; it resets every session's membership list): said with
    // the figures, which it changes.
    let newest_spare = || async {
        admin
            .query_one(
                "SELECT coalesce(max(made_at), '-infinity')::text FROM tenantry.spare_roles",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = newest_spare().await;
    let (built_before, _) = built().await;
    mark("beside");
    let (beside, signups) = beside_signups().await;
    let (built_after, _) = built().await;
    // On at once: a stream that outlasts the stock.
    mark("beside, the stock drawn down");
    let (sustained, sustained_signups) = beside_signups().await;
    mark("end");
    let (built_last, _) = built().await;
    let batch: i64 = admin
        .query_one(
            "SELECT count(*) FROM tenantry.spare_roles WHERE made_at > $1::text::timestamptz",
            &[&before],
        )
        .await
        .unwrap()
        .get(0);
    let refused: Vec<&str> = signups
        .iter()
        .filter_map(|s| s.as_ref().err().map(|Refused(_, why)| why.as_str()))
        .collect();
    let latencies = made_sorted(&signups);

    println!(
        "routed reads: GET /api/summaries/quick for a random one of {n} tenants, wrk {WRK_CONNECTIONS} connections, {seconds} s"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>8}",
        "run", "req/s", "p50 ms", "p99 ms", "errors"
    );
    let line = |label: &str, run: &Run| {
        println!(
            "{label:<28} {:>9.0} {:>9.2} {:>9.2} {:>8}",
            run.rate, run.p50_ms, run.p99_ms, run.errors
        )
    };
    line("warm-up beside signups", &warm);
    line("quiet", &quiet);
    line(&format!("beside {SIGNUPS_PER_SECOND} signups/s"), &beside);
    line("the same, stock drawn down", &sustained);
    if quiet.errors + beside.errors + sustained.errors > 0 {
        println!(
            "(errors were answered too, fast: their runs' req/s overstate and their latencies \
             understate what the service served; the cause is on stderr)"
        );
    }
    let against_quiet = |label: &str, run: &Run| {
        println!(
            "{label:<28} {:>9.2} {:>9.2} {:>9.2}",
            run.rate / quiet.rate,
            run.p50_ms / quiet.p50_ms,
            run.p99_ms / quiet.p99_ms
        )
    };
    against_quiet("beside / quiet", &beside);
    if latencies.is_empty() {
        println!("signups in the stream: none made");
    } else {
        println!(
            "signups in the stream: {} made, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            latencies.len(),
            percentile_ms(&latencies, 0.50),
            percentile_ms(&latencies, 0.99),
            percentile_ms(&latencies, 1.0)
        );
    }
    println!("  (spare schemas built: {built_before} before the run, {built_after} after)");
    against_quiet("drawn down / quiet", &sustained);
    let made = made_sorted(&sustained_signups);
    if !made.is_empty() {
        println!(
            "signups in that stream: {} made, p50 {:.0} ms, p99 {:.0} ms; spare schemas built: {built_after} before, {built_last} after",
            made.len(),
            percentile_ms(&made, 0.50),
            percentile_ms(&made, 0.99),
        );
    }
    if batch > 0 {
        println!("  (a batch of spare roles committed during the run: {batch} made)");
    }
    match refused.first() {
        None => println!(),
        Some(why) => println!("  and {} refused (the first: {why})\n", refused.len()),
    }
    record(
        "scale-node",
        &format!("routed reads beside {SIGNUPS_PER_SECOND} signups/s: throughput"),
        "req/s",
        Better::Higher,
        beside.rate,
        ("quiet", quiet.rate),
    );
    record(
        "scale-node",
        &format!("routed reads beside {SIGNUPS_PER_SECOND} signups/s: p99 latency"),
        "ms",
        Better::Lower,
        beside.p99_ms,
        ("quiet", quiet.p99_ms),
    );
    record(
        "scale-node",
        &format!(
            "routed reads beside {SIGNUPS_PER_SECOND} signups/s, spare stock drawn down: p99 latency"
        ),
        "ms",
        Better::Lower,
        sustained.p99_ms,
        ("quiet", quiet.p99_ms),
    );
}

/// Phase 2's baseline: routed reads on the raw side (a superuser entering
/// a random raw tenant's schema and role, transaction-locally, then its
/// read), quiet and beside raw signups at [`SIGNUPS_PER_SECOND`].
async fn raw_reads(raw: &Raw, n: usize, seconds: u64) {
    use common::load::{run_pgbench, PgTarget, Session};
    let pg = PgTarget {
        bindir: raw.bench.cluster.bindir(),
        host: raw.bench.running.socket_dir.display().to_string(),
        port: raw.bench.running.port,
        dbname: "bench",
    };
    let sql = "\\set i random(0, :tenants - 1)
BEGIN;
SELECT set_config('search_path', 'raw_' || :i, true), set_config('role', 'raw_' || :i || '_r', true);
SELECT kind, content FROM summaries WHERE kind = 'quick';
COMMIT;
";
    let work = raw.bench.dir.join("raw-reads");
    std::fs::create_dir_all(&work).unwrap();
    let read = || {
        run_pgbench(
            &pg,
            &work,
            sql,
            n,
            (WRK_CONNECTIONS, seconds),
            "postgres",
            &Session::PLAIN,
        )
    };
    // Warmed first, as the service's.
    let _ = read().await;
    let quiet = read().await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let group = raw.bench.installation.group_role();
    let session = &raw.sessions[0];
    let stream = async {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / SIGNUPS_PER_SECOND));
        let mut made = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    session.batch_execute(&raw_sql(raw, n + made, &group)).await.unwrap();
                    made += 1;
                }
                _ = &mut stopped => break,
            }
        }
        made
    };
    let beside = async {
        let run = read().await;
        stop.send(()).unwrap();
        run
    };
    let (beside, made) = futures::join!(beside, stream);
    println!(
        "raw baseline: a superuser enters a random raw tenant and reads (pgbench, {WRK_CONNECTIONS} sessions, {seconds} s)"
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "run", "tx/s", "p50 ms", "p99 ms"
    );
    for (label, run) in [
        ("quiet".to_string(), &quiet),
        (format!("beside {made} raw signups"), &beside),
    ] {
        println!(
            "{label:<28} {:>9.0} {:>9.2} {:>9.2}",
            run.rate, run.p50_ms, run.p99_ms
        );
    }
    println!(
        "{:<28} {:>9.2} {:>9.2} {:>9.2}\n",
        "beside / quiet",
        beside.rate / quiet.rate,
        beside.p50_ms / quiet.p50_ms,
        beside.p99_ms / quiet.p99_ms
    );
    record(
        "scale-node",
        &format!("raw routed reads beside {SIGNUPS_PER_SECOND} raw signups/s: throughput"),
        "tx/s",
        Better::Higher,
        beside.rate,
        ("quiet", quiet.rate),
    );
}

/// Signups at [`SIGNUPS_PER_SECOND`] on a fixed schedule (one does not
/// wait for the one before) until `stop`; each one's latency or refusal.
async fn signup_stream(
    http: reqwest::Client,
    address: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Result<Duration, Refused>> {
    let service = std::sync::Arc::new((http, address));
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / SIGNUPS_PER_SECOND));
    let mut in_flight = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Unique across streams and runs on a kept fleet.
                static MADE: AtomicUsize = AtomicUsize::new(0);
                let name = format!("stream{}x{}", run_id(), MADE.fetch_add(1, Ordering::Relaxed));
                let service = service.clone();
                in_flight.push(tokio::spawn(async move {
                    let (http, address) = &*service;
                    sign_up(http, address, &name).await
                }));
            }
            _ = &mut stop => break,
        }
    }
    let mut signups = Vec::new();
    for signup in in_flight {
        signups.push(signup.await.unwrap());
    }
    signups
}

/// Phase 3: the first `SET ROLE` after a signup.
async fn first_set_role(service: &Service) {
    let admin = db::connect(&service.superuser).await.unwrap();
    let memberships: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_auth_members WHERE member = 'node_svc'::regrole",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let role = role_of(service, &username(0)).await;
    let (mut first, mut next, mut warm_after) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let warm = db::connect(&service.role).await.unwrap();
        set_role(&warm, &role).await;
        sign_up_surely(service, format!("late{}x{round}", run_id())).await;
        let fresh = db::connect(&service.role).await.unwrap();
        first.push(set_role(&fresh, &role).await);
        next.push(set_role(&fresh, &role).await);
        warm_after.push(set_role(&warm, &role).await);
    }
    let (first, next, warm_after) = (
        median_ms(&mut first),
        median_ms(&mut next),
        median_ms(&mut warm_after),
    );
    println!(
        "SET ROLE as the service role ({memberships} memberships), right after a signup (median of {ROUNDS}):"
    );
    println!("  a new session's first   {first:>9.2} ms");
    println!("  its next                {next:>9.3} ms");
    println!("  a warm session's first  {warm_after:>9.2} ms  (what each pooled connection paid after each signup before spares)");
    // What the request pool's sessions log in as with router roles.
    let (login, name) = pool_login(service, &username(0)).await;
    if name != "service" {
        let router_memberships: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_auth_members WHERE member = $1::text::regrole",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        let mut first_router = Vec::new();
        for round in 0..ROUNDS {
            sign_up_surely(service, format!("later{}x{round}", run_id())).await;
            let fresh = db::connect(&login).await.unwrap();
            first_router.push(set_role(&fresh, &role).await);
        }
        let first_router = median_ms(&mut first_router);
        println!(
            "SET ROLE as the tenant's router {name} ({router_memberships} memberships), what a new pooled session pays:"
        );
        println!("  a new session's first   {first_router:>9.2} ms");
        record(
            "scale-node",
            "first SET ROLE of a new pooled session (router)",
            "ms",
            Better::Lower,
            first_router,
            ("as the service", first),
        );
    }
    record(
        "scale-node",
        "first SET ROLE of a new session after a signup",
        "ms",
        Better::Lower,
        first,
        ("the next SET ROLE", next),
    );
}
