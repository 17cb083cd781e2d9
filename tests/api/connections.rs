//! The one connector (`db::Connector`): connections outside the pool follow
//! the embedded cluster to its new port and stay under their cap.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tenantry::configuration::DatabaseTarget;

use crate::helpers::*;

/// The embedded cluster's port now (`<data dir>/port`).
fn cluster_port(dir: &std::path::Path) -> u16 {
    std::fs::read_to_string(dir.join("port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `db stop` and `db start` under a running service, the old port held by
/// someone else meanwhile: the cluster comes back on another port. Export,
/// an HTTP-started fleet run and `/health` work afterwards, without a
/// restart of the service.
#[tokio::test]
async fn exports_fleet_runs_and_health_follow_the_embedded_cluster_to_its_new_port() {
    let dir = temp_dir("tenantry-new-port");
    spawn_reaper(&dir);
    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__note.sql"),
        "ALTER TABLE experiences ADD COLUMN note text;\n",
    )]);
    let env = vec![
        ("TENANTRY_DATA_DIR", dir.display().to_string()),
        ("TENANTRY_TEMPLATES_DIR", templates.display().to_string()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
    ];
    let embedded = |templates_dir: Option<std::path::PathBuf>| {
        let mut settings = test_settings("embedded");
        settings.database = DatabaseTarget::Embedded;
        settings.data_dir = dir.clone();
        settings.audit_anchor_file = dir.join("audit-anchors");
        settings.templates_dir = templates_dir;
        settings
    };
    // A tenant at the built-in templates, then the service with a version
    // more (what an upgrade looks like).
    let before = spawn_app_on(embedded(None), "embedded".into()).await;
    let token = before.token("nora").await;
    let created = before
        .call(Method::POST, "/api/experiences", &token)
        .json(&json!({"title": "Pilot", "organization": "Air", "started_on": "2019-03-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let app = spawn_app_on(embedded(Some(templates)), "embedded".into()).await;
    let out = tenantry(
        &["admin", "create", "port_ops", "--email", "ops@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let admin = app.access_token("port_ops").await;

    let old_port = cluster_port(&dir);
    let stop = tenantry(&["db", "stop"], &env, None).await;
    assert!(stop.status.success(), "{}", stderr(&stop));
    let held = std::net::TcpListener::bind(("127.0.0.1", old_port)).unwrap();
    let start = tenantry(&["db", "start"], &env, None).await;
    assert!(start.status.success(), "{}", stderr(&start));
    drop(held);
    let new_port = cluster_port(&dir);
    assert_ne!(new_port, old_port);

    until("/health is up again", || async {
        app.get("/health").await.status() == 200
    })
    .await;
    let export = app
        .call(Method::GET, "/api/me/export", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    assert!(export.text().await.unwrap().contains("Pilot"));

    let report = app.fleet_run_over_http(&admin).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["succeeded"], 1, "{report}");

    let stop = tenantry(&["db", "stop"], &env, None).await;
    assert!(stop.status.success(), "{}", stderr(&stop));
}

/// 150 exports at once from one user, and 30 from as many others, on a
/// service role PostgreSQL allows 40 connections: the exports past the
/// budget get 429/503 with their reasons, everyone else's requests go on,
/// and PostgreSQL never refuses a connection.
#[tokio::test]
async fn a_storm_of_exports_never_runs_postgres_out_of_connections() {
    let db = create_database().await;
    connect(&db)
        .await
        .batch_execute(&format!(
            "ALTER ROLE {} CONNECTION LIMIT 40",
            service_role(&db)
        ))
        .await
        .unwrap();
    // 20 pooled + 16 outside the pool (the default for 4 exports) < 40.
    let app = spawn_app_on(test_settings(&db), db.clone()).await;
    let storm = app.token("storm").await;
    let mut others = Vec::new();
    for i in 0..30 {
        others.push(app.token(&format!("calm{i}")).await);
    }
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let export = |token: String| {
        let api = api.clone();
        let url = format!("{}/api/me/export", app.address);
        async move {
            let response = api.get(url).bearer_auth(token).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            let code = match status {
                200 => String::new(),
                _ => serde_json::from_str::<Value>(&body).unwrap()["error"]["code"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            };
            (status, code)
        }
    };
    let exports = (0..150)
        .map(|_| storm.clone())
        .chain(others.iter().cloned())
        .map(export);
    // Meanwhile, every other user reads their data.
    let reads = others.iter().map(|token| {
        let api = api.clone();
        let url = format!("{}/api/experiences", app.address);
        async move {
            let mut statuses = Vec::new();
            for _ in 0..3 {
                let response = api.get(&url).bearer_auth(token).send().await.unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    });
    let (exported, read) = tokio::join!(
        futures::future::join_all(exports),
        futures::future::join_all(reads)
    );
    assert!(read.iter().flatten().all(|s| *s == 200), "{read:?}");
    let mut seen = std::collections::BTreeMap::new();
    for (status, code) in &exported {
        *seen.entry((*status, code.clone())).or_insert(0) += 1;
    }
    for (status, code) in seen.keys() {
        assert!(
            matches!(
                (*status, code.as_str()),
                (200, "") | (429, "export_in_progress") | (503, "exports_busy")
            ),
            "{seen:?}"
        );
    }
    assert!(seen.get(&(200, String::new())).is_some_and(|n| *n >= 1));
    // What PostgreSQL saw: no connection refused for the role's limit.
    let log = std::fs::read_to_string(CLUSTER.cluster.log_file()).unwrap();
    assert!(
        !log.contains(&format!(
            "too many connections for role \"{}\"",
            service_role(&db)
        )),
        "PostgreSQL refused connections"
    );
    // And the service still serves exports.
    until("an export goes through again", || async {
        export(storm.clone()).await.0 == 200
    })
    .await;
}

/// A fleet run over HTTP that would need more connections than are left
/// outside the pool is refused up front, with the numbers.
#[tokio::test]
async fn a_fleet_run_over_http_fits_in_the_connections_outside_the_pool() {
    let app = spawn_app_with(|s| s.extra_connections = 10).await;
    let out = tenantry(
        &["admin", "create", "cap_ops", "--email", "ops@example.com"],
        &cli_env(&app.db_name),
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let admin = app.access_token("cap_ops").await;
    // 10 - 4 exports - the mail sender - the webhook sender - /health: 3
    // left, a run of 2 workers and its control.
    let refused = app
        .call(Method::POST, "/admin/fleet/migrations", &admin)
        .json(&json!({"concurrency": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body = json(refused).await;
    assert_eq!(body["error"]["code"], "invalid_concurrency");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TENANTRY_EXTRA_CONNECTIONS"),
        "{body}"
    );
    let fits = app
        .call(Method::POST, "/admin/fleet/migrations", &admin)
        .json(&json!({"concurrency": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 202);
}

/// The cap itself: counted connections past it are refused (at once for
/// `/health`'s spare, after a short wait for an export) with a message that
/// names the setting; a place given back is taken again; a command's own
/// connection is not counted.
#[tokio::test]
async fn connections_outside_the_pool_stop_at_their_cap() {
    let db = create_database().await;
    let connector = tenantry::db::Connector::plain(service_url(&db).parse().unwrap()).with_cap(2);
    use tenantry::db::{DbError, Dedicated};
    let first = connector.connect(Dedicated::Export).await.unwrap();
    let _second = connector.connect(Dedicated::Fleet).await.unwrap();
    let health = connector.connect(Dedicated::Health).await;
    assert!(matches!(health, Err(DbError::Busy(2))));
    let export = connector.connect(Dedicated::Export).await.err().unwrap();
    assert!(
        export.to_string().contains("TENANTRY_EXTRA_CONNECTIONS"),
        "{export}"
    );
    let command = connector.connect(Dedicated::Command).await.unwrap();
    let names: Vec<String> = command
        .query(
            "SELECT application_name FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["tenantry export", "tenantry fleet"]);
    drop(first);
    let again = connector.connect(Dedicated::Health).await;
    assert!(again.is_ok());
}

/// The retries counter (`tenantry_db_connect_retries_total`) as rendered.
fn connect_retries() -> f64 {
    tenantry::metrics::handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("tenantry_db_connect_retries_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A server whose listen queue is full refuses a Unix-socket connect at
/// once (`EAGAIN`). The connector pauses and tries again rather than
/// failing (which had every request of a busy pool try again at once and
/// keep the queue full): made certain with a socket of our own whose
/// queue the test fills, then empties once the connector has been turned
/// away, and then hands each connection on to the test cluster.
#[tokio::test]
async fn a_full_listen_queue_is_waited_out_and_a_missing_server_is_not() {
    let db = create_database().await;
    let port = CLUSTER.running.port;
    let dir = temp_dir("tenantry-backlog");
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let listener = tokio::net::UnixSocket::new_stream().unwrap();
    listener.bind(&socket).unwrap();
    let listener = listener.listen(1).unwrap();
    let mut queued = Vec::new();
    let mut full = false;
    for _ in 0..64 {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                full = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full, "the listen queue filled up");

    let config: tokio_postgres::Config = format!(
        "host={} port={port} user={} dbname={db}",
        dir.display(),
        service_role(&db)
    )
    .parse()
    .unwrap();
    let connector = tenantry::db::Connector::plain(config);
    let before = connect_retries();
    let connecting = tokio::spawn(async move {
        let connection = connector.connect(tenantry::db::Dedicated::Command).await?;
        let one: i32 = connection.query_one("SELECT 1", &[]).await.unwrap().get(0);
        Ok::<_, tenantry::db::DbError>(one)
    });
    until("the connector was turned away and pauses", || async {
        connect_retries() > before
    })
    .await;
    assert!(!connecting.is_finished(), "still trying, not failed");
    // Empty the queue, then pass every connection on to PostgreSQL.
    let real = CLUSTER.running.socket_dir.join(format!(".s.PGSQL.{port}"));
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            let real = real.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::UnixStream::connect(&real).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    drop(queued);
    assert_eq!(connecting.await.unwrap().expect("connected"), 1);

    // A queue that stays full: the connector gives up (an error, not a
    // hang), having tried more than once.
    let full = temp_dir("tenantry-backlog-full");
    let socket = full.join(format!(".s.PGSQL.{port}"));
    let listener = tokio::net::UnixSocket::new_stream().unwrap();
    listener.bind(&socket).unwrap();
    let _listener = listener.listen(1).unwrap();
    let mut held = Vec::new();
    while let Ok(stream) = tokio::net::UnixStream::connect(&socket).await {
        held.push(stream);
        assert!(held.len() < 64, "the listen queue never filled");
    }
    let config: tokio_postgres::Config = format!(
        "host={} port={port} user=nobody dbname=nothing",
        full.display()
    )
    .parse()
    .unwrap();
    let retries = connect_retries();
    let given_up = tokio::time::timeout(
        Duration::from_secs(30),
        tenantry::db::Connector::plain(config).connect(tenantry::db::Dedicated::Command),
    )
    .await
    .expect("the connector gave up");
    assert!(given_up.is_err());
    assert!(
        connect_retries() >= retries + 2.0,
        "tried again, more than once"
    );

    // No server at all: an error at once, no pause.
    let gone = temp_dir("tenantry-no-server");
    let config: tokio_postgres::Config = format!(
        "host={} port={port} user=nobody dbname=nothing",
        gone.display()
    )
    .parse()
    .unwrap();
    let retries = connect_retries();
    let refused = tenantry::db::Connector::plain(config)
        .connect(tenantry::db::Dedicated::Command)
        .await;
    assert!(refused.is_err());
    assert_eq!(connect_retries(), retries, "not tried again");
}
