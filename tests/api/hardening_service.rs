//! Attacks on the running service's connections (issue "Hardening", points
//! 1, 2, 5 and 6): exports nobody reads, an export held against an erasure
//! or a migration, statements that run long or whose client is gone, and
//! `/health` under load. Each test carries the attack out on loopback, with
//! bounded loops, and checks what a user or an operator would see.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// Give `user`'s tenant about `megabytes` MB of experiences (written
/// straight into its schema: the data API would take a thousand requests).
async fn fill(app: &TestApp, user: &str, megabytes: usize) {
    app.db()
        .await
        .batch_execute(&format!(
            "INSERT INTO tenant_{user}.experiences (title, started_on, description)
             SELECT 'job ' || i, date '2020-01-01', repeat(md5(i::text), 312)
             FROM generate_series(1, {rows}) AS i",
            rows = megabytes * 100,
        ))
        .await
        .unwrap();
}

/// A client that asks for `path` and then never reads: a 4 KB receive
/// buffer, as in the attack.
async fn unread_request(app: &TestApp, path: &str, token: &str) -> TcpStream {
    let addr: std::net::SocketAddr = app.address.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// Sessions of exports running now (they name themselves, see
/// `tenancy::export::APPLICATION_NAME`).
async fn exports_in_postgres(app: &TestApp) -> i64 {
    app.count(&format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = '{}' AND application_name LIKE 'tenantry export %'",
        app.db_name
    ))
    .await
}

/// Wait (at most 60 s) until `check` holds; false if it never did.
async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn health(app: &TestApp) -> Value {
    json(app.get("/health").await).await
}

fn reasons(health: &Value) -> String {
    health["reasons"].to_string()
}

/// Backends of this test's database waiting on a lock (on Citus, on any
/// node: a request routed to its worker waits there).
async fn lock_waiters(app: &TestApp) -> i64 {
    app.count_on_every_node(&format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = '{}' AND wait_event_type = 'Lock'",
        app.db_name
    ))
    .await
}

#[tokio::test]
async fn exports_run_one_per_user_within_a_bounded_budget() {
    let app = spawn_app_with(|s| {
        s.export_concurrency = 2;
        s.client_timeout = Duration::from_secs(60);
    })
    .await;
    let (ann, bob, cay) = (
        app.token("ann").await,
        app.token("bob").await,
        app.token("cay").await,
    );
    fill(&app, "ann", 12).await;
    fill(&app, "bob", 12).await;

    let _ann_held = unread_request(&app, "/api/me/export", &ann).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);
    // Ann's second export waits for her first.
    let again = app
        .call(Method::GET, "/api/me/export", &ann)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 429);
    assert!(again.headers().contains_key("retry-after"));
    assert_eq!(json(again).await["error"]["code"], "export_in_progress");

    let _bob_held = unread_request(&app, "/api/me/export", &bob).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 2 }).await);
    // The budget is spent: another user's export is refused, not queued.
    let refused = app
        .call(Method::GET, "/api/me/export", &cay)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(json(refused).await["error"]["code"], "exports_busy");
    let report = health(&app).await;
    assert_eq!(report["status"], "degraded");
    assert!(reasons(&report).contains("export"), "{report}");
    assert_eq!(report["exports"]["running"], 2);

    // Other users' requests and the CLI still get connections.
    let me = app.call(Method::GET, "/api/me", &cay).send().await.unwrap();
    assert_eq!(me.status(), 200);
    let out = tenantry(&["tenants", "list", "--json"], &cli_env(&app.db_name), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // PostgreSQL sessions: the pool's, the two exports', nothing per attempt.
    assert_eq!(exports_in_postgres(&app).await, 2);
}

#[tokio::test]
async fn an_export_whose_client_stops_reading_is_cut_off_and_its_transaction_ends() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(2)).await;
    let token = app.token("dora").await;
    fill(&app, "dora", 12).await;
    let cut_before = cut_off_count(&app).await;

    let mut held = unread_request(&app, "/api/me/export", &token).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);
    // Nobody reads: the export's transaction ends, its place is free again,
    // and the server ends the connection.
    assert!(
        eventually(|| async { exports_in_postgres(&app).await == 0 }).await,
        "the export's session outlived its client's silence"
    );
    assert!(eventually(|| async { health(&app).await["exports"]["running"] == 0 }).await);
    assert!(
        eventually(|| async { cut_off_count(&app).await > cut_before }).await,
        "the connection was not cut off"
    );
    // What the client got is recognisably cut short, and then the end.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), held.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(!String::from_utf8_lossy(&got).contains("\"integrity\":"));

    // A client that reads gets the whole export.
    let whole = app
        .call(Method::GET, "/api/me/export", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    let export: Value = whole.json().await.unwrap();
    assert_eq!(export["integrity"]["rows"], 1200);
}

/// `tenantry_clients_cut_off_total` as `/metrics` shows it (0 before the
/// first).
async fn cut_off_count(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tenantry_clients_cut_off_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn health_is_degraded_when_postgresql_connections_run_short() {
    let app = spawn_app().await;
    let report = health(&app).await;
    assert_eq!(report["status"], "healthy", "{report}");
    let service = service_role(&app.db_name);
    let db = app.db().await;
    let in_use = app
        .count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{service}'"
        ))
        .await;
    // One slot left for the service (a DBA's role limit, as in production).
    db.batch_execute(&format!(
        "ALTER ROLE \"{service}\" CONNECTION LIMIT {}",
        in_use + 1
    ))
    .await
    .unwrap();
    let report = health(&app).await;
    db.batch_execute(&format!("ALTER ROLE \"{service}\" CONNECTION LIMIT -1"))
        .await
        .unwrap();
    assert_eq!(report["status"], "degraded", "{report}");
    assert!(
        reasons(&report).contains("connections are running short"),
        "{report}"
    );
    assert_eq!(report["connections"]["limit"], in_use + 1);
}

#[tokio::test]
async fn an_unread_export_gives_way_to_an_admin_erasure() {
    // Long enough that only the erasure can end the export in time.
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(600)).await;
    let token = app.token("erin").await;
    fill(&app, "erin", 12).await;
    let admin = admin_token(&app).await;
    let _held = unread_request(&app, "/api/me/export", &token).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);

    let erased = app
        .call(Method::DELETE, "/admin/tenants/erin", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200, "{}", erased.text().await.unwrap());
    assert_eq!(exports_in_postgres(&app).await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.users WHERE username = 'erin'")
            .await,
        0
    );
}

#[tokio::test]
async fn an_unread_export_gives_way_to_an_erasure_from_the_cli() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(600)).await;
    let token = app.token("finn").await;
    fill(&app, "finn", 12).await;
    let _held = unread_request(&app, "/api/me/export", &token).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);

    let out = tenantry(
        &["tenants", "delete", "finn", "--yes"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(exports_in_postgres(&app).await, 0);
    assert_eq!(app.schema_count().await, 0);
}

#[tokio::test]
async fn an_unread_export_of_the_canary_gives_way_to_a_fleet_migration() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(600)).await;
    let token = app.token("gail").await;
    for other in ["hugo", "ines"] {
        assert_eq!(app.register(other).await.status(), 201);
    }
    fill(&app, "gail", 12).await;
    let _held = unread_request(&app, "/api/me/export", &token).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);

    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__rating.sql"),
        "ALTER TABLE experiences ADD COLUMN rating integer;",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    // Tenants are planned by name: gail, the one being exported, is the canary.
    let out = tenantry(&["fleet", "migrate", "--canary", "1"], &env, None).await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM tenantry.tenants WHERE template_version = {added}"
        ))
        .await,
        3
    );
    assert_eq!(exports_in_postgres(&app).await, 0);
}

#[tokio::test]
async fn a_tenant_statement_that_runs_too_long_is_stopped_with_a_503() {
    let app = spawn_app_with(|s| s.statement_timeout = Duration::from_secs(1)).await;
    let token = app.token("hana").await;
    let mut db = app.db().await;
    // Hold what the request needs, as a slow query would.
    let tx = db.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE tenant_hana.experiences IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let response = app
        .call(Method::GET, "/api/experiences", &token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("an answer while the lock is still held");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["error"]["code"], "timeout");
    assert_eq!(lock_waiters(&app).await, 0);
    tx.rollback().await.unwrap();
    // The connection it ran on serves the next request as usual.
    let after = app
        .call(Method::GET, "/api/experiences", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200);
}

#[tokio::test]
async fn a_request_whose_client_goes_away_has_its_query_cancelled() {
    let app = spawn_app_with(|s| s.statement_timeout = Duration::from_secs(600)).await;
    let token = app.token("ivan").await;
    let mut db = app.db().await;
    let tx = db.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE tenant_ivan.experiences IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let client = unread_request(&app, "/api/experiences?q=anything", &token).await;
    assert!(eventually(|| async { lock_waiters(&app).await == 1 }).await);
    // The client gives up.
    drop(client);
    assert!(
        eventually(|| async { lock_waiters(&app).await == 0 }).await,
        "the query went on after its client had gone"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn health_calls_on_a_saturated_pool_share_one_spare_connection() {
    let app = spawn_app_with(|s| {
        s.pool_size = 4;
        s.statement_timeout = Duration::from_secs(600);
        // The pool this is about is the one on the database /health asks:
        // on Citus, tenants' requests go through the coordinator's (with
        // direct routing they would fill a worker's pool instead).
        s.citus_routing = tenantry::configuration::CitusRouting::Coordinator;
    })
    .await;
    let token = app.token("jade").await;
    let mut holder = app.db().await;
    let tx = holder.transaction().await.unwrap();
    let db = app.db().await;
    tx.batch_execute("LOCK TABLE tenant_jade.experiences IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Every pooled connection waits on the lock.
    let blocked: Vec<_> = (0..4)
        .map(|_| {
            let request = app.call(Method::GET, "/api/experiences", &token);
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    assert!(eventually(|| async { lock_waiters(&app).await == 4 }).await);
    // Room for exactly one more session of the service (besides the
    // pool's four and the background senders' own: the mail outbox's and
    // the webhooks').
    let service = service_role(&app.db_name);
    let senders = format!(
        "application_name IN ('{}', '{}')",
        tenantry::mail::delivery::OUTBOX_SESSION,
        tenantry::webhooks::delivery::SESSION
    );
    let in_use = app
        .count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = '{service}' AND NOT {senders}"
        ))
        .await;
    assert_eq!(in_use, 4);
    assert!(
        eventually(|| async {
            app.count(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE {senders}"
            ))
            .await
                == 2
        })
        .await
    );
    db.batch_execute(&format!("ALTER ROLE \"{service}\" CONNECTION LIMIT 7"))
        .await
        .unwrap();

    let calls: Vec<_> = (0..150)
        .map(|_| {
            let request = app.api.get(format!("{}/health", app.address));
            tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await })
        })
        .collect();
    for call in calls {
        let report = call.await.unwrap().unwrap();
        // Each call was answered by the database, on the one spare session.
        assert_eq!(report["database"], "up", "{report}");
        assert_eq!(report["status"], "degraded");
    }
    db.batch_execute(&format!("ALTER ROLE \"{service}\" CONNECTION LIMIT -1"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    for request in blocked {
        assert_eq!(request.await.unwrap().unwrap(), 200);
    }
}

#[tokio::test]
async fn no_export_starts_while_an_erasure_waits_for_its_tenant() {
    let app = spawn_app_with(|s| s.client_timeout = Duration::from_secs(600)).await;
    let token = app.token("kira").await;
    let admin = admin_token(&app).await;
    let user_id: uuid::Uuid = app
        .db()
        .await
        .query_one("SELECT id FROM tenantry.users WHERE username = 'kira'", &[])
        .await
        .unwrap()
        .get(0);
    // A request in flight holds the tenant (shared), as routed requests do.
    let mut holder = app.db().await;
    let request = holder.transaction().await.unwrap();
    request
        .execute(
            "SELECT pg_advisory_xact_lock_shared($1, hashtext($2::text))",
            &[&tenantry::db::TENANT_LOCK_CLASS, &user_id.to_string()],
        )
        .await
        .unwrap();
    let erasure = {
        let call = app.call(Method::DELETE, "/admin/tenants/kira", &admin);
        tokio::spawn(async move { call.send().await.unwrap().status().as_u16() })
    };
    // The erasure waits for the request; meanwhile a new export is refused
    // at once rather than queued behind it or started under it.
    assert!(eventually(|| async { lock_waiters(&app).await == 1 }).await);
    let refused = app
        .call(Method::GET, "/api/me/export", &token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("an answer while the erasure waits");
    assert_eq!(refused.status(), 503);
    assert_eq!(json(refused).await["error"]["code"], "tenant_busy");
    request.rollback().await.unwrap();
    assert_eq!(erasure.await.unwrap(), 200);
}

#[tokio::test]
async fn an_export_read_too_slowly_is_cut_off_at_its_time_limit() {
    let app = spawn_app_with(|s| {
        s.client_timeout = Duration::from_secs(600);
        s.export_timeout = Duration::from_secs(2);
    })
    .await;
    let token = app.token("lena").await;
    fill(&app, "lena", 12).await;
    let mut reader = unread_request(&app, "/api/me/export", &token).await;
    assert!(eventually(|| async { exports_in_postgres(&app).await == 1 }).await);
    // A reader that keeps taking a little (never silent for long) until the
    // export ends: 12 MB at this pace would take minutes.
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_all = async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("the export ended");
    assert!(got.len() < 12_000_000, "{} bytes read", got.len());
    assert!(!String::from_utf8_lossy(&got).contains("\"integrity\":"));
    assert!(eventually(|| async { exports_in_postgres(&app).await == 0 }).await);
}
