//! Routing and isolation: what one tenant can never see or do to another,
//! enforced by the database (the tenant's role), and what never survives a
//! pooled connection's checkout.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tenantry::db::{pool, ConnectionLimits};
use tenantry::routing::{Access, RoutingError, TenantTx};
use tokio_postgres::error::SqlState;

use crate::helpers::*;

pub(crate) async fn user_id(app: &TestApp, name: &str) -> uuid::Uuid {
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

#[tokio::test]
async fn a_tenant_cannot_read_change_or_delete_another_tenants_data_through_any_route() {
    let app = spawn_app().await;
    let a = app.token("alma").await;
    let b = app.token("boris").await;
    let post = |token: &str, path: &str, body: Value| {
        app.call(Method::POST, path, token).json(&body).send()
    };
    let exp: Value = json(
        post(
            &a,
            "/api/experiences",
            json!({"title": "Alma's secret job", "started_on": "2020-01-01"}),
        )
        .await
        .unwrap(),
    )
    .await;
    let conv: Value = json(
        post(&a, "/api/conversations", json!({"title": "Alma's chat"}))
            .await
            .unwrap(),
    )
    .await;
    let conv_id = conv["id"].as_i64().unwrap();
    post(
        &a,
        &format!("/api/conversations/{conv_id}/messages"),
        json!({"content": "private"}),
    )
    .await
    .unwrap();
    app.call(Method::PUT, "/api/summaries/quick", &a)
        .json(&json!({"content": "Alma's summary"}))
        .send()
        .await
        .unwrap();
    post(
        &a,
        "/api/skills",
        json!({"name": "Secret skill", "level": 3}),
    )
    .await
    .unwrap();
    let id = exp["id"].as_i64().unwrap();

    // Boris names Alma's ids on every route: not found, nothing changes.
    for (method, path, body) in [
        (Method::GET, format!("/api/experiences/{id}"), None),
        (
            Method::PATCH,
            format!("/api/experiences/{id}"),
            Some(json!({"title": "pwned"})),
        ),
        (Method::DELETE, format!("/api/experiences/{id}"), None),
        (
            Method::GET,
            format!("/api/conversations/{conv_id}/messages"),
            None,
        ),
        (
            Method::POST,
            format!("/api/conversations/{conv_id}/messages"),
            Some(json!({"content": "pwned"})),
        ),
        (Method::GET, "/api/summaries/quick".to_string(), None),
    ] {
        let mut request = app.call(method.clone(), &path, &b);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
    }
    for path in [
        "/api/experiences",
        "/api/experiences?q=secret",
        "/api/conversations",
        "/api/skills",
    ] {
        let page = json(app.call(Method::GET, path, &b).send().await.unwrap()).await;
        assert_eq!(page["items"], json!([]), "{path}");
    }
    // Alma's data is whole.
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT (SELECT title FROM tenant_alma.experiences),
                    (SELECT count(*) FROM tenant_alma.messages),
                    (SELECT count(*) FROM tenant_boris.messages)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Alma's secret job");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), 0);
}

/// The SQLSTATE of running `sql` as `role`.
async fn as_role(db: &tokio_postgres::Client, role: &str, sql: &str) -> Option<SqlState> {
    db.batch_execute("BEGIN").await.unwrap();
    db.batch_execute(&format!("SET LOCAL ROLE \"{role}\""))
        .await
        .unwrap();
    let result = db.batch_execute(sql).await;
    db.batch_execute("ROLLBACK").await.unwrap();
    result
        .err()
        .map(|e| e.code().cloned().expect("a database error"))
}

/// `PUBLIC` may look names up in `reference` (every request's search path
/// checks that, see ARCHITECTURE.md), which lets nobody read it: only the
/// installation's tenants can.
#[tokio::test]
async fn a_role_outside_the_installation_cannot_read_reference_data() {
    let app = spawn_app().await;
    app.token("pia").await;
    let db = app.db().await;
    let outsider = format!("outsider_{}", app.db_name);
    db.batch_execute(&format!(
        "CREATE ROLE \"{outsider}\" NOLOGIN; GRANT CONNECT ON DATABASE \"{}\" TO \"{outsider}\"",
        app.db_name
    ))
    .await
    .unwrap();
    let public_usage: bool = db
        .query_one(
            "SELECT has_schema_privilege('public', 'reference', 'USAGE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(public_usage);
    for sql in [
        "SELECT count(*) FROM reference.skills",
        "SELECT count(*) FROM reference.industries",
    ] {
        assert_eq!(
            as_role(&db, &outsider, sql).await,
            Some(SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}"
        );
        assert_eq!(as_role(&db, &app.role_of("pia").await, sql).await, None);
    }
}

#[tokio::test]
async fn a_tenant_role_is_confined_by_the_database() {
    let app = spawn_app().await;
    app.token("cleo").await;
    app.token("dora").await;
    let cleo = app.role_of("cleo").await;
    let db = app.db().await;
    let denied = Some(SqlState::INSUFFICIENT_PRIVILEGE);
    // Its own schema and the reference data: yes.
    assert_eq!(
        as_role(&db, &cleo, "SELECT count(*) FROM tenant_cleo.experiences").await,
        None
    );
    assert_eq!(
        as_role(&db, &cleo, "SELECT count(*) FROM reference.skills").await,
        None
    );
    assert_eq!(
        as_role(
            &db,
            &cleo,
            "INSERT INTO tenant_cleo.skills (name) VALUES ('x')"
        )
        .await,
        None
    );
    // Another tenant, the control plane, writing reference data: no.
    for sql in [
        "SELECT count(*) FROM tenant_dora.experiences",
        "SELECT count(*) FROM tenantry.users",
        "SELECT count(*) FROM tenantry.tenants",
        "INSERT INTO reference.industries (code, name, level) VALUES ('99', 'x', 'sector')",
        "UPDATE reference.skills SET name = 'x'",
        "DELETE FROM reference.competencies",
        // Holes closed: temp tables, schema public, its own history.
        "CREATE TEMP TABLE experiences (id int)",
        "CREATE TABLE public.leak (id int)",
        "DROP TABLE tenant_cleo.refinery_schema_history",
        "DELETE FROM tenant_cleo.refinery_schema_history",
        "DROP SCHEMA tenant_cleo CASCADE",
    ] {
        assert_eq!(as_role(&db, &cleo, sql).await, denied, "{sql}");
    }
    // Tenant roles cannot log in at all, nor connect to the database. On
    // Citus they can, without a password (Citus reaches the workers as the
    // current role; SECURITY.md "On Citus"): the nodes trust each other
    // and nobody else.
    let can: (bool, bool) = {
        let row = db
            .query_one(
                "SELECT rolcanlogin, has_database_privilege($1, current_database(), 'CONNECT')
                 FROM pg_roles WHERE rolname = $1",
                &[&cleo],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    if on_citus() {
        assert_eq!(can, (true, true));
        let password: Option<String> = db
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&cleo],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(password, None, "no password to log in with");
    } else {
        assert_eq!(can, (false, false));
    }
}

#[tokio::test]
async fn the_service_runs_as_a_non_superuser_that_owns_the_tenant_schemas() {
    let app = spawn_app().await;
    app.token("edna").await;
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT r.rolsuper, r.rolcreaterole, n.nspowner::regrole::text,
                    (SELECT tableowner::text FROM pg_tables WHERE schemaname = 'tenant_edna' AND tablename = 'refinery_schema_history'),
                    (SELECT tableowner::text FROM pg_tables WHERE schemaname = 'tenant_edna' AND tablename = 'experiences')
             FROM pg_roles r, pg_namespace n WHERE r.rolname = $1 AND n.nspname = 'tenant_edna'",
            &[&service_role(&app.db_name)],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "not a superuser");
    assert!(row.get::<_, bool>(1), "CREATEROLE");
    assert_eq!(
        row.get::<_, String>(2),
        service_role(&app.db_name),
        "schema owner"
    );
    assert_eq!(
        row.get::<_, String>(3),
        service_role(&app.db_name),
        "history owner"
    );
    assert_eq!(
        row.get::<_, String>(4),
        app.role_of("edna").await,
        "tables belong to the tenant"
    );
}

#[tokio::test]
async fn the_username_tenants_gets_its_own_role_not_the_group() {
    let app = spawn_app().await;
    let token = app.token("tenants").await;
    let prefix = app.role_prefix().await;
    let role = app.role_of("tenants").await;
    if on_citus() {
        assert_eq!(role, format!("{prefix}tenants"));
    } else {
        // A name that carries no username (`tenancy::spares`).
        assert!(role.starts_with(&format!("{prefix}_t")), "{role}");
    }
    assert_ne!(role, format!("{prefix}_tenants"));
    let db = app.db().await;
    let group_members: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE g.rolname = $1",
            &[&format!("{prefix}_tenants")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        group_members, 1,
        "the tenant joined the group, which is another role"
    );
    let me = app
        .call(Method::GET, "/api/experiences", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
}

#[tokio::test]
async fn missing_garbage_and_orphaned_tokens_get_401() {
    let app = spawn_app().await;
    let gone = app.token("fern").await;
    let disabled = app.token("gail").await;
    let no_token = app
        .api
        .get(format!("{}/api/experiences", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(json(no_token).await["error"]["code"], "unauthorized");
    let garbage = app
        .call(Method::GET, "/api/experiences", "not.a.jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);

    // The tenant is erased behind the token's back, or no longer active.
    let db = app.db().await;
    let role = app.role_of("fern").await;
    db.batch_execute(&format!(
        "DELETE FROM tenantry.users WHERE username = 'fern';
         DROP SCHEMA tenant_fern CASCADE; DROP ROLE \"{role}\";
         UPDATE tenantry.tenants SET status = 'deleting' WHERE username = 'gail';"
    ))
    .await
    .unwrap();
    for token in [&gone, &disabled] {
        for path in [
            "/api/experiences",
            "/api/summaries/quick",
            "/api/reference/skills",
        ] {
            let response = app.call(Method::GET, path, token).send().await.unwrap();
            assert_eq!(response.status(), 401, "{path}");
        }
        let response = app
            .call(Method::POST, "/api/experiences", token)
            .json(&json!({"title": "x", "started_on": "2020-01-01"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
}

/// What a pooled connection looks like at checkout, as the service.
async fn session_state(pool: &deadpool_postgres::Pool) -> (i32, String, String, String, i64, i64) {
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_user::text = session_user::text AS own_role,
                    current_setting('search_path'), current_setting('application_name'),
                    (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),
                    (SELECT count(*) FROM pg_listening_channels())",
            &[],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get::<_, bool>(1).to_string(),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    )
}

#[tokio::test]
async fn session_state_set_as_a_tenant_does_not_reach_the_next_checkout() {
    let app = spawn_app().await;
    app.token("hugo").await;
    let hugo = user_id(&app, "hugo").await;
    let pool = pool(
        service_url(&app.db_name).parse().unwrap(),
        1,
        ConnectionLimits::default(),
    )
    .unwrap();
    let clean = session_state(&pool).await;

    let tx = TenantTx::begin(&pool, caller(hugo), Access::ReadWrite)
        .await
        .unwrap();
    let who = tx
        .query(
            "SELECT current_user::text, current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(who[0].get::<_, String>(0), app.role_of("hugo").await);
    assert_eq!(who[0].get::<_, String>(1), "tenant_hugo, reference");
    // Everything a tenant's SQL could leave on a session.
    for sql in [
        "SELECT set_config('search_path', 'tenant_other', false)",
        "SELECT set_config('application_name', 'leaked', false)",
        "SELECT pg_advisory_lock(42)",
        "LISTEN leak",
    ] {
        tx.execute(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let err = tx
        .execute("CREATE TEMP TABLE experiences (id int)", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // The transaction is aborted now; rolling back still leaves it clean.
    tx.rollback().await.unwrap();
    assert_eq!(session_state(&pool).await, clean);

    let tx = TenantTx::begin(&pool, caller(hugo), Access::ReadWrite)
        .await
        .unwrap();
    for sql in [
        "SELECT set_config('search_path', 'tenant_other', false)",
        "SELECT set_config('application_name', 'leaked', false)",
        "SELECT pg_advisory_lock(42)",
        "LISTEN leak",
    ] {
        tx.execute(sql, &[]).await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        session_state(&pool).await,
        clean,
        "same connection, nothing left"
    );
}

#[tokio::test]
async fn a_prepared_statement_made_as_a_tenant_does_not_reach_the_next_checkout() {
    let app = spawn_app().await;
    app.token("hilde").await;
    let hilde = user_id(&app, "hilde").await;
    let pool = pool(
        service_url(&app.db_name).parse().unwrap(),
        1,
        ConnectionLimits::default(),
    )
    .unwrap();
    let (first, ..) = session_state(&pool).await;
    let tx = TenantTx::begin(&pool, caller(hilde), Access::ReadWrite)
        .await
        .unwrap();
    tx.execute("PREPARE leak AS SELECT content FROM summaries", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(1),
        0,
        "no prepared statement of the tenant's"
    );
    assert_ne!(
        row.get::<_, i32>(0),
        first,
        "the connection that had one was closed"
    );
}

#[tokio::test]
async fn a_guard_dropped_mid_transaction_discards_its_connection() {
    let app = spawn_app().await;
    app.token("ines").await;
    let ines = user_id(&app, "ines").await;
    let pool = pool(
        service_url(&app.db_name).parse().unwrap(),
        1,
        ConnectionLimits::default(),
    )
    .unwrap();
    let (first, ..) = session_state(&pool).await;
    let tx = TenantTx::begin(&pool, caller(ines), Access::ReadOnly)
        .await
        .unwrap();
    tx.query("SELECT 1", &[]).await.unwrap();
    drop(tx);
    let (second, own_role, path, ..) = session_state(&pool).await;
    assert_ne!(
        second, first,
        "a fresh connection, not the one left mid-transaction"
    );
    assert_eq!(own_role, "true");
    assert_eq!(path, "\"$user\", public");
}

#[tokio::test]
async fn an_unknown_user_gets_no_tenant_and_keeps_the_connection_clean() {
    let app = spawn_app().await;
    let pool = pool(
        service_url(&app.db_name).parse().unwrap(),
        1,
        ConnectionLimits::default(),
    )
    .unwrap();
    let clean = session_state(&pool).await;
    let stranger = uuid::Uuid::new_v4();
    let err = TenantTx::begin(&pool, caller(stranger), Access::ReadOnly)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, RoutingError::NoTenant), "{err}");
    // Pipelined: the statement behind a failed entry never runs as anyone.
    let err = TenantTx::once(
        &pool,
        caller(stranger),
        Access::ReadWrite,
        "SELECT pg_advisory_lock(7)",
        &[],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RoutingError::NoTenant), "{err}");
    assert_eq!(session_state(&pool).await, clean);
}

/// A pool of one connection, alternating between two tenants a thousand
/// times, with failures, dropped requests and session SETs thrown in: every
/// answer is the asking tenant's own.
#[tokio::test]
async fn a_pool_of_one_alternating_tenants_never_serves_one_tenants_data_to_another() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for name in ["jonas", "katia"] {
        let token = app.token(name).await;
        let response = app
            .call(Method::PUT, "/api/summaries/quick", &token)
            .json(&json!({"content": format!("I am {name}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        users.push((name, user_id(&app, name).await, app.role_of(name).await));
    }
    let pool = pool(
        service_url(&app.db_name).parse().unwrap(),
        1,
        ConnectionLimits::default(),
    )
    .unwrap();
    let read = "SELECT content, current_user::text, current_setting('search_path') FROM summaries WHERE kind = 'quick'";
    let mut discarded = 0;
    for i in 0..1000 {
        let (name, id, ref role) = users[i % 2];
        match i % 10 {
            // A handler error half-way: the guard is dropped in the transaction.
            3 => {
                let tx = TenantTx::begin(&pool, caller(id), Access::ReadWrite)
                    .await
                    .unwrap();
                tx.execute("UPDATE summaries SET content = 'overwritten'", &[])
                    .await
                    .unwrap();
                assert!(tx.query("SELECT 1 / 0", &[]).await.is_err());
                drop(tx);
                discarded += 1;
            }
            // The client went away mid-request: the future is dropped after
            // its requests went out, before their answers were read.
            5 => {
                let request = TenantTx::once(&pool, caller(id), Access::ReadOnly, read, &[]);
                let _ = tokio::time::timeout(Duration::from_micros(1), request).await;
            }
            // The tenant leaves session state behind and commits.
            7 => {
                let tx = TenantTx::begin(&pool, caller(id), Access::ReadWrite)
                    .await
                    .unwrap();
                tx.execute(
                    "SELECT set_config('search_path', 'tenant_jonas, tenant_katia', false)",
                    &[],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
            _ => {}
        }
        let rows = TenantTx::once(&pool, caller(id), Access::ReadOnly, read, &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].get::<_, String>(0),
            format!("I am {name}"),
            "round {i}"
        );
        assert_eq!(&rows[0].get::<_, String>(1), role, "round {i}");
        let search_path = if on_citus() {
            // Citus runs a statement on a tenant's table whole on its
            // worker, in Citus's own session there: the routed
            // transaction's own setting is read by a statement of its own.
            let tx = TenantTx::begin(&pool, caller(id), Access::ReadOnly)
                .await
                .unwrap();
            let rows = tx
                .query("SELECT current_setting('search_path')", &[])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            rows[0].get::<_, String>(0)
        } else {
            rows[0].get::<_, String>(2)
        };
        assert_eq!(search_path, format!("tenant_{name}, reference"));
    }
    assert_eq!(discarded, 100);
}

/// `db stop` / `db start` while `serve` runs: requests fail fast with 503
/// and Retry-After during the outage, and the service finds the cluster
/// again by itself, also when it comes back on another port.
#[tokio::test]
async fn the_service_recovers_when_the_embedded_cluster_restarts_on_another_port() {
    use tenantry::configuration::{DatabaseTarget, SecretString};
    use tenantry::embedded::Cluster;

    let dir = temp_dir("tenantry-recovery");
    spawn_reaper(&dir);
    let mut settings = test_settings("unused");
    settings.database = DatabaseTarget::Embedded;
    settings.data_dir = dir.clone();
    settings.jwt_secret = Some(SecretString::new(JWT_SECRET.into()));
    let app = spawn_app_on(settings, "tenantry".into()).await;
    let token = app.token("lars").await;
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let get = |path: &str| {
        api.get(format!("{}{path}", app.address))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get("/api/experiences").await.unwrap().status(), 200);

    let cluster = Cluster::open(&dir).unwrap();
    let old_port = cluster.running().unwrap().unwrap().port;
    let stopper = cluster.clone();
    tokio::task::spawn_blocking(move || stopper.stop())
        .await
        .unwrap()
        .unwrap();
    let outage = get("/api/experiences")
        .await
        .expect("an answer, not a hang");
    assert_eq!(outage.status(), 503);
    assert!(outage.headers().contains_key("retry-after"));
    assert_eq!(json(outage).await["error"]["code"], "unavailable");

    // The old port is taken meanwhile: the cluster comes back elsewhere.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", old_port)).unwrap();
    let starter = cluster.clone();
    let running = tokio::task::spawn_blocking(move || starter.ensure_running(&[]))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(running.port, old_port);
    let mut status = 0;
    for _ in 0..40 {
        status = get("/api/experiences").await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(status, 200, "the service found the restarted cluster");
    let health = api
        .get(format!("{}/health", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(squatter);
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap()
        .unwrap();
}

/// A freshly registered user's token generation.
pub(crate) fn caller(user_id: uuid::Uuid) -> tenantry::routing::Caller {
    tenantry::routing::Caller {
        user_id,
        generation: 0,
        session: None,
    }
}
