//! Accounts under attack: a signup replayed with its `Idempotency-Key` is a
//! login in all but name (throttled, locked, audited), and an erased user
//! leaves no name or email behind (registry, throttle, logs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tenantry::audit::Pseudonyms;

use crate::helpers::*;

fn pseudonyms() -> Pseudonyms {
    Pseudonyms::from_secret(JWT_SECRET.as_bytes())
}

/// A signup with `key` as its `Idempotency-Key`, sent through a trusted
/// proxy on behalf of `client`.
async fn signup(
    app: &TestApp,
    key: &str,
    client: &str,
    name: &str,
    password: &str,
) -> reqwest::Response {
    app.api
        .post(format!("{}/api/auth/register", app.address))
        .header("Idempotency-Key", key)
        .header("X-Forwarded-For", client)
        .json(&json!({
            "username": name,
            "email": format!("{name}@example.com"),
            "password": password,
        }))
        .send()
        .await
        .unwrap()
}

async fn login(app: &TestApp, name: &str, password: &str) -> StatusCode {
    app.post_json(
        "/api/auth/login",
        &json!({ "username": name, "password": password }),
    )
    .await
    .status()
}

/// Three failures lock a name; every request comes from its own address
/// (through a trusted proxy), under a per-address limit on `/api/auth`.
fn three_failures_lock() -> impl FnOnce(&mut tenantry::configuration::Settings) {
    |s| {
        s.limits.login_max_failures = 3;
        s.limits.auth_per_minute = 10;
        s.limits.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    }
}

async fn user_id(app: &TestApp, name: &str) -> uuid::Uuid {
    app.db()
        .await
        .query_one(
            "SELECT id FROM tenantry.users WHERE username = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Audit entries of `action` whose `via` detail is `via`.
async fn audited(app: &TestApp, action: &str, via: &str) -> Vec<Value> {
    app.db()
        .await
        .query(
            "SELECT entry::jsonb FROM tenantry.audit_log
             WHERE action = $1 AND entry::jsonb -> 'details' ->> 'via' = $2 ORDER BY seq",
            &[&action, &via],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn wrong_password_replays_of_a_signup_lock_its_name_like_failed_logins() {
    let app = spawn_app_with(three_failures_lock()).await;
    let key = "signup-wendel-1";
    assert_eq!(
        signup(&app, key, "203.0.113.1", "wendel", PASSWORD)
            .await
            .status(),
        201
    );

    let mut answers = Vec::new();
    for n in 2..=4 {
        let response = signup(
            &app,
            key,
            &format!("203.0.113.{n}"),
            "wendel",
            "a wrong guess at it",
        )
        .await;
        let status = response.status().as_u16();
        answers.push((status, json(response).await["error"]["code"].clone()));
    }
    assert_eq!(
        answers,
        vec![
            (422, json!("idempotency_key_reused")),
            (422, json!("idempotency_key_reused")),
            (429, json!("too_many_attempts")),
        ],
        "the third wrong password locks the name, as a third failed login would"
    );
    assert_eq!(
        login(&app, "wendel", PASSWORD).await,
        429,
        "the lock holds for logins too"
    );
    let subject = pseudonyms().user(user_id(&app, "wendel").await);
    let failed = audited(&app, "login_failed", "signup_replay").await;
    assert_eq!(failed.len(), 3);
    assert!(failed.iter().all(|e| e["subject"] == subject.as_str()));
    assert_eq!(
        audited(&app, "login_throttled", "signup_replay")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn a_locked_names_signup_replay_with_the_right_password_is_429_without_tokens() {
    let app = spawn_app_with(three_failures_lock()).await;
    let key = "signup-xavia-1";
    assert_eq!(
        signup(&app, key, "203.0.113.1", "xavia", PASSWORD)
            .await
            .status(),
        201
    );
    let statuses = [
        login(&app, "xavia", "a wrong guess at it").await,
        login(&app, "xavia", "a wrong guess at it").await,
        login(&app, "xavia", "a wrong guess at it").await,
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [401, 401, 429]);

    let replayed = signup(&app, key, "203.0.113.9", "xavia", PASSWORD).await;
    assert_eq!(replayed.status(), 429);
    let retry_after: u64 = replayed.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body = json(replayed).await;
    assert_eq!(body["error"]["code"], "too_many_attempts");
    assert!(body.get("access_token").is_none() && body.get("refresh_token").is_none());
    let id = user_id(&app, "xavia").await;
    let sessions: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM tenantry.refresh_tokens WHERE user_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, 1, "only the signup's own session exists");
}

#[tokio::test]
async fn a_successful_signup_replay_is_audited_as_a_login_and_clears_the_failure_count() {
    let app = spawn_app_with(three_failures_lock()).await;
    let key = "signup-yorick-1";
    assert_eq!(
        signup(&app, key, "203.0.113.1", "yorick", PASSWORD)
            .await
            .status(),
        201
    );
    assert_eq!(login(&app, "yorick", "a wrong guess at it").await, 401);
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.login_throttle")
            .await,
        1
    );

    let replayed = signup(&app, key, "203.0.113.2", "yorick", PASSWORD).await;
    assert_eq!(replayed.status(), 201);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    let refresh_token = json(replayed).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let session: uuid::Uuid = app
        .db()
        .await
        .query_one(
            "SELECT family_id FROM tenantry.refresh_tokens WHERE token_hash = $1",
            &[&tenantry::auth::refresh_token_hash(&refresh_token)],
        )
        .await
        .unwrap()
        .get(0);

    let entries = audited(&app, "login_succeeded", "signup_replay").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(
        entry["actor"],
        pseudonyms().user(user_id(&app, "yorick").await)
    );
    assert_eq!(entry["details"]["session"], session.to_string());
    assert_eq!(
        entry["client"],
        pseudonyms().client("203.0.113.2".parse().unwrap())
    );
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.login_throttle")
            .await,
        0,
        "a successful sign-in starts the count again"
    );
}

/// A token for an account made with `tenantry admin create`, logged in.
async fn admin_token(app: &TestApp, env: &[(&str, String)], name: &str) -> String {
    let email = format!("{name}@example.com");
    let out = tenantry(
        &["admin", "create", name, "--email", &email],
        env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let login = app
        .post_json(
            "/api/auth/login",
            &json!({"username": name, "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status(), 200);
    json(login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `POST /admin/fleet/migrations` for one tenant; its report once it ended.
async fn fleet_run_for(app: &TestApp, admin: &str, tenant: &str) -> i64 {
    let started = app
        .api
        .post(format!("{}/admin/fleet/migrations", app.address))
        .bearer_auth(admin)
        .json(&json!({ "tenant": tenant }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let run_id = json(started).await["run_id"].as_i64().unwrap();
    for _ in 0..200 {
        if run_report(app, admin, run_id).await["status"] != "running" {
            return run_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run_id} did not finish");
}

async fn run_report(app: &TestApp, admin: &str, run_id: i64) -> Value {
    let response = app
        .api
        .get(format!("{}/admin/fleet/migrations/{run_id}", app.address))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    json(response).await
}

#[tokio::test]
async fn an_erasure_takes_the_throttle_rows_of_name_and_email_and_leaves_a_pseudonym_in_fleet_runs()
{
    let app = spawn_app_with(|s| s.limits.login_max_failures = 10).await;
    let token = app.token("quillon").await;
    let id = user_id(&app, "quillon").await;
    let admin = admin_token(&app, &cli_env(&app.db_name), "overseer").await;
    let run_id = fleet_run_for(&app, &admin, "quillon").await;
    // How a run that stopped on the tenant reads (see `RunTally::first_failure`).
    app.db()
        .await
        .execute(
            "UPDATE tenantry.fleet_runs
             SET reason = 'a canary failed (quillon: lock not free on tenant_quillon)'
             WHERE id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    for typed in ["quillon", " Quillon@Example.com ", "someone_else"] {
        assert_eq!(login(&app, typed, "a wrong guess at it").await, 401);
    }
    let keys: Vec<String> = app
        .db()
        .await
        .query("SELECT username FROM tenantry.login_throttle", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys.len(), 3);
    assert!(
        keys.iter()
            .all(|k| !k.contains("quillon") && !k.contains("someone") && !k.contains('@')),
        "what was typed is never stored: {keys:?}"
    );

    app.erase_self(&token).await;

    let left: Vec<String> = app
        .db()
        .await
        .query("SELECT username FROM tenantry.login_throttle", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unrelated = tenantry::auth::throttle_key(&pseudonyms(), "someone_else");
    assert_eq!(
        left,
        vec![unrelated],
        "the name's and the email's rows went"
    );
    let pseudonym = pseudonyms().user(id);
    let report = run_report(&app, &admin, run_id).await;
    assert_eq!(report["only_tenant"], pseudonym.as_str());
    assert_eq!(
        report["reason"],
        format!("a canary failed ({pseudonym}: lock not free on tenant_{pseudonym})")
    );
    let status = app
        .call(reqwest::Method::GET, "/admin/fleet", &admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.contains(&pseudonym), "{status}");
    assert!(!status.contains("quillon"), "{status}");
}

/// A data dir of its own for an embedded installation; its cluster is
/// stopped when the test ends (also when it failed half-way) and the dir is
/// removed when the test process exits.
struct DataDir {
    path: PathBuf,
}

impl DataDir {
    fn new(prefix: &str) -> DataDir {
        let path = temp_dir(prefix);
        spawn_reaper(&path);
        DataDir { path }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("TENANTRY_DATA_DIR", self.path.display().to_string())]
    }

    /// A superuser connection to `dbname` of the running cluster.
    async fn superuser(&self, dbname: &str) -> tokio_postgres::Client {
        let cluster = tenantry::embedded::Cluster::open(&self.path).unwrap();
        let config = cluster
            .current_config(dbname, tenantry::embedded::SUPERUSER)
            .expect("the cluster runs");
        tenantry::db::connect(&config).await.unwrap()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(["db", "stop"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TENANTRY_DATA_DIR", &self.path)
            .output();
    }
}

const NAME: &str = "zorvandel";
const EMAIL: &str = "mirthwick.pell@example.org";
/// What of the email is personal (the domain is everyone's).
const EMAIL_LOCAL: &str = "mirthwick";

/// `schema.table` of every table and materialized view, catalogs included,
/// whose rows (as text) contain `needle`, ignoring case.
async fn tables_containing(db: &tokio_postgres::Client, needle: &str) -> Vec<String> {
    let tables: Vec<String> = db
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname)
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname <> 'pg_toast'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() > 20, "the catalogs are searched too");
    let mut found = Vec::new();
    for table in tables {
        // A name read from the catalog, quoted by format('%I').
        let hits: i64 = db
            .query_one(
                &format!("SELECT count(*) FROM {table} AS t WHERE strpos(lower(t::text), $1) > 0"),
                &[&needle],
            )
            .await
            .unwrap()
            .get(0);
        if hits > 0 {
            found.push(table);
        }
    }
    found
}

/// Every regular file under `dir` except the database's own storage (table
/// files and WAL, searched through SQL instead), with the ones whose bytes
/// contain `needle`, ignoring case.
fn files_containing(dir: &Path, needle: &str, found: &mut Vec<PathBuf>, seen: &mut usize) {
    let storage = ["base", "global", "pg_wal"];
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            let is_storage = dir.file_name().is_some_and(|d| d == "pgdata")
                && storage.iter().any(|s| entry.file_name() == *s);
            if !is_storage {
                files_containing(&path, needle, found, seen);
            }
        } else if kind.is_file() {
            *seen += 1;
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).to_lowercase();
            if text.contains(needle) {
                found.push(path);
            }
        }
    }
}

/// `tenantry serve` on the embedded cluster of `data`, its log (stdout and
/// stderr, at the default level) in `log`.
fn spawn_serve(data: &DataDir, port: u16, log: &Path) -> tokio::process::Child {
    let log = std::fs::File::create(log).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TENANTRY_DATA_DIR", &data.path)
        .env("TENANTRY_BIND", format!("127.0.0.1:{port}"))
        .env("BCRYPT_COST", "4")
        .env("TENANTRY_RATE_LIMIT_AUTH", "0")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_healthy(app: &TestApp) {
    for _ in 0..600 {
        if let Ok(r) = app.api.get(format!("{}/health", app.address)).send().await {
            assert_eq!(r.status(), 200);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("serve never answered");
}

/// Backends of the `tenantry` database waiting on a lock, once there are
/// `n` of them (or after 10 s, whatever there are then).
async fn lock_waiters(watcher: &tokio_postgres::Client, n: i64) -> i64 {
    let mut waiting = 0;
    for _ in 0..400 {
        waiting = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND datname = 'tenantry'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if waiting >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    waiting
}

/// Two signups of one name at once: the second passes the availability
/// check before the first commits, then meets the first's row in the
/// registry's unique index (the race that put `DETAIL: Key (username)=(…)`
/// and the failed pipeline's `CREATE ROLE "tnt_…_<name>"` in the server
/// log). Made certain by holding the audit chain's head, which every signup
/// takes last: the first waits there with its row written, the second on
/// that row.
async fn racing_signups(app: &TestApp, data: &DataDir) -> (reqwest::Response, StatusCode) {
    let mut holder = data.superuser("tenantry").await;
    let watcher = data.superuser("tenantry").await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM tenantry.audit_head FOR UPDATE", &[])
        .await
        .unwrap();
    let register = |email: &'static str| {
        let api = app.api.clone();
        let url = format!("{}/api/auth/register", app.address);
        tokio::spawn(async move {
            api.post(url)
                .json(&json!({"username": NAME, "email": email, "password": PASSWORD}))
                .send()
                .await
                .unwrap()
        })
    };
    let first = register(EMAIL);
    let mut waiting = lock_waiters(&watcher, 1).await;
    assert_eq!(waiting, 1, "the first signup waits on the audit head");
    let second = register("someone.else@example.net");
    waiting = lock_waiters(&watcher, 2).await;
    assert_eq!(waiting, 2, "the second signup waits on the first's row");
    tx.commit().await.unwrap();
    let first = first.await.unwrap();
    let second = second.await.unwrap().status();
    (first, second)
}

#[tokio::test]
async fn an_erased_user_leaves_no_name_or_email_in_any_table_or_log_of_an_embedded_installation() {
    let data = DataDir::new("tenantry-forget");
    let port = free_port();
    let service_log = data.path.join("service.log");
    let mut serve = spawn_serve(&data, port, &service_log);
    let app = TestApp {
        address: format!("http://127.0.0.1:{port}"),
        db_name: String::new(),
        api: reqwest::Client::new(),
    };
    wait_healthy(&app).await;
    let admin = admin_token(&app, &data.env(), "warden").await;

    // Use the account every way that leaves its name somewhere.
    let (first, second) = racing_signups(&app, &data).await;
    assert_eq!(first.status(), 201);
    assert_eq!(second, 409, "the second signup hit the unique index");
    let token = json(first).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(login(&app, EMAIL, "a wrong guess at it").await, 401);
    assert_eq!(login(&app, NAME, "a wrong guess at it").await, 401);
    let experience = app
        .call(reqwest::Method::POST, "/api/experiences", &token)
        .json(&json!({
            "title": format!("{NAME} at work"), "started_on": "2020-01-15", "description": EMAIL
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(experience.status(), 201);
    fleet_run_for(&app, &admin, NAME).await;
    let db = data.superuser("tenantry").await;
    for needle in [NAME, EMAIL_LOCAL] {
        assert!(
            !tables_containing(&db, needle).await.is_empty(),
            "the search finds {needle} while the account exists"
        );
    }

    app.erase_self(&token).await;

    for dbname in ["tenantry", "postgres"] {
        let db = data.superuser(dbname).await;
        for needle in [NAME, EMAIL_LOCAL] {
            assert_eq!(
                tables_containing(&db, needle).await,
                Vec::<String>::new(),
                "{needle} in database {dbname}"
            );
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), serve.wait())
        .await
        .expect("serve exits after SIGTERM")
        .unwrap();

    let log = std::fs::read_to_string(&service_log).unwrap();
    assert!(
        log.contains("tenant erased"),
        "the service log is captured: {log}"
    );
    let server_log = std::fs::read_to_string(data.path.join("run/postgres.log")).unwrap();
    assert!(
        server_log.contains("duplicate key value violates unique constraint"),
        "the server log saw the race: {server_log}"
    );
    for needle in [NAME, EMAIL_LOCAL] {
        let (mut found, mut seen) = (Vec::new(), 0);
        files_containing(&data.path, needle, &mut found, &mut seen);
        assert!(seen >= 5, "only {seen} files searched");
        assert_eq!(found, Vec::<PathBuf>::new(), "{needle} in these files");
    }
}

#[tokio::test]
async fn an_embedded_cluster_made_before_the_private_log_settings_gets_them_at_its_next_start() {
    let data = DataDir::new("tenantry-logconf");
    let started = tenantry(&["db", "start"], &data.env(), None).await;
    assert!(started.status.success(), "{}", stderr(&started));
    let stopped = tenantry(&["db", "stop"], &data.env(), None).await;
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    // As a cluster made before the settings existed: without them.
    let conf = data.path.join("pgdata/postgresql.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let marker = "# tenantry: keep personal data out of the server log";
    let before = text.find(marker).expect("a new cluster has the settings");
    std::fs::write(&conf, &text[..before]).unwrap();

    let started = tenantry(&["db", "start"], &data.env(), None).await;
    assert!(started.status.success(), "{}", stderr(&started));
    let db = data.superuser("postgres").await;
    let mut settings = Vec::new();
    for name in [
        "log_error_verbosity",
        "log_min_error_statement",
        "log_statement",
        "log_min_duration_statement",
        "log_autovacuum_min_duration",
    ] {
        let value: String = db
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .unwrap()
            .get(0);
        settings.push(value);
    }
    assert_eq!(settings, ["terse", "panic", "none", "-1", "-1"]);
    let text = std::fs::read_to_string(&conf).unwrap();
    assert_eq!(text.matches(marker).count(), 1, "added once");
}
