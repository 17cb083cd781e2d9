//! Direct routing on Citus (`db::direct`, `TENANTRY_CITUS_ROUTING`): a
//! tenant's request runs on the worker that holds it, in a session of the
//! service's own; a stale placement is refused there, counted, read again
//! and the request sent where the tenant is.
//! On plain PostgreSQL the one server serves everything and nothing is
//! ever forwarded.

use reqwest::Method;
use tenantry::configuration::CitusRouting;

use crate::helpers::*;

/// A superuser connection to every node of the test's database, with the
/// node's port: the coordinator and the workers, or the one server.
async fn nodes(app: &TestApp) -> Vec<(u16, tokio_postgres::Client)> {
    match CITUS.as_ref() {
        Some(c) => {
            let mut all = Vec::new();
            for port in std::iter::once(c.coordinator).chain(c.workers.iter().copied()) {
                all.push((port, connect_to_node(port, &app.db_name).await));
            }
            all
        }
        None => vec![(CLUSTER.running.port, app.db().await)],
    }
}

/// The node that holds `schema`'s tables (the one server on plain).
async fn holder(app: &TestApp, schema: &str) -> u16 {
    let Some(_) = CITUS.as_ref() else {
        return CLUSTER.running.port;
    };
    let port: i32 = app
        .db()
        .await
        .query_one(
            "SELECT nodeport FROM pg_catalog.citus_shards
             WHERE table_name::text LIKE $1 || '.%' LIMIT 1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    u16::try_from(port).unwrap()
}

/// The backends waiting on a lock in the test's database, on every node:
/// (node's port, user, application name).
async fn lock_waiters(app: &TestApp) -> Vec<(u16, String, String)> {
    let mut all = Vec::new();
    for (port, client) in nodes(app).await {
        let rows = client
            .query(
                "SELECT usename::text, application_name FROM pg_catalog.pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        all.extend(rows.iter().map(|r| (port, r.get(0), r.get(1))));
    }
    all
}

/// A read of `token`'s tenant held on a lock of its table, and where it
/// waits: started, seen waiting (forced: the test holds the lock), then let
/// go; the read must answer 200.
async fn where_a_read_waits(app: &TestApp, token: &str, schema: &str) -> (u16, String, String) {
    let mut db = app.db().await;
    let tx = db.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "LOCK TABLE {schema}.experiences IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    let read = tokio::spawn(app.call(Method::GET, "/api/experiences", token).send());
    let mut waiting = Vec::new();
    for _ in 0..400 {
        waiting = lock_waiters(app).await;
        if !waiting.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    tx.commit().await.unwrap();
    assert_eq!(read.await.unwrap().unwrap().status(), 200);
    assert_eq!(waiting.len(), 1, "one read waits: {waiting:?}");
    waiting.remove(0)
}

#[tokio::test]
async fn a_tenants_read_runs_on_the_node_that_holds_it_as_the_service() {
    let app = spawn_app().await;
    let token = app.token("ann").await;
    let holder = holder(&app, "tenant_ann").await;
    let service = service_role(&app.db_name);
    let (node, user, application) = where_a_read_waits(&app, &token, "tenant_ann").await;
    assert_eq!(node, holder, "the read ran where ann's tables are");
    // A session of the service's own (its role is ann's only inside the
    // transaction), from the service's pool.
    assert_eq!(
        (user.as_str(), application.as_str()),
        (service.as_str(), "tenantry")
    );

    // The copy of the registry the guard reads on a worker is not the
    // tenant's to read, there or anywhere.
    let role = app.role_of("ann").await;
    for (_, client) in nodes(&app).await {
        let read = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL ROLE \"{role}\"; SELECT count(*) FROM tenantry_guard.entries"
            ))
            .await
            .expect_err("a tenant reads the guard's copy");
        let code = read.code().cloned();
        client.batch_execute("ROLLBACK").await.unwrap();
        let expected = if on_citus() {
            tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE
        } else {
            // No such schema on plain PostgreSQL.
            tokio_postgres::error::SqlState::UNDEFINED_TABLE
        };
        assert_eq!(code, Some(expected), "{read}");
    }

    if let Some(citus) = CITUS.as_ref() {
        // On the worker the guard reads the node's own placements of its
        // tables, by name, not the tables through Citus (which plans each
        // read itself, the larger part of the guard's cost there): a read
        // answers while the tables are locked on that node, where a read
        // through Citus waits for them.
        let mut worker = connect_to_node(holder, &app.db_name).await;
        let tx = worker.transaction().await.unwrap();
        tx.batch_execute(
            "LOCK TABLE tenantry_guard.entries, tenantry_guard.revoked IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
        let read = app.call(Method::GET, "/api/experiences", &token).send();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(20), read).await;
        tx.rollback().await.unwrap();
        let answered = answered.expect("the read waited for the guard's tables");
        assert_eq!(answered.unwrap().status(), 200);

        // The same read with `TENANTRY_CITUS_ROUTING=coordinator`: it runs
        // on the coordinator (which reaches the worker as ann's role).
        let through = spawn_app_with(|s| {
            s.database = tenantry::configuration::DatabaseTarget::Url(
                tenantry::configuration::SecretString::new(service_url(&app.db_name)),
            );
            s.citus_routing = CitusRouting::Coordinator;
        })
        .await;
        let through = TestApp {
            db_name: app.db_name.clone(),
            ..through
        };
        let (node, _, _) = where_a_read_waits(&through, &token, "tenant_ann").await;
        assert_eq!(node, citus.coordinator);
        assert_ne!(node, holder);
    }
}

/// `tenantry_routed_forwarded_total` from `/metrics`.
async fn forwarded(app: &TestApp) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("tenantry_routed_forwarded_total "))
        .expect("the counter is exported")
        .trim()
        .parse()
        .unwrap()
}

/// `tenantry tenants move` (another process than `app`'s service) of
/// `name`'s tenant to the worker that does not hold it: (from, to).
async fn move_to_the_other_worker(app: &TestApp, citus: &CitusCluster, name: &str) -> (u16, u16) {
    let schema = format!("tenant_{name}");
    let from = holder(app, &schema).await;
    let to = *citus.workers.iter().find(|&&w| w != from).unwrap();
    let node = format!("127.0.0.1:{to}");
    let out = tenantry(
        &["tenants", "move", name, "--node", &node],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    (from, to)
}

#[tokio::test]
async fn a_tenant_moved_behind_the_services_back_is_served_forwarded_then_directly() {
    // The placements are read at start and when asked only: the move below
    // is not seen before the first read.
    let app = spawn_app_with(|s| s.citus_refresh_interval = None).await;
    let token = app.token("bea").await;
    let read = || async {
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(read().await.status(), 200);
    // The counter is the test process's (other tests' services add to it).
    let before = forwarded(&app).await;
    let env = cli_env(&app.db_name);
    let Some(citus) = CITUS.as_ref() else {
        // Nothing to move on plain PostgreSQL, and nothing is forwarded.
        let out = tenantry(
            &["tenants", "move", "bea", "--node", "127.0.0.1:1"],
            &env,
            None,
        )
        .await;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not a Citus coordinator"),
            "{}",
            stderr(&out)
        );
        for _ in 0..3 {
            assert_eq!(read().await.status(), 200);
        }
        assert_eq!(forwarded(&app).await, before);
        return;
    };
    // Another process moves bea: this service's map still has the old node.
    let (_, to) = move_to_the_other_worker(&app, citus, "bea").await;
    assert_eq!(holder(&app, "tenant_bea").await, to);
    // Served anyway (refused on the old node, sent again to the new one),
    // and counted.
    let first = read().await;
    assert_eq!(first.status(), 200);
    assert!(forwarded(&app).await > before);
    // The entry is read again: the next reads go straight to the new node.
    for _ in 0..5 {
        assert_eq!(read().await.status(), 200);
    }
    let (node, _, application) = where_a_read_waits(&app, &token, "tenant_bea").await;
    assert_eq!((node, application.as_str()), (to, "tenantry"));
}

/// A worker that no longer holds a tenant never admits a request for it
/// from its copy of the registry (a node taken out of the cluster keeps a
/// copy nobody writes): its guard refuses before reading it, and the
/// request is judged where the tenant is.
#[tokio::test]
async fn a_worker_that_no_longer_holds_a_tenant_never_admits_it_from_its_copy() {
    let app = spawn_app_with(|s| s.citus_refresh_interval = None).await;
    let token = app.token("cora").await;
    let read = || async {
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(read().await, 200);
    let before = forwarded(&app).await;
    let suspend = || async {
        app.db()
            .await
            .execute(
                "UPDATE tenantry.users SET suspended_at = now(), suspension_reason = 'test'
                 WHERE username = 'cora'",
                &[],
            )
            .await
            .unwrap()
    };
    let Some(citus) = CITUS.as_ref() else {
        // One server, one registry: suspended is refused.
        suspend().await;
        assert_eq!(read().await, 403);
        assert_eq!(forwarded(&app).await, before);
        return;
    };
    // Another process moves cora; this service's map still has the old
    // node. Then cora is suspended, and the old node's copy is made to
    // say otherwise (as a copy nobody writes any more would).
    let (from, _) = move_to_the_other_worker(&app, citus, "cora").await;
    suspend().await;
    let old = connect_to_node(from, &app.db_name).await;
    let stale = old
        .execute(
            "DO $$ BEGIN
                 SET LOCAL citus.enable_manual_changes_to_shards = on;
                 EXECUTE pg_catalog.format('UPDATE %s SET suspended = false WHERE schema_name = %L',
                     (SELECT pg_catalog.shard_name(logicalrelid, shardid) FROM pg_catalog.pg_dist_shard
                       WHERE logicalrelid = 'tenantry_guard.entries'::regclass),
                     'tenant_cora');
             END $$",
            &[],
        )
        .await;
    stale.unwrap();
    let copy: bool = old
        .query_one(
            "SELECT suspended FROM tenantry_guard.entries WHERE schema_name = 'tenant_cora'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!copy, "the old node's copy says cora may enter");

    // Refused where cora is, not admitted by the old node's copy.
    assert_eq!(read().await, 403);
    assert!(
        forwarded(&app).await > before,
        "the stale entry was counted"
    );
    assert_eq!(read().await, 403);
}

#[test]
fn the_routing_setting_is_direct_by_default_and_refuses_anything_else() {
    use tenantry::configuration::Settings;
    let with = |value: Option<&str>| {
        Settings::from_lookup(|name| match name {
            "TENANTRY_CITUS_ROUTING" => value.map(str::to_owned),
            "JWT_SECRET" => Some("x".repeat(32)),
            _ => None,
        })
    };
    assert_eq!(with(None).unwrap().citus_routing, CitusRouting::Direct);
    assert_eq!(
        with(Some("coordinator")).unwrap().citus_routing,
        CitusRouting::Coordinator
    );
    let refused = with(Some("sideways")).unwrap_err().to_string();
    assert!(refused.contains("TENANTRY_CITUS_ROUTING"), "{refused}");
}

#[tokio::test]
async fn a_guard_made_after_tenants_signed_up_holds_them_as_the_registry_does() {
    let app = spawn_app().await;
    let ann = app.token("ann").await;
    let bob = app.token("bob").await;
    let db = app.db().await;
    db.execute(
        "UPDATE tenantry.users SET suspended_at = now(), suspension_reason = 'test' WHERE username = 'bob'",
        &[],
    )
    .await
    .unwrap();
    let guard: bool = db
        .query_one(
            "SELECT pg_catalog.to_regnamespace('tenantry_guard') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(guard, on_citus(), "the guard's copy exists on Citus only");
    if on_citus() {
        // As a start cut off before the copy was filled, or an older guard
        // that left it stale: ann's row missing, bob's saying he is not
        // suspended, and the copy not marked done.
        let id = |name: &'static str| {
            let db = &db;
            async move {
                db.query_one(
                    "SELECT id FROM tenantry.users WHERE username = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get::<_, uuid::Uuid>(0)
            }
        };
        let (ann_id, bob_id) = (id("ann").await, id("bob").await);
        db.execute(
            "DELETE FROM tenantry_guard.entries WHERE user_id = $1",
            &[&ann_id],
        )
        .await
        .unwrap();
        db.execute(
            "UPDATE tenantry_guard.entries SET suspended = false WHERE user_id = $1",
            &[&bob_id],
        )
        .await
        .unwrap();
        db.batch_execute("COMMENT ON SCHEMA tenantry_guard IS NULL")
            .await
            .unwrap();
    }
    // The next start makes it again from the registry.
    let again = spawn_app_on(test_settings(&app.db_name), app.db_name.clone()).await;
    let read = |token: String| {
        let again = &again;
        async move {
            let response = again
                .call(Method::GET, "/api/experiences", &token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, json(response).await)
        }
    };
    assert_eq!(read(ann.clone()).await.0, 200);
    let (status, body) = read(bob).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "account_suspended");
    let (node, _, application) = where_a_read_waits(&again, &ann, "tenant_ann").await;
    assert_eq!(
        (node, application.as_str()),
        (holder(&again, "tenant_ann").await, "tenantry")
    );
}
