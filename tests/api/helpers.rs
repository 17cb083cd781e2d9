//! The test harness. The first test to need PostgreSQL starts a private
//! cluster (initdb + pg_ctl, via the product's own `embedded` module) in a
//! fresh temp dir on a free port; when run as root it runs as the `postgres`
//! OS user. A detached reaper stops it and deletes the dir when this test
//! process exits, so runs never collide and nothing is left behind. Every
//! test gets its own database.
//!
//! With `TENANTRY_TEST_CITUS=1` (`scripts/test-citus`) the same tests run on
//! a Citus cluster instead: a coordinator and two workers started by
//! `scripts/citus-cluster` in a temp dir (stopped and removed by a reaper in
//! the same way), and each test's database is made on every node, with the
//! extension, the workers registered and the service role on every node.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::LazyLock;

use serde_json::Value;
use tenantry::configuration::{DatabaseTarget, SecretString, Settings};
use tenantry::embedded::{Cluster, Running};
use tenantry::startup::Application;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const PASSWORD: &str = "a perfectly fine password";

pub struct TestCluster {
    pub cluster: Cluster,
    pub running: Running,
}

pub static CLUSTER: LazyLock<TestCluster> = LazyLock::new(start_cluster);

/// Files of this test run's services (audit anchors), removed after the run.
static RUN_DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = temp_dir("tenantry-test-run");
    spawn_reaper(&dir);
    dir
});

/// A Citus cluster for the whole run (`TENANTRY_TEST_CITUS=1`).
pub struct CitusCluster {
    /// The coordinator's port, then the workers' (all on 127.0.0.1).
    pub coordinator: u16,
    pub workers: Vec<u16>,
}

/// The Citus cluster when this run is on Citus, else `None`.
pub static CITUS: LazyLock<Option<CitusCluster>> = LazyLock::new(|| {
    (std::env::var("TENANTRY_TEST_CITUS").as_deref() == Ok("1")).then(start_citus)
});

/// Whether this run is on Citus.
pub fn on_citus() -> bool {
    CITUS.is_some()
}

fn start_citus() -> CitusCluster {
    let dir = temp_dir("tenantry-test-citus");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/citus-cluster");
    // Every test database runs Citus's maintenance daemon on every node, a
    // background worker each.
    let out = Command::new(&script)
        .args(["start", dir.to_str().unwrap()])
        .env(
            "TENANTRY_CITUS_CONF",
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_worker_processes = 400\nmax_connections = 600",
        )
        .output()
        .expect("run scripts/citus-cluster");
    // Stop the nodes and delete the dir once this process is gone.
    let reaper = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        "$3" stop "$2"
        rm -rf "$2"
    "#;
    spawn_detached(reaper, &[dir.as_os_str(), script.as_os_str()]);
    assert!(
        out.status.success(),
        "scripts/citus-cluster start failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("PORTS="))
        .map(|p| {
            p.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .expect("the nodes' ports");
    let citus = CitusCluster {
        coordinator: ports[0],
        workers: ports[1..].to_vec(),
    };
    // A template database with the extension on every node (creating the
    // extension takes a second a node; copying a template, a fraction). No
    // connections to it, Citus's daemon's included, so it can be copied.
    let nodes: Vec<u16> = std::iter::once(citus.coordinator)
        .chain(citus.workers.iter().copied())
        .collect();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                for port in nodes {
                    let admin = connect_to(port, "postgres").await;
                    admin
                        .batch_execute(&format!("CREATE DATABASE {CITUS_TEMPLATE}"))
                        .await
                        .expect("create the template database");
                    connect_to(port, CITUS_TEMPLATE)
                        .await
                        .batch_execute("CREATE EXTENSION citus")
                        .await
                        .expect("create extension citus");
                    admin
                        .batch_execute(&format!(
                            "ALTER DATABASE {CITUS_TEMPLATE} ALLOW_CONNECTIONS false;
                             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                             WHERE datname = '{CITUS_TEMPLATE}'"
                        ))
                        .await
                        .expect("close the template database");
                }
            })
    })
    .join()
    .expect("prepare the template databases");
    citus
}

const CITUS_TEMPLATE: &str = "citus_template";

/// A superuser connection to a node of the Citus cluster.
/// A superuser connection to `db_name` on one node of the Citus cluster.
pub async fn connect_to_node(port: u16, db_name: &str) -> tokio_postgres::Client {
    connect_to(port, db_name).await
}

async fn connect_to(port: u16, db_name: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = node_url(port, db_name, "postgres").parse().unwrap();
    tenantry::db::connect(&config).await.expect("connect")
}

/// A fresh temp dir that the server's OS user can traverse, deleted once
/// this process is gone ([`REAP_LIST`]).
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .recursive(true)
        .create(&dir)
        .expect("create temp dir");
    use std::io::Write;
    let mut list = std::fs::OpenOptions::new()
        .append(true)
        .open(&*REAP_LIST)
        .expect("open the reap list");
    writeln!(list, "{}", dir.display()).expect("write the reap list");
    dir
}

/// The temp dirs this process made, one per line, and the one reaper that
/// deletes them after the process is gone (started with the first temp
/// dir, before any test runs). A dir whose cluster still runs is left to
/// its own [`spawn_reaper`], which stops the cluster first.
static REAP_LIST: LazyLock<PathBuf> = LazyLock::new(|| {
    let list = std::env::temp_dir().join(format!("tenantry-reap-{}.list", std::process::id()));
    std::fs::write(&list, "").expect("create the reap list");
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        while IFS= read -r d; do
            if [ ! -e "$d/pgdata/postmaster.pid" ]; then rm -rf "$d"; fi
        done < "$2"
        rm -f "$2"
    "#;
    spawn_detached(script, &[list.as_os_str()]);
    list
});

fn start_cluster() -> TestCluster {
    let dir = temp_dir("tenantry-test");
    let cluster = Cluster::open(&dir).expect("open test cluster");
    // Durability is not what these tests test; speed is welcome.
    let running = cluster
        .ensure_running(&[
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("max_connections", "400"),
        ])
        .expect("start test cluster");
    spawn_reaper(&dir);
    TestCluster { cluster, running }
}

/// Stop the cluster under `dir` (if any) and delete `dir` once this process
/// is gone.
// The reaper must outlive this process, so nobody waits for it.
#[allow(clippy::zombie_processes)]
pub fn spawn_reaper(dir: &Path) {
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        pid=$(head -n 1 "$2/pgdata/postmaster.pid" 2>/dev/null)
        if [ -n "$pid" ]; then kill -INT "$pid" 2>/dev/null; fi
        i=0
        while [ -e "$2/pgdata/postmaster.pid" ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
        rm -rf "$2"
    "#;
    spawn_detached(script, &[dir.as_os_str()]);
}

/// Run the shell `script` with this process's id and `args` as `$1`, `$2`,
/// …, detached: it outlives this process.
// The script must outlive this process, so nobody waits for it.
#[allow(clippy::zombie_processes)]
fn spawn_detached(script: &str, args: &[&std::ffi::OsStr]) {
    Command::new("sh")
        .args(["-c", script, "reaper"])
        .arg(std::process::id().to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn reaper");
}

/// A superuser connection string for a database of the test cluster (the
/// tests' own view, for arranging and asserting).
pub fn db_url(db_name: &str) -> String {
    url_as(db_name, "postgres")
}

/// What the service connects as in tests: the database's owner, a
/// non-superuser role with LOGIN and CREATEROLE (the documented setup).
pub fn service_url(db_name: &str) -> String {
    url_as(db_name, &service_role(db_name))
}

pub fn service_role(db_name: &str) -> String {
    format!("{db_name}_svc")
}

fn url_as(db_name: &str, user: &str) -> String {
    if let Some(citus) = &*CITUS {
        return node_url(citus.coordinator, db_name, user);
    }
    let c = &*CLUSTER;
    format!(
        "host={} port={} user={user} dbname={db_name}",
        c.running.socket_dir.display(),
        c.running.port
    )
}

pub async fn connect(db_name: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = db_url(db_name).parse().unwrap();
    tenantry::db::connect(&config).await.expect("connect")
}

/// A connection as the test database's service role.
pub async fn connect_as_service(db_name: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = service_url(db_name).parse().unwrap();
    tenantry::db::connect(&config).await.expect("connect")
}

fn node_url(port: u16, db_name: &str, user: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname={db_name}")
}

/// A new, empty database, owned by its own non-superuser service role.
pub async fn create_database() -> String {
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    if let Some(citus) = &*CITUS {
        create_citus_database(citus, &name).await;
        return name;
    }
    let admin = connect("postgres").await;
    let svc = service_role(&name);
    admin
        .batch_execute(&format!("CREATE ROLE {svc} LOGIN CREATEROLE"))
        .await
        .expect("create service role");
    admin
        .batch_execute(&format!("CREATE DATABASE {name} OWNER {svc}"))
        .await
        .expect("create database");
    name
}

/// The database on every node (roles and databases are per node), the
/// extension in each, the workers registered with the coordinator, which
/// holds no tenant shards: what `scripts/citus-cluster` does for its
/// `tenantry` database.
async fn create_citus_database(citus: &CitusCluster, name: &str) {
    // One at a time: adding a node copies every role to it, and must not
    // meet another test's role being created there.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let svc = service_role(name);
    let nodes = std::iter::once(&citus.coordinator).chain(&citus.workers);
    futures::future::join_all(nodes.map(|&port| {
        let svc = svc.clone();
        async move {
            let admin = connect_to(port, "postgres").await;
            for sql in [
                format!("CREATE ROLE {svc} LOGIN CREATEROLE"),
                format!("CREATE DATABASE {name} OWNER {svc} TEMPLATE {CITUS_TEMPLATE}"),
            ] {
                admin
                    .batch_execute(&sql)
                    .await
                    .expect("create the service role and database");
            }
        }
    }))
    .await;
    let coordinator = connect(name).await;
    coordinator
        .execute(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            &[&i32::from(citus.coordinator)],
        )
        .await
        .expect("set the coordinator host");
    for &port in &citus.workers {
        coordinator
            .execute(
                "SELECT citus_add_node('127.0.0.1', $1)",
                &[&i32::from(port)],
            )
            .await
            .expect("add a worker");
    }
}

pub struct TestApp {
    pub address: String,
    pub db_name: String,
    pub api: reqwest::Client,
}

pub fn test_settings(db_name: &str) -> Settings {
    Settings {
        database: DatabaseTarget::Url(SecretString::new(service_url(db_name))),
        // Its own, for the mail written as files.
        data_dir: RUN_DIR.join(format!("data-{db_name}")),
        bind: "127.0.0.1:0".parse().unwrap(),
        jwt_previous_secret: None,
        jwt_secret: Some(SecretString::new(JWT_SECRET.into())),
        bcrypt_cost: 4,
        templates_dir: None,
        pool_size: 20,
        // Tests create many accounts from one address: limits are turned on
        // by the tests of the limits.
        limits: tenantry::configuration::Limits::off(),
        client_timeout: std::time::Duration::from_secs(10),
        audit_anchor_file: RUN_DIR.join(format!("anchors-{db_name}")),
        maintenance_interval: std::time::Duration::from_secs(3600),
        // Usage is measured by the tests of usage, on demand.
        tenant_quota_bytes: 0,
        usage_interval: None,
        metrics_token: None,
        export_concurrency: 4,
        // Spares are made by the tests of spares (tests/api/spares.rs):
        // roles belong to the whole test cluster, and a stock made by
        // every test's service would outlive its database.
        spare_roles: 0,
        spare_schemas: 0,
        router_roles: 0,
        citus_routing: Default::default(),
        citus_refresh_interval: Some(std::time::Duration::from_secs(10)),
        extra_connections: 16,
        export_timeout: std::time::Duration::from_secs(600),
        statement_timeout: std::time::Duration::from_secs(5),
        mail: tenantry::configuration::MailSettings::new("http://127.0.0.1"),
        webhooks: tenantry::configuration::WebhookSettings {
            backoff: std::time::Duration::from_millis(50),
            ..Default::default()
        },
        tls: None,
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let db_name = create_database().await;
    let mut settings = test_settings(&db_name);
    adjust(&mut settings);
    spawn_app_on(settings, db_name).await
}

/// Start the service on an existing database (a restart, say).
pub async fn spawn_app_on(settings: Settings, db_name: String) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        // The service's log on stdout (shown for failing tests).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let app = Application::build(settings).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        db_name,
        api: reqwest::Client::new(),
    }
}

impl TestApp {
    /// `name`'s access token from a login with [`PASSWORD`] (which must
    /// succeed).
    pub async fn access_token(&self, name: &str) -> String {
        let response = self
            .post_json(
                "/api/auth/login",
                &serde_json::json!({"username": name, "password": PASSWORD}),
            )
            .await;
        assert_eq!(response.status(), 200, "{name} logs in");
        json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The owner of `token` erases their account with [`PASSWORD`] (which
    /// must succeed).
    pub async fn erase_self(&self, token: &str) {
        let erased = self
            .call(reqwest::Method::DELETE, "/api/me", token)
            .json(&serde_json::json!({ "password": PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(erased.status(), 200);
    }

    /// Start a fleet run over HTTP as `admin` (202) and follow it until it
    /// is no longer running: its last report.
    /// `POST /admin/fleet/migrations` with `body`: 202, and the run's id.
    pub async fn start_fleet_run(&self, admin: &str, body: Value) -> i64 {
        let started = self
            .call(reqwest::Method::POST, "/admin/fleet/migrations", admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), 202);
        json(started).await["run_id"].as_i64().unwrap()
    }

    pub async fn fleet_run_over_http(&self, admin: &str) -> Value {
        let run_id = self.start_fleet_run(admin, serde_json::json!({})).await;
        let report = || async {
            json(
                self.call(
                    reqwest::Method::GET,
                    &format!("/admin/fleet/migrations/{run_id}"),
                    admin,
                )
                .send()
                .await
                .unwrap(),
            )
            .await
        };
        until("the fleet run ends", || async {
            report().await["status"] != "running"
        })
        .await;
        report().await
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.db_name).await
    }

    /// The single `bigint` a counting query returns.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// [`TestApp::count`] summed over every node of a Citus cluster (a
    /// request routed straight to a worker runs there), else the same.
    pub async fn count_on_every_node(&self, sql: &str) -> i64 {
        let mut total = self.count(sql).await;
        if let Some(citus) = CITUS.as_ref() {
            for &port in &citus.workers {
                let n: i64 = connect_to(port, &self.db_name)
                    .await
                    .query_one(sql, &[])
                    .await
                    .unwrap()
                    .get(0);
                total += n;
            }
        }
        total
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.api
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .expect("request")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.api
            .post(format!("{}{path}", self.address))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// [`TestApp::register`], sent from a task of its own: for a signup
    /// the test holds up and then lets go.
    pub fn register_in_background(
        &self,
        username: &str,
    ) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
        let signup = self
            .api
            .post(format!("{}/api/auth/register", self.address))
            .json(&serde_json::json!({
                "username": username,
                "email": format!("{username}@example.com"),
                "password": PASSWORD,
            }))
            .send();
        tokio::spawn(signup)
    }

    pub async fn register(&self, username: &str) -> reqwest::Response {
        self.post_json(
            "/api/auth/register",
            &serde_json::json!({
                "username": username,
                "email": format!("{}@example.com", username.trim().to_lowercase()),
                "password": PASSWORD,
            }),
        )
        .await
    }

    /// Register `username` and return its access token.
    pub async fn token(&self, username: &str) -> String {
        let response = self.register(username).await;
        assert_eq!(response.status(), 201, "register {username}");
        json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// A request with `token` as the bearer.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.api
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(token)
    }

    /// How many tenant schemas exist in this database.
    pub async fn schema_count(&self) -> i64 {
        self.count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenant\\_%'")
            .await
    }

    /// This database's installation id.
    pub async fn installation_id(&self) -> String {
        self.db()
            .await
            .query_one("SELECT id FROM tenantry.installation", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// The installation's role prefix (`tnt_<id>_`).
    pub async fn role_prefix(&self) -> String {
        format!("tnt_{}_", self.installation_id().await)
    }

    /// The status of `POST /api/auth/refresh` with `token` (a JSON value as
    /// signup and login return it).
    pub async fn refresh_status(&self, token: &Value) -> u16 {
        self.post_json(
            "/api/auth/refresh",
            &serde_json::json!({ "refresh_token": token }),
        )
        .await
        .status()
        .as_u16()
    }

    /// Users, tenant registry rows and tenant schemas, which must agree.
    pub async fn tenant_counts(&self) -> (i64, i64, i64) {
        tenant_counts(&self.db().await).await
    }

    /// How many tenant roles of this installation exist.
    pub async fn tenant_role_count(&self) -> i64 {
        let prefix = self.role_prefix().await;
        self.db()
            .await
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1) AND rolname <> $1 || '_tenants'",
                &[&prefix],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Tenant roles of this installation that nothing names: neither a
    /// tenant (registry), a Citus head start nor a spare.
    pub async fn stray_role_count(&self) -> i64 {
        self.count(
            "SELECT count(*) FROM pg_roles r, tenantry.installation i
             WHERE starts_with(r.rolname, 'tnt_' || i.id || '_')
               AND r.rolname <> 'tnt_' || i.id || '__tenants'
               AND NOT starts_with(r.rolname, 'tnt_' || i.id || '__r')
               AND NOT EXISTS (SELECT FROM tenantry.tenants t WHERE t.role_name = r.rolname)
               AND NOT EXISTS (SELECT FROM tenantry.pending_tenants p WHERE p.role_name = r.rolname)
               AND NOT EXISTS (SELECT FROM tenantry.spare_roles s WHERE s.role_name = r.rolname)",
        )
        .await
    }

    /// `username`'s tenant role, from the registry.
    pub async fn role_of(&self, username: &str) -> String {
        role_in(&self.db_name, username).await
    }

    /// The spare tenant roles (`tenancy::spares`), sorted.
    pub async fn spare_roles(&self) -> Vec<String> {
        self.db()
            .await
            .query("SELECT role_name FROM tenantry.spare_roles ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn user_count(&self) -> i64 {
        self.count("SELECT count(*) FROM tenantry.users").await
    }
}

/// `username`'s tenant role in database `db_name`, from the registry.
pub async fn role_in(db_name: &str, username: &str) -> String {
    connect(db_name)
        .await
        .query_one(
            "SELECT role_name FROM tenantry.tenants WHERE username = $1",
            &[&username],
        )
        .await
        .unwrap()
        .get(0)
}

/// Users, tenant registry rows and tenant schemas in `client`'s database
/// (not the spares' schemas, `tenant__s…`).
pub async fn tenant_counts(client: &tokio_postgres::Client) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM tenantry.users), (SELECT count(*) FROM tenantry.tenants),
                    (SELECT count(*) FROM pg_namespace
                     WHERE nspname LIKE 'tenant\\_%' AND nspname NOT LIKE 'tenant\\_\\_%')",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A free loopback port (for a process that binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn json(response: reqwest::Response) -> Value {
    response.json().await.expect("a JSON body")
}

/// Run the `tenantry` binary with a clean environment plus `env`.
pub async fn tenantry(
    args: &[&str],
    env: &[(&str, String)],
    stdin: Option<&str>,
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("BCRYPT_COST", "4")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tenantry");
    {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            // A command that fails before reading its stdin closes the pipe.
            let _ = pipe.write_all(input.as_bytes()).await;
        }
    }
    child.wait_with_output().await.expect("run tenantry")
}

/// `tenantry serve` as a process of its own on `db` (to be stopped with a
/// signal), with `env` besides the CLI's; it and its base URL, once up.
pub async fn serve_process(db: &str, env: &[(&str, String)]) -> (tokio::process::Child, String) {
    serve_process_logging(db, env, std::process::Stdio::null()).await
}

/// [`serve_process`] with its log (standard error) to `log`.
pub async fn serve_process_logging(
    db: &str,
    env: &[(&str, String)],
    log: std::process::Stdio,
) -> (tokio::process::Child, String) {
    let port = free_port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(cli_env(db))
        .env("TENANTRY_BIND", format!("127.0.0.1:{port}"))
        .env("TENANTRY_RATE_LIMIT_AUTH", "0")
        .env("BCRYPT_COST", "4")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let api = reqwest::Client::new();
    until("serve is up", || {
        let url = format!("{base}/health/live");
        let api = api.clone();
        async move { api.get(url).send().await.is_ok() }
    })
    .await;
    (child, base)
}

/// The CLI's environment for `db_name` with templates whose V2 sleeps 2 s,
/// published (publishing builds a tenant from nothing, which sleeps too):
/// a signup then stays inside its transaction long enough to be killed
/// there, its role, schema and V1 tables made.
pub async fn slow_signup_env(db_name: &str) -> (Vec<(&'static str, String)>, PathBuf) {
    let templates = templates_dir_with(&[("V2__slow.sql", "SELECT pg_sleep(2);")]);
    let mut env = cli_env(db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    let published = tenantry(&["templates", "publish"], &env, None).await;
    assert!(published.status.success(), "{}", stderr(&published));
    (env, templates)
}

/// `tenantry tenants create NAME` as a process of its own, the password
/// on its stdin: for a test that kills it mid-signup.
pub async fn spawn_tenants_create(env: &[(&str, String)], name: &str) -> tokio::process::Child {
    let email = format!("{name}@example.com");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args(["tenants", "create", name, "--email", &email])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .env("BCRYPT_COST", "4")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(PASSWORD.as_bytes()).await.unwrap();
    drop(stdin);
    child
}

/// The backend of `admin`'s database that runs `pg_sleep(2)` (a slow
/// template), once one does ([`until`]).
pub async fn sleeping_backend(admin: &tokio_postgres::Client) -> i32 {
    let pid = std::cell::Cell::new(0);
    until("a backend runs the slow template", || async {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                 AND query LIKE '%pg_sleep(2)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.map(|r| pid.set(r.get(0))).is_some()
    })
    .await;
    pid.get()
}

/// Wait until backend `pid` has ended ([`until`]): a killed client's
/// transaction stays open, and invisible, until then.
pub async fn backend_ended(admin: &tokio_postgres::Client, pid: i32) {
    until("the killed client's backend ends", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
}

/// The environment for the CLI against a test database.
pub fn cli_env(db_name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", service_url(db_name)),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        // As `test_settings`: spares only where a test asks for them.
        ("TENANTRY_SPARE_ROLES", "0".to_string()),
        ("TENANTRY_SPARE_SCHEMAS", "0".to_string()),
        ("TENANTRY_ROUTER_ROLES", "0".to_string()),
    ]
}

pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A templates directory holding the built-in V1 plus the given files.
pub fn templates_dir_with(files: &[(&str, &str)]) -> PathBuf {
    let dir = temp_dir("tenantry-templates");
    spawn_reaper(&dir);
    let v1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_templates/V1__experiences.sql");
    std::fs::copy(v1, dir.join("V1__experiences.sql")).unwrap();
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    dir
}

/// The versions in a schema's history.
pub async fn history_of(app: &TestApp, schema: &str) -> Vec<i32> {
    app.db()
        .await
        .query(
            &format!("SELECT version FROM \"{schema}\".refinery_schema_history ORDER BY 1"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The version the built-in templates end at: what new tenants get.
pub fn latest_version() -> i32 {
    tenantry::templates::TemplateSet::builtin()
        .expect("the built-in templates load")
        .latest()
        .get()
}

/// The history a tenant at `version` has: 1, 2, …, `version`.
pub fn versions_up_to(version: i32) -> Vec<i32> {
    (1..=version).collect()
}

/// A templates directory holding every built-in template plus the given
/// files: what an admin has after adding a version.
pub fn builtin_templates_with(files: &[(&str, &str)]) -> PathBuf {
    let dir = temp_dir("tenantry-templates");
    spawn_reaper(&dir);
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_templates");
    for entry in std::fs::read_dir(builtin).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).unwrap();
    }
    dir
}

/// The versions of the files in `system_migrations/`.
pub fn system_migrations() -> Vec<u32> {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/system_migrations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| name.strip_prefix('V')?.split("__").next()?.parse().ok())
        .collect()
}

/// Wait until `check` holds: an event the test cannot trigger itself (a
/// background sender, a process starting), polled, failing after 30 s.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// The mail the service wrote as a file into `dir` (no SMTP server) whose
/// name ends in `-<kind>.eml`, once it is there (30 s at most).
pub async fn mail_file(dir: &Path, kind: &str) -> String {
    let suffix = format!("-{kind}.eml");
    let find = || -> Option<String> {
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.ends_with(&suffix) && !name.starts_with('.'))
                .then(|| std::fs::read_to_string(e.path()).unwrap())
        })
    };
    until(&format!("a {kind} mail under {}", dir.display()), || {
        std::future::ready(find().is_some())
    })
    .await;
    find().unwrap()
}

/// An admin's access token: `tenantry admin create` and a login.
pub async fn admin_token(app: &TestApp) -> String {
    let out = tenantry(
        &["admin", "create", "ops", "--email", "ops@example.com"],
        &cli_env(&app.db_name),
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let login = app
        .post_json(
            "/api/auth/login",
            &serde_json::json!({"username": "ops", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status(), 200);
    json(login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Status and body of a request with `token` (null when empty; any other
/// body must be JSON).
pub async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app.call(method, path, token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, body)
}
