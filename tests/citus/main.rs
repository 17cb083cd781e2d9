//! The Citus suite: Tenantry on a real Citus cluster (a coordinator and two
//! workers started by `scripts/citus-cluster` into a temp dir, stopped and
//! removed afterwards). Without Citus installed it says so and passes,
//! unless `TENANTRY_REQUIRE_CITUS=1` (as `.ci/run` sets), when that is a
//! failure. Its own harness: one cluster, the checks in order, each a
//! function that panics on failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::Method;
use serde_json::{json, Value};
use tenantry::configuration::{DatabaseTarget, Limits, SecretString, Settings};
use tenantry::startup::Application;

const PASSWORD: &str = "correct horse battery";

struct Citus {
    dir: PathBuf,
    /// The coordinator, as its superuser.
    url: String,
    /// Worker ports.
    workers: Vec<u16>,
}

impl Citus {
    fn start() -> Citus {
        let dir = std::env::temp_dir().join(format!("tenantry-citus-{}", std::process::id()));
        let out = Command::new(script())
            .args(["start", dir.to_str().unwrap()])
            .output()
            .expect("run scripts/citus-cluster");
        assert!(
            out.status.success(),
            "scripts/citus-cluster start failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let url = stdout
            .lines()
            .find_map(|l| l.strip_prefix("DATABASE_URL="))
            .expect("the cluster's DATABASE_URL")
            .to_owned();
        let workers = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PORTS="))
            .map(|p| {
                p.split_whitespace()
                    .skip(1)
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .expect("the workers' ports");
        Citus { dir, url, workers }
    }

    async fn coordinator(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    async fn worker(&self, port: u16) -> tokio_postgres::Client {
        connect(&format!("postgres://postgres@127.0.0.1:{port}/tenantry")).await
    }
}

impl Drop for Citus {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/citus-cluster")
}

/// The server's message of an error.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// Whether the local PostgreSQL has Citus (`citus.so` in its library dir).
fn citus_installed() -> bool {
    let pg_config = ["pg_config"].into_iter().map(PathBuf::from).chain(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("bin/pg_config")),
    );
    pg_config.into_iter().any(|bin| {
        Command::new(&bin)
            .arg("--pkglibdir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("citus.so"))
            .is_some_and(|lib| lib.exists())
    })
}

struct App {
    address: String,
    api: reqwest::Client,
}

impl App {
    async fn start(citus: &Citus) -> App {
        let settings = Settings {
            database: DatabaseTarget::Url(SecretString::new(citus.url.clone())),
            data_dir: citus.dir.clone(),
            bind: "127.0.0.1:0".parse().unwrap(),
            jwt_previous_secret: None,
            jwt_secret: Some(SecretString::new(
                "a-test-secret-of-enough-length-0123456789".into(),
            )),
            bcrypt_cost: 4,
            templates_dir: None,
            pool_size: 10,
            limits: Limits::off(),
            client_timeout: std::time::Duration::from_secs(10),
            audit_anchor_file: citus.dir.join("anchors"),
            maintenance_interval: std::time::Duration::from_secs(3600),
            tenant_quota_bytes: 0,
            usage_interval: None,
            metrics_token: None,
            export_concurrency: 4,
            spare_roles: 0,
            spare_schemas: 0,
            router_roles: 8,
            citus_routing: Default::default(),
            citus_refresh_interval: Some(std::time::Duration::from_secs(10)),
            extra_connections: 16,
            export_timeout: std::time::Duration::from_secs(600),
            statement_timeout: std::time::Duration::from_secs(5),
            mail: tenantry::configuration::MailSettings::new("http://127.0.0.1"),
            webhooks: Default::default(),
            tls: None,
        };
        let app = Application::build(settings)
            .await
            .expect("build the app on Citus");
        let address = format!("http://127.0.0.1:{}", app.port());
        tokio::spawn(app.run_until_stopped());
        App {
            address,
            api: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .api
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn register(&self, name: &str) -> String {
        let (status, body) = self
            .send(
                Method::POST,
                "/api/auth/register",
                "",
                Some(json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD})),
            )
            .await;
        assert_eq!(status, 201, "register {name}: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }
}

type Check = for<'a> fn(&'a Citus, &'a App) -> futures::future::LocalBoxFuture<'a, ()>;

#[tokio::main]
async fn main() {
    if !citus_installed() {
        if std::env::var("TENANTRY_REQUIRE_CITUS").as_deref() == Ok("1") {
            eprintln!(
                "the Citus suite must run (TENANTRY_REQUIRE_CITUS=1) but Citus is not installed"
            );
            std::process::exit(1);
        }
        eprintln!(
            "\nNOTE: the Citus suite did NOT run: Citus is not installed into the local PostgreSQL \
             (../shared/citus/install.sh here; .ci/run installs it).\n"
        );
        return;
    }
    let citus = Citus::start();
    let app = App::start(&citus).await;
    let checks: [(&str, Check); 12] = [
        (
            "bootstrap makes reference tables Citus reference tables and records the mode",
            |c, a| Box::pin(bootstrap_on_citus(c, a)),
        ),
        ("each signup is a distributed schema on a worker", |c, a| {
            Box::pin(signups_are_distributed_schemas(c, a))
        }),
        (
            "a tenant's role reads no other tenant's shard, on any node",
            |c, a| Box::pin(isolation_on_every_node(c, a)),
        ),
        (
            "erasure removes schema, shards and role on every node",
            |c, a| Box::pin(erasure_on_every_node(c, a)),
        ),
        (
            "a signup killed at its last statement leaves nothing on any node",
            |c, a| Box::pin(killed_signup_leaves_nothing(c, a)),
        ),
        (
            "an export reads the tenant's shards in one snapshot",
            |c, a| Box::pin(export_from_the_workers(c, a)),
        ),
        ("fleet migrate reaches every tenant's shards", |c, a| {
            Box::pin(fleet_migrate_on_citus(c, a))
        }),
        (
            "cluster status shows where tenants are and tenants move moves one",
            |c, a| Box::pin(status_and_move(c, a)),
        ),
        (
            "cluster rebalance evens out tenants piled on one worker",
            |c, a| Box::pin(rebalance_evens_out(c, a)),
        ),
        (
            "admins see the cluster and move a tenant over HTTP",
            |c, a| Box::pin(admin_http_on_citus(c, a)),
        ),
        (
            "a move waits for a migration or erasure holding the tenant; a tenant being erased is not moved",
            |c, a| Box::pin(moves_respect_the_tenant_lock(c, a)),
        ),
        (
            "a worker down: its tenants get 503 node_unavailable, the others only 200s, health names it, all back without a restart",
            |c, a| Box::pin(a_worker_down(c, a)),
        ),
    ];
    let mut failed = 0;
    for (name, check) in checks {
        let outcome =
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(check(&citus, &app)))
                .await;
        match outcome {
            Ok(()) => println!("citus: {name} ... ok"),
            Err(_) => {
                println!("citus: {name} ... FAILED");
                failed += 1;
            }
        }
    }
    drop(app);
    drop(citus);
    if failed > 0 {
        eprintln!("{failed} Citus check(s) failed");
        std::process::exit(1);
    }
}

async fn bootstrap_on_citus(citus: &Citus, _app: &App) {
    let db = citus.coordinator().await;
    let mode: String = db
        .query_one("SELECT mode FROM tenantry.installation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "citus");
    // `serve` asked for 8 router roles (`db::routers`): on Citus, where
    // Citus reaches the workers as the current role, it makes none.
    let routers: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_roles r, tenantry.installation i
             WHERE starts_with(r.rolname, 'tnt_' || i.id || '__r') OR i.routers <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(routers, 0, "no router roles on Citus");
    let not_reference: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'reference' AND c.relkind = 'r'
               AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p
                               WHERE p.logicalrelid = c.oid AND p.partmethod = 'n' AND p.repmodel = 't')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        not_reference, 0,
        "every reference table is a Citus reference table"
    );
    let distributed_control_plane: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'tenantry'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        distributed_control_plane, 0,
        "the control plane stays on the coordinator"
    );
    // Every worker has all of the reference data, in its copy.
    let rows: i64 = db
        .query_one("SELECT count(*) FROM reference.skills", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0);
    for &port in &citus.workers {
        let shard: String = db
            .query_one(
                "SELECT shard_name::text FROM citus_shards
                 WHERE table_name = 'reference.skills'::regclass AND nodeport = $1",
                &[&i32::from(port)],
            )
            .await
            .unwrap()
            .get(0);
        let worker = citus.worker(port).await;
        let copied: i64 = worker
            .query_one(&format!("SELECT count(*) FROM {shard}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(copied, rows, "reference.skills on worker {port}");
    }
}

async fn signups_are_distributed_schemas(citus: &Citus, app: &App) {
    let mut tokens = Vec::new();
    for name in ["ada", "bob", "cyd", "dee"] {
        tokens.push(app.register(name).await);
    }
    let db = citus.coordinator().await;
    let rows = db
        .query(
            "SELECT s.schema_name::text, array_agg(DISTINCT sh.nodeport) AS ports
             FROM citus_shards sh JOIN pg_dist_schema d ON true
             JOIN LATERAL (SELECT d.schemaid::regnamespace::text AS schema_name) s ON true
             WHERE sh.table_name::text LIKE s.schema_name || '.%'
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let schemas: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        schemas,
        ["tenant_ada", "tenant_bob", "tenant_cyd", "tenant_dee"]
    );
    let mut used = std::collections::BTreeSet::new();
    for row in &rows {
        let ports: Vec<i32> = row.get(1);
        assert_eq!(
            ports.len(),
            1,
            "a tenant's tables live on one node: {ports:?}"
        );
        assert!(
            citus.workers.contains(&(ports[0] as u16)),
            "tenant shards are on workers, not the coordinator: {ports:?}"
        );
        used.insert(ports[0]);
    }
    assert_eq!(used.len(), 2, "new tenants spread over both workers");

    // Routed reads and writes, the reference data joined on the worker.
    let t = &tokens[0];
    let (status, _) = app
        .send(
            Method::PUT,
            "/api/summaries/quick",
            t,
            Some(json!({"content": "hello from a worker"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .send(
            Method::POST,
            "/api/experiences",
            t,
            Some(json!({"title": "Engineer", "organization": "Acme", "started_on": "2020-01-01", "industry_code": "51"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, page) = app
        .send(Method::GET, "/api/experiences?q=engineer", t, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"][0]["title"], "Engineer");
    let (status, summary) = app.send(Method::GET, "/api/summaries/quick", t, None).await;
    assert_eq!(status, 200);
    assert_eq!(summary["content"], "hello from a worker");
    let (status, reference) = app
        .send(Method::GET, "/api/reference/industries?q=51", t, None)
        .await;
    assert_eq!(status, 200);
    assert!(!reference["items"].as_array().unwrap().is_empty());
}

async fn isolation_on_every_node(citus: &Citus, app: &App) {
    let _ = app;
    let db = citus.coordinator().await;
    let role = |name: &str| {
        let name = name.to_owned();
        let db = &db;
        async move {
            let r: String = db
                .query_one(
                    "SELECT role_name FROM tenantry.tenants WHERE username = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            r
        }
    };
    let (ada, bob) = (role("ada").await, role("bob").await);
    // On the coordinator: refused before any worker is contacted.
    let tx_sql =
        format!("BEGIN; SET LOCAL ROLE \"{bob}\"; SELECT count(*) FROM tenant_ada.summaries;");
    let err = db.batch_execute(&tx_sql).await.unwrap_err();
    assert!(message(&err).contains("permission denied"), "{err:?}");
    db.batch_execute("ROLLBACK").await.unwrap();
    // On the worker that holds ada's shards, as bob's role: refused too.
    let row = db
        .query_one(
            "SELECT nodeport, shard_name::text FROM citus_shards
             WHERE table_name = 'tenant_ada.summaries'::regclass",
            &[],
        )
        .await
        .unwrap();
    let (port, shard): (i32, String) = (row.get(0), row.get(1));
    let worker = citus.worker(port as u16).await;
    let own: i64 = worker
        .query_one(&format!("SELECT count(*) FROM {shard}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(own, 1, "the superuser sees ada's summary on the worker");
    let err = worker
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE \"{bob}\"; SELECT count(*) FROM {shard};"
        ))
        .await
        .unwrap_err();
    assert!(message(&err).contains("permission denied"), "{err:?}");
    worker.batch_execute("ROLLBACK").await.unwrap();
    // ada's own role reads it there.
    worker
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE \"{ada}\"; SELECT count(*) FROM {shard}; ROLLBACK;"
        ))
        .await
        .unwrap();
}

async fn erasure_on_every_node(citus: &Citus, app: &App) {
    let db = citus.coordinator().await;
    let token = app.register("eve").await;
    let role: String = db
        .query_one(
            "SELECT role_name FROM tenantry.tenants WHERE username = 'eve'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (status, receipt) = app
        .send(
            Method::DELETE,
            "/api/me",
            &token,
            Some(json!({"password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 200, "{receipt}");
    for url in std::iter::once(citus.url.clone()).chain(
        citus
            .workers
            .iter()
            .map(|p| format!("postgres://postgres@127.0.0.1:{p}/tenantry")),
    ) {
        let node = connect(&url).await;
        let left: i64 = node
            .query_one(
                "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_eve')
                      + (SELECT count(*) FROM pg_roles WHERE rolname = $1)
                      + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = 'tenant_eve')",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "nothing of eve is left on {url}");
    }
    let shards: i64 = db
        .query_one(
            "SELECT count(*) FROM citus_shards WHERE table_name::text LIKE 'tenant_eve.%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shards, 0);
}

/// Nothing of `name` anywhere: registry, schema, role, tables, shards.
async fn assert_absent(citus: &Citus, name: &str) {
    let db = citus.coordinator().await;
    let registry: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM tenantry.users WHERE username = $1)
                  + (SELECT count(*) FROM tenantry.tenants WHERE username = $1)
                  + (SELECT count(*) FROM citus_shards WHERE table_name::text LIKE 'tenant_' || $1 || '.%')",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(registry, 0, "no registry row or shard of {name}");
    let schema = format!("tenant_{name}");
    let role_pattern = format!("tnt\\_%\\_{name}");
    for url in std::iter::once(citus.url.clone()).chain(
        citus
            .workers
            .iter()
            .map(|p| format!("postgres://postgres@127.0.0.1:{p}/tenantry")),
    ) {
        let node = connect(&url).await;
        let left: i64 = node
            .query_one(
                "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = $1)
                      + (SELECT count(*) FROM pg_roles WHERE rolname LIKE $2)
                      + (SELECT count(*) FROM pg_prepared_xacts)",
                &[&schema, &role_pattern],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            left, 0,
            "nothing of {name} (schema, role, prepared transaction) on {url}"
        );
    }
}

async fn killed_signup_leaves_nothing(citus: &Citus, app: &App) {
    // Hold the audit chain's head: the signup's last statement (after its
    // schema was distributed) waits on it; then its backend is killed.
    let mut holder = citus.coordinator().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM tenantry.audit_head FOR UPDATE", &[])
        .await
        .unwrap();
    let signup = {
        let api = app.api.clone();
        let url = format!("{}/api/auth/register", app.address);
        tokio::spawn(async move {
            api.post(url)
                .json(&json!({"username": "kim", "email": "kim@example.com", "password": PASSWORD}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let db = citus.coordinator().await;
    let mut waiting = None;
    for _ in 0..200 {
        let row = db
            .query_opt(
                "SELECT a.pid FROM pg_stat_activity a
                 WHERE a.wait_event_type = 'Lock' AND a.query LIKE '%audit%'
                   AND a.pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            waiting = Some(row.get::<_, i32>(0));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = waiting.expect("the signup reached its last statement and waits there");
    let distributed: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks l WHERE l.pid = $1 AND l.granted",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(distributed > 0, "the signup holds its DDL's locks");
    db.execute("SELECT pg_terminate_backend($1::int4)", &[&pid])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let status = signup.await.unwrap().unwrap();
    assert!(status >= 500, "the killed signup failed ({status})");
    // Citus resolves what the dead coordinator backend left on the workers.
    db.execute("SELECT recover_prepared_transactions()", &[])
        .await
        .unwrap();
    assert_absent(citus, "kim").await;
    // And the name can be used: nothing of the first attempt is in the way.
    app.register("kim").await;
}

async fn export_from_the_workers(_citus: &Citus, app: &App) {
    let (status, login) = app
        .send(
            Method::POST,
            "/api/auth/login",
            "",
            Some(json!({"username": "ada", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 200);
    let token = login["access_token"].as_str().unwrap();
    let response = app
        .api
        .get(format!("{}/api/me/export", app.address))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).expect("a whole JSON document");
    assert!(
        text.contains("hello from a worker"),
        "the summary is in the export"
    );
    assert!(doc.get("integrity").is_some(), "with its integrity trailer");
}

async fn fleet_migrate_on_citus(citus: &Citus, app: &App) {
    use std::sync::Arc;
    use tenantry::tenancy::fleet::{self, Progress, RunOptions};
    struct Quiet;
    impl Progress for Quiet {}
    let dir = citus.dir.join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_templates");
    for entry in std::fs::read_dir(&builtin).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let latest = tenantry::templates::TemplateSet::builtin()
        .unwrap()
        .latest()
        .get();
    let added = latest + 1;
    std::fs::write(
        dir.join(format!("V{added}__notes.sql")),
        "ALTER TABLE experiences ADD COLUMN notes text;\n\
         CREATE INDEX experiences_notes_idx ON experiences (notes);\n\
         CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);\n\
         CREATE TYPE mood AS ENUM ('calm', 'busy');\n\
         CREATE SEQUENCE ticket_seq;\n\
         CREATE FUNCTION note_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM notes';\n",
    )
    .unwrap();
    let config: tokio_postgres::Config = citus.url.parse().unwrap();
    // The admin publishes the new version, then runs the fleet to it.
    let control = tenantry::db::connect(&config).await.unwrap();
    let installation = tenantry::db::bootstrap(&mut tenantry::db::connect(&config).await.unwrap())
        .await
        .unwrap()
        .0;
    let published = tenantry::tenancy::publication::Templates::publishing(
        &control,
        &installation,
        tenantry::templates::TemplateSet::from_dir(&dir).unwrap(),
        "test",
    )
    .await
    .expect("publish");
    let templates: Arc<_> = published.get();
    let run = fleet::prepare(
        &tenantry::db::Connector::plain(config.clone()),
        templates,
        RunOptions::default(),
    )
    .await
    .expect("plan the run");
    let summary = run.execute(&Quiet).await.expect("run");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert!(summary.succeeded >= 4, "{summary:?}");
    let db = citus.coordinator().await;
    let behind: i64 = db
        .query_one(
            "SELECT count(*) FROM tenantry.tenants WHERE template_version <> $1",
            &[&added],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(behind, 0);
    // The new column on ada's shard (on its worker), the new table beside
    // the others on the same node.
    let placements = db
        .query(
            "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'tenant_ada.%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        placements.len(),
        1,
        "ada's tables, notes included, on one node"
    );
    let port: i32 = placements[0].get(0);
    let shard: String = db
        .query_one(
            "SELECT shard_name::text FROM citus_shards WHERE table_name = 'tenant_ada.experiences'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let worker = citus.worker(port as u16).await;
    worker
        .query(&format!("SELECT notes FROM {shard}"), &[])
        .await
        .expect("the column reached the shard");
    let notes: i64 = db
        .query_one(
            "SELECT count(*) FROM citus_shards WHERE table_name = 'tenant_ada.notes'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        notes, 1,
        "the new table is part of ada's distributed schema"
    );
    // Made by the migration, owned by the tenant, as on plain PostgreSQL;
    // the history stays the service's.
    let owners = db
        .query(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text = t.role_name
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN tenantry.tenants t ON t.schema_name = n.nspname
             WHERE t.username = 'ada' AND c.relname IN ('notes', 'experiences', 'refinery_schema_history')
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let owned: Vec<(String, bool)> = owners.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        owned,
        [
            ("experiences".to_string(), true),
            ("notes".to_string(), true),
            ("refinery_schema_history".to_string(), false),
        ]
    );
    let history: i64 = db
        .query_one(
            "SELECT count(*) FROM tenant_ada.refinery_schema_history WHERE version = $1",
            &[&added],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 1, "V5 is in ada's history");
    // A type, a sequence of its own and a function, given to the tenant too.
    let given: (bool, bool, bool) = {
        let row = db
            .query_one(
                "SELECT pg_get_userbyid((SELECT typowner FROM pg_type WHERE oid = 'tenant_ada.mood'::regtype)) = t.role_name,
                        pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = 'tenant_ada.ticket_seq'::regclass)) = t.role_name,
                        pg_get_userbyid((SELECT proowner FROM pg_proc WHERE oid = 'tenant_ada.note_count()'::regprocedure)) = t.role_name
                 FROM tenantry.tenants t WHERE t.username = 'ada'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        given,
        (true, true, true),
        "type, sequence, function owned by ada's role"
    );
    // The service, started before the version was published, signs the
    // next user up at it: the type and the function (which Citus
    // propagates as the tenant's role while the templates run) included.
    app.register("nat").await;
    let made: (i32, bool) = {
        let row = db
            .query_one(
                "SELECT t.template_version, to_regprocedure('tenant_nat.note_count()') IS NOT NULL
                 FROM tenantry.tenants t WHERE t.username = 'nat'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(made, (added, true));
}

fn tenantry_cli(citus: &Citus, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args(args)
        .env("DATABASE_URL", &citus.url)
        .env("JWT_SECRET", "a-test-secret-of-enough-length-0123456789")
        .env("TENANTRY_DATA_DIR", &citus.dir)
        .env("TENANTRY_TEMPLATES_DIR", citus.dir.join("templates"))
        .output()
        .expect("run tenantry")
}

async fn status_and_move(citus: &Citus, app: &App) {
    let out = tenantry_cli(citus, &["cluster", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[0]["role"], "coordinator");
    assert_eq!(nodes[0]["tenants"], 0, "the coordinator holds no tenant");
    let db = citus.coordinator().await;
    let tenants: i64 = db
        .query_one("SELECT count(*) FROM tenantry.tenants", &[])
        .await
        .unwrap()
        .get(0);
    let on_workers: i64 = nodes[1..]
        .iter()
        .map(|n| n["tenants"].as_i64().unwrap())
        .sum();
    assert_eq!(on_workers, tenants, "every tenant is on a worker");
    assert!(nodes[1..].iter().all(|n| n["bytes"].as_i64().unwrap() > 0));

    let from = port_of_tenant(&db, "ada").await;
    let to = *citus
        .workers
        .iter()
        .find(|&&w| i32::from(w) != from)
        .unwrap();
    let out = tenantry_cli(
        citus,
        &[
            "tenants",
            "move",
            "ada",
            "--node",
            &format!("127.0.0.1:{to}"),
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("online"),
        "says up front how the move goes (wal_level = logical here)"
    );
    assert_eq!(
        port_of_tenant(&db, "ada").await,
        i32::from(to),
        "all of ada's tables moved"
    );
    // ada's data, routed as before.
    let (_, login) = app
        .send(
            Method::POST,
            "/api/auth/login",
            "",
            Some(json!({"username": "ada", "password": PASSWORD})),
        )
        .await;
    let token = login["access_token"].as_str().unwrap();
    let (status, summary) = app
        .send(Method::GET, "/api/summaries/quick", token, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(summary["content"], "hello from a worker");
    // A node that is not a worker is a usage error; nothing moves.
    let out = tenantry_cli(citus, &["tenants", "move", "ada", "--node", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tenantry_cli(citus, &["tenants", "move", "ada", "--node", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(port_of_tenant(&db, "ada").await, i32::from(to));
}

async fn rebalance_evens_out(citus: &Citus, app: &App) {
    let db = citus.coordinator().await;
    pile_on_one_worker(citus, &db).await;
    let per_worker = |out: &std::process::Output| -> Vec<i64> {
        let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
        nodes.as_array().unwrap()[1..]
            .iter()
            .map(|n| n["tenants"].as_i64().unwrap())
            .collect()
    };
    let before = per_worker(&tenantry_cli(citus, &["cluster", "status", "--json"]));
    assert!(before.contains(&0), "all tenants on one worker: {before:?}");

    let out = tenantry_cli(citus, &["cluster", "rebalance"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("rebalanced"), "{said}");
    assert!(
        said.contains("moves done"),
        "progress lines off a terminal: {said}"
    );
    let after = per_worker(&tenantry_cli(citus, &["cluster", "status", "--json"]));
    assert!(
        after.iter().all(|&n| n > 0),
        "both workers hold tenants: {after:?}"
    );
    assert_eq!(after.iter().sum::<i64>(), before.iter().sum::<i64>());

    let out = tenantry_cli(citus, &["cluster", "rebalance"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("balanced already"));

    // Every tenant still answers.
    let (_, login) = app
        .send(
            Method::POST,
            "/api/auth/login",
            "",
            Some(json!({"username": "ada", "password": PASSWORD})),
        )
        .await;
    let token = login["access_token"].as_str().unwrap();
    let (status, summary) = app
        .send(Method::GET, "/api/summaries/quick", token, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(summary["content"], "hello from a worker");
}

async fn admin_http_on_citus(citus: &Citus, app: &App) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args([
            "admin",
            "create",
            "root_admin",
            "--email",
            "root_admin@example.com",
        ])
        .env("DATABASE_URL", &citus.url)
        .env("JWT_SECRET", "a-test-secret-of-enough-length-0123456789")
        .env("TENANTRY_TEMPLATES_DIR", citus.dir.join("templates"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, login) = app
        .send(
            Method::POST,
            "/api/auth/login",
            "",
            Some(json!({"username": "root_admin", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let admin = login["access_token"].as_str().unwrap();

    let (status, nodes) = app.send(Method::GET, "/admin/cluster", admin, None).await;
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(nodes.as_array().unwrap().len(), 3);

    let db = citus.coordinator().await;
    let from: i32 = db
        .query_one(
            "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'tenant_bob.%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let to = *citus
        .workers
        .iter()
        .find(|&&w| i32::from(w) != from)
        .unwrap();
    let (status, moved) = app
        .send(
            Method::POST,
            "/admin/tenants/bob/move",
            admin,
            Some(json!({"node": format!("127.0.0.1:{to}")})),
        )
        .await;
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["mode"], "online");
    assert_eq!(moved["to"], format!("127.0.0.1:{to}"));
    let now: i32 = db
        .query_one(
            "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'tenant_bob.%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(now, i32::from(to));
    let (status, body) = app
        .send(
            Method::POST,
            "/admin/tenants/bob/move",
            admin,
            Some(json!({"node": "127.0.0.1:1"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_node");
    let (status, _) = app
        .send(
            Method::POST,
            "/admin/tenants/nobody/move",
            admin,
            Some(json!({"node": format!("127.0.0.1:{to}")})),
        )
        .await;
    assert_eq!(status, 404);

    // Rebalance over HTTP: started in the background, followed to its end.
    pile_on_one_worker(citus, &db).await;
    let response = app
        .api
        .post(format!("{}/admin/cluster/rebalance", app.address))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let mut progress = Value::Null;
    for _ in 0..300 {
        let (status, now) = app.send(Method::GET, &location, admin, None).await;
        assert_eq!(status, 200, "{now}");
        progress = now;
        if progress["state"] == "finished" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(progress["state"], "finished", "{progress}");
    assert!(progress["done"].as_i64().unwrap() > 0, "{progress}");
    let (_, nodes) = app.send(Method::GET, "/admin/cluster", admin, None).await;
    assert!(
        nodes.as_array().unwrap()[1..]
            .iter()
            .all(|n| n["tenants"].as_i64().unwrap() > 0),
        "{nodes}"
    );
    let (status, body) = app
        .send(Method::POST, "/admin/cluster/rebalance", admin, None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "balanced");
    let (status, _) = app
        .send(Method::GET, "/admin/cluster/rebalance/999999", admin, None)
        .await;
    assert_eq!(status, 404);
}

/// Move every tenant to the first worker.
async fn pile_on_one_worker(citus: &Citus, db: &tokio_postgres::Client) {
    let first = i32::from(citus.workers[0]);
    let schemas = db
        .query(
            "SELECT DISTINCT n.nspname::text FROM citus_shards sh
             JOIN pg_class c ON c.oid = sh.table_name JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN tenantry.tenants t ON t.schema_name = n.nspname
             WHERE sh.nodeport <> $1",
            &[&first],
        )
        .await
        .unwrap();
    for row in &schemas {
        let schema: String = row.get(0);
        db.execute(
            "SELECT citus_schema_move($1::text::regnamespace, '127.0.0.1'::text, $2::int4)",
            &[&schema, &first],
        )
        .await
        .unwrap();
    }
}

/// The worker port holding `name`'s tables (all on one node).
async fn port_of_tenant(db: &tokio_postgres::Client, name: &str) -> i32 {
    db.query_one(
        "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name::text LIKE 'tenant_' || $1 || '.%'",
        &[&name],
    )
    .await
    .unwrap()
    .get(0)
}

async fn moves_respect_the_tenant_lock(citus: &Citus, app: &App) {
    app.register("lou").await;
    let mut db = citus.coordinator().await;
    let user_id: uuid::Uuid = db
        .query_one(
            "SELECT user_id FROM tenantry.tenants WHERE username = 'lou'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let from = port_of_tenant(&db, "lou").await;
    let to = *citus
        .workers
        .iter()
        .find(|&&w| i32::from(w) != from)
        .unwrap();
    // What a fleet migration or an erasure of lou holds: the tenant's lock,
    // exclusively, in its transaction.
    let holder = db.transaction().await.unwrap();
    holder
        .execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            &[
                &tenantry::tenancy::fleet::TENANT_LOCK_CLASS,
                &user_id.to_string(),
            ],
        )
        .await
        .unwrap();
    let node = format!("127.0.0.1:{to}");
    let args: Vec<String> = ["tenants", "move", "lou", "--node", &node]
        .map(String::from)
        .to_vec();
    let (url, dir) = (citus.url.clone(), citus.dir.clone());
    let mover = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(&args)
            .env("DATABASE_URL", url)
            .env("JWT_SECRET", "a-test-secret-of-enough-length-0123456789")
            .env("TENANTRY_DATA_DIR", &dir)
            .env("TENANTRY_TEMPLATES_DIR", dir.join("templates"))
            .output()
            .unwrap()
    });
    let watcher = citus.coordinator().await;
    let mut waits = false;
    for _ in 0..400 {
        waits = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
                                AND classid::int8 = $1 AND NOT granted)",
                &[&i64::from(tenantry::tenancy::fleet::TENANT_LOCK_CLASS)],
            )
            .await
            .unwrap()
            .get(0);
        if waits {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waits, "the move waits for the tenant's lock");
    assert_eq!(
        port_of_tenant(&watcher, "lou").await,
        from,
        "nothing moved yet"
    );
    holder.rollback().await.unwrap();
    let out = mover.await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(port_of_tenant(&db, "lou").await, i32::from(to));

    // An erasure that marked lou and has not dropped it yet (a crash in
    // between; the next erasure run finishes it): lou is not moved.
    db.execute(
        "UPDATE tenantry.tenants SET status = 'deleting' WHERE username = 'lou'",
        &[],
    )
    .await
    .unwrap();
    let back = format!("127.0.0.1:{from}");
    let out = tenantry_cli(citus, &["tenants", "move", "lou", "--node", &back]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not active"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(port_of_tenant(&db, "lou").await, i32::from(to));
    db.execute(
        "UPDATE tenantry.tenants SET status = 'active' WHERE username = 'lou'",
        &[],
    )
    .await
    .unwrap();
}

/// Stop or start one node of the suite's cluster (`scripts/citus-cluster`).
fn node(citus: &Citus, action: &str, name: &str) {
    let out = Command::new(script())
        .args([action, name, citus.dir.to_str().unwrap()])
        .output()
        .expect("run scripts/citus-cluster");
    assert!(
        out.status.success(),
        "{action} {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn a_worker_down(citus: &Citus, app: &App) {
    let db = citus.coordinator().await;
    // Two tenants, one on each worker.
    let mut on: std::collections::HashMap<i32, (String, String)> = Default::default();
    for i in 0..8 {
        let name = format!("down{i}");
        let token = app.register(&name).await;
        let port = port_of_tenant(&db, &name).await;
        on.entry(port).or_insert((name, token));
        if on.len() == 2 {
            break;
        }
    }
    assert_eq!(on.len(), 2, "signups land on both workers");
    let (stopped_port, stays_port) = (i32::from(citus.workers[1]), i32::from(citus.workers[0]));
    let (_, stopped_token) = on[&stopped_port].clone();
    let (_, stays_token) = on[&stays_port].clone();
    for token in [&stopped_token, &stays_token] {
        let (status, body) = app.send(Method::GET, "/api/experiences", token, None).await;
        assert_eq!(status, 200, "{body}");
    }

    // Reads of the tenant on the other worker, all along (bounded).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let served = served.clone();
        let (done, token, api, address) = (
            done.clone(),
            stays_token.clone(),
            app.api.clone(),
            app.address.clone(),
        );
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) && statuses.len() < 100_000 {
                let response = api
                    .get(format!("{address}/api/experiences"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            statuses
        })
    };

    node(citus, "stop-node", "worker2");
    let at_stop = served.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (status, body) = app
            .send(Method::GET, "/api/experiences", &stopped_token, None)
            .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "node_unavailable", "{body}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "answered in {:?}",
            started.elapsed()
        );
    }
    // A signup writes every node (the guard's copy, the new schema): 503,
    // and nothing of it is left.
    let (status, body) = app
        .send(
            Method::POST,
            "/api/auth/register",
            "",
            Some(json!({"username": "downnew", "email": "downnew@example.com", "password": PASSWORD})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM tenantry.users WHERE username = 'downnew')
                  + (SELECT count(*) FROM tenantry.tenants WHERE username = 'downnew')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // /health asks the workers at most every 5 s: within a few seconds it
    // names the stopped one.
    let named = format!("127.0.0.1:{stopped_port}");
    let mut health = Value::Null;
    for _ in 0..100 {
        let (status, body) = app.send(Method::GET, "/health", "", None).await;
        assert_eq!(status, 200, "{body}");
        health = body;
        if health["reasons"].to_string().contains(&named) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["reasons"].to_string().contains(&named), "{health}");
    // Reads of the other worker's tenant go on while this one is down
    // (their statuses are checked at the end).
    let mut ran = false;
    for _ in 0..100 {
        if served.load(std::sync::atomic::Ordering::SeqCst) > at_stop + 10 {
            ran = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ran, "the load runs through the outage");

    // Back: the stopped worker's tenant is served again, no restart.
    node(citus, "start-node", "worker2");
    let mut back = false;
    for _ in 0..100 {
        let (status, _) = app
            .send(Method::GET, "/api/experiences", &stopped_token, None)
            .await;
        if status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "the worker's tenant is served again once it is back");
    let mut healthy = false;
    for _ in 0..100 {
        let (_, health) = app.send(Method::GET, "/health", "", None).await;
        if !health["reasons"].to_string().contains(&named) {
            healthy = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(healthy, "/health stops naming the worker once it is back");

    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|&s| s == 200),
        "the other worker's tenant got {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
}
