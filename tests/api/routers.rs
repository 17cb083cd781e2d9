//! Router roles (`db::routers`, issue 28): the request pool's tenant
//! connections log in as one of a few routers, each a member of only its
//! share of the tenant roles. Plain PostgreSQL only (scripts/test-citus
//! leaves this module out: on Citus the pool logs in as the service).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tenantry::db::routers::{self, router_of, Login};
use tenantry::db::{ConnectionLimits, Connector, Installation, RequestPool, Retire};
use tenantry::domain::InstallationId;
use tenantry::routing::{Access, TenantTx};

use crate::helpers::*;
use crate::isolation::{caller, user_id};

async fn installation(app: &TestApp) -> Installation {
    let row = app
        .db()
        .await
        .query_one("SELECT id, routers FROM tenantry.installation", &[])
        .await
        .unwrap();
    Installation {
        id: InstallationId::parse(row.get(0)).unwrap(),
        superuser: false,
        citus: false,
        routers: row.get::<_, i32>(1) as usize,
    }
}

async fn logins(app: &TestApp) -> Vec<Login> {
    routers::logins(&app.db().await, &installation(app).await)
        .await
        .unwrap()
}

/// A request pool like `serve`'s: `size` connections for the routers.
async fn routed_pool(app: &TestApp, size: usize) -> RequestPool {
    RequestPool::routed(
        &Connector::plain(service_url(&app.db_name).parse().unwrap()),
        size,
        ConnectionLimits::default(),
        Retire::Exactly,
        &logins(app).await,
    )
    .unwrap()
}

/// A connection logged in as `login`'s router.
async fn connect_as(app: &TestApp, login: &Login) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = service_url(&app.db_name).parse().unwrap();
    config.user(login.role.as_str());
    config.password(login.password.as_bytes());
    tenantry::db::connect(&config).await.unwrap()
}

/// Each tenant or spare role that a router is a member of, by router.
async fn memberships(app: &TestApp) -> BTreeMap<String, BTreeSet<String>> {
    let prefix = format!("tnt_{}__r", app.installation_id().await);
    let mut by_router: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in app
        .db()
        .await
        .query(
            "SELECT m.rolname::text, g.rolname::text FROM pg_auth_members a
             JOIN pg_roles g ON g.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
             WHERE starts_with(m.rolname, $1)",
            &[&prefix],
        )
        .await
        .unwrap()
    {
        by_router.entry(row.get(0)).or_default().insert(row.get(1));
    }
    by_router
}

/// What each router should be a member of: the roles of its tenants
/// (user id modulo `count`) and its spares.
async fn wanted(app: &TestApp, count: usize) -> BTreeMap<String, BTreeSet<String>> {
    let id = app.installation_id().await;
    let mut by_router: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let db = app.db().await;
    for row in db
        .query("SELECT user_id, role_name FROM tenantry.tenants", &[])
        .await
        .unwrap()
    {
        let router = format!("tnt_{id}__r{}", router_of(row.get(0), count));
        by_router.entry(router).or_default().insert(row.get(1));
    }
    for row in db
        .query("SELECT router, role_name FROM tenantry.spare_roles", &[])
        .await
        .unwrap()
    {
        let router = format!("tnt_{id}__r{}", row.get::<_, i32>(0));
        by_router.entry(router).or_default().insert(row.get(1));
    }
    by_router
}

#[tokio::test]
async fn routed_requests_run_as_the_tenants_router_which_may_become_only_its_own_tenants() {
    let app = spawn_app_with(|s| {
        s.router_roles = 4;
        s.spare_roles = 8;
    })
    .await;
    let id = app.installation_id().await;
    // Four routers: they log in, inherit nothing, and may do nothing else.
    let attributes: Vec<(String, bool, bool, bool, bool)> = app
        .db()
        .await
        .query(
            "SELECT rolname::text, rolcanlogin, rolinherit, rolsuper, rolcreaterole
             FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
            &[&format!("tnt_{id}__r")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        attributes,
        (0..4)
            .map(|k| (format!("tnt_{id}__r{k}"), true, false, false, false))
            .collect::<Vec<_>>()
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "tenantry_router_roles 4"),
        "{metrics}"
    );
    // The stock is shared out: two spares per router, each its router's.
    let spares = app
        .count("SELECT count(*) FROM tenantry.spare_roles WHERE router BETWEEN 0 AND 3")
        .await;
    assert_eq!(spares, 8);
    assert_eq!(memberships(&app).await, wanted(&app, 4).await);

    let names = ["ada", "bob", "cyd", "dee", "eve", "fay"];
    let mut tokens = Vec::new();
    for name in names {
        tokens.push(app.token(name).await);
    }
    assert_eq!(app.stray_role_count().await, 0);
    // Every tenant's role is its router's, and no other router's.
    until("the spares are made whole", || async {
        memberships(&app).await == wanted(&app, 4).await
    })
    .await;
    // Each tenant's data, through the service's routed pool, is its own.
    for (name, token) in names.iter().zip(&tokens) {
        let created = app
            .call(Method::POST, "/api/experiences", token)
            .json(&json!({"title": format!("{name}'s work"), "started_on": "2024-01-01"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
    }
    for (name, token) in names.iter().zip(&tokens) {
        let seen = json(
            app.call(Method::GET, "/api/experiences", token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let titles: Vec<&str> = seen["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["title"].as_str().unwrap())
            .collect();
        assert_eq!(titles, [format!("{name}'s work")], "{seen}");
    }

    // A routed transaction logs in as the tenant's router and runs as the
    // tenant's role. (No refill meanwhile, which takes this lock: a batch
    // committed while a new session builds its list of memberships can be
    // missing from it, a PostgreSQL race that sends the request to the
    // service instead: `a_request_its_router_may_not_serve_…` below.)
    let mut holder = app.db().await;
    let no_refill = holder.transaction().await.unwrap();
    no_refill
        .execute(
            "SELECT pg_advisory_xact_lock($1, 0)",
            &[&tenantry::tenancy::spares::REFILL_LOCK_CLASS],
        )
        .await
        .unwrap();
    let pool = routed_pool(&app, 4).await;
    assert_eq!(pool.routers(), 4);
    for name in names {
        let user = user_id(&app, name).await;
        let rows = TenantTx::once(
            &pool,
            caller(user),
            Access::ReadOnly,
            "SELECT session_user::text, current_user::text",
            &[],
        )
        .await
        .unwrap();
        let (session, current): (String, String) = (rows[0].get(0), rows[0].get(1));
        assert_eq!(session, format!("tnt_{id}__r{}", router_of(user, 4)));
        assert_eq!(current, app.role_of(name).await);
    }
    no_refill.commit().await.unwrap();

    // A router may not become another router's tenant, has none of its
    // tenants' privileges, and reads nothing of the registry but what
    // routing reads.
    let logins = logins(&app).await;
    let ada = user_id(&app, "ada").await;
    let own = &logins[router_of(ada, 4)];
    // A tenant of another router (user ids are random: sign up until one
    // falls elsewhere).
    let mut other = None;
    for i in 0..64 {
        let name = if i < names.len() {
            names[i].to_owned()
        } else {
            let name = format!("other{i}");
            app.token(&name).await;
            name
        };
        if router_of(user_id(&app, &name).await, 4) != router_of(ada, 4) {
            other = Some(name);
            break;
        }
    }
    let other = other.expect("64 tenants all on one router of four");
    let other = other.as_str();
    let router = connect_as(&app, own).await;
    let refused = router
        .batch_execute(&format!("SET ROLE \"{}\"", app.role_of(other).await))
        .await
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"), "{refused}");
    for sql in [
        "SELECT count(*) FROM tenant_ada.experiences",
        "SELECT password_hash FROM tenantry.users",
        "SELECT email FROM tenantry.users",
        "SELECT count(*) FROM tenantry.audit_log",
        "SELECT password FROM tenantry.router_logins",
    ] {
        let refused = router.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            refused.code().map(|c| c.code()),
            Some("42501"),
            "{sql}: {refused}"
        );
    }
    router
        .batch_execute(&format!("SET ROLE \"{}\"", app.role_of("ada").await))
        .await
        .expect("a router becomes its own tenant");
}

#[tokio::test]
async fn serve_hands_each_tenant_to_its_router_and_takes_it_from_any_other() {
    // Tenants made while the pool logged in as the service.
    let app = spawn_app().await;
    for name in ["gil", "hal", "ivy", "joe", "kim"] {
        app.token(name).await;
    }
    assert!(memberships(&app).await.is_empty());
    let gil = app.access_token("gil").await;

    // `serve` with routers: each tenant is handed to its router.
    let settings = |routers: usize| {
        let mut s = test_settings(&app.db_name);
        s.router_roles = routers;
        s
    };
    let four = spawn_app_on(settings(4), app.db_name.clone()).await;
    assert_eq!(memberships(&four).await, wanted(&four, 4).await);
    assert_eq!(installation(&four).await.routers, 4);
    let seen = four
        .call(Method::GET, "/api/experiences", &gil)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    // A role made in a signup's transaction (no spares here) is granted
    // to its router there.
    four.token("lou").await;
    assert_eq!(memberships(&four).await, wanted(&four, 4).await);
    assert_eq!(four.stray_role_count().await, 0);
    // An erased tenant's role goes, and with it its router's membership.
    let lou = four.access_token("lou").await;
    four.erase_self(&lou).await;
    assert_eq!(memberships(&four).await, wanted(&four, 4).await);

    // Fewer routers: the tenants move, and the routers left over keep none.
    let two = spawn_app_on(settings(2), app.db_name.clone()).await;
    let now = memberships(&two).await;
    assert_eq!(now, wanted(&two, 2).await);
    let id = two.installation_id().await;
    assert!(
        now.keys()
            .all(|r| *r == format!("tnt_{id}__r0") || *r == format!("tnt_{id}__r1")),
        "{now:?}"
    );
    let seen = two
        .call(Method::GET, "/api/experiences", &gil)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    // `fleet check` counts no router as drift.
    let out = tenantry(&["fleet", "check"], &cli_env(&app.db_name), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("no drift"), "{}", stdout(&out));
}

#[tokio::test]
async fn a_request_its_router_may_not_serve_is_served_by_the_service() {
    let app = spawn_app_with(|s| s.router_roles = 4).await;
    let token = app.token("max").await;
    let role = app.role_of("max").await;
    let user = user_id(&app, "max").await;
    let router = format!(
        "tnt_{}__r{}",
        app.installation_id().await,
        router_of(user, 4)
    );
    // Its router lost the membership (by hand, or a hand-over still due).
    app.db()
        .await
        .batch_execute(&format!("REVOKE \"{role}\" FROM \"{router}\""))
        .await
        .unwrap();
    let seen = app
        .call(Method::GET, "/api/experiences", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    let created = app
        .call(Method::POST, "/api/experiences", &token)
        .json(&json!({"title": "Kept", "started_on": "2024-01-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // As the service, still as the tenant's role.
    let pool = routed_pool(&app, 4).await;
    let rows = TenantTx::once(
        &pool,
        caller(user),
        Access::ReadOnly,
        "SELECT session_user::text, current_user::text, count(*) FROM experiences",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), service_role(&app.db_name));
    assert_eq!(rows[0].get::<_, String>(1), role);
    assert_eq!(rows[0].get::<_, i64>(2), 1);
}

#[tokio::test]
async fn a_tenant_whose_router_is_busy_is_served_by_the_service_after_a_short_wait() {
    let app = spawn_app_with(|s| s.router_roles = 2).await;
    app.token("ned").await;
    let ned = user_id(&app, "ned").await;
    // Two connections per router.
    let pool = routed_pool(&app, 4).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(pool.for_tenant(ned).get().await.unwrap());
    }
    let (session,): (String,) = {
        let row = &held[0]
            .query("SELECT session_user::text", &[])
            .await
            .unwrap()[0];
        (row.get(0),)
    };
    assert!(
        session.ends_with(&format!("__r{}", router_of(ned, 2))),
        "{session}"
    );
    // The pool waits up to 5 s for a connection of a shard.
    let rows = tokio::time::timeout(
        Duration::from_secs(3),
        TenantTx::once(
            &pool,
            caller(ned),
            Access::ReadOnly,
            "SELECT session_user::text, current_user::text",
            &[],
        ),
    )
    .await
    .expect("ned's request waited for its busy router")
    .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), service_role(&app.db_name));
    assert_eq!(rows[0].get::<_, String>(1), app.role_of("ned").await);
    drop(held);
}

/// Whether some session of `db` waits for the advisory lock of `class`.
async fn waits_on(admin: &tokio_postgres::Client, class: i32) -> bool {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
               AND classid = $1::int4::oid
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&class],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
}

#[tokio::test]
async fn a_signup_in_flight_during_the_hand_over_is_handed_to_its_router() {
    let db = create_database().await;
    // The signup's template waits for a lock the test holds: the signup is
    // inside its transaction, its role made, until the test lets it go.
    let templates = templates_dir_with(&[(
        "V2__wait.sql",
        "SELECT pg_catalog.pg_advisory_xact_lock(4242);",
    )]);
    let mut env = cli_env(&db);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    let published = tenantry(&["templates", "publish"], &env, None).await;
    assert!(published.status.success(), "{}", stderr(&published));
    let gate = connect(&db).await;
    gate.execute("SELECT pg_advisory_lock(4242)", &[])
        .await
        .unwrap();
    // A command made without routers (none yet): its role is made now.
    let mut signup = spawn_tenants_create(&env, "olga").await;
    let admin = connect(&db).await;
    until("the signup waits inside its transaction", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND objid = 4242
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    // `serve` with routers starts meanwhile: its hand-over waits for the
    // signup in flight.
    let mut settings = test_settings(&db);
    settings.templates_dir = Some(templates.clone());
    settings.router_roles = 4;
    let serve = tokio::spawn(spawn_app_on(settings, db.clone()));
    until("the hand-over waits for the signup", || async {
        waits_on(&admin, routers::ROUTERS_LOCK_CLASS).await
    })
    .await;
    gate.execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    assert!(signup.wait().await.unwrap().success());
    let app = serve.await.unwrap();
    // The tenant that committed while the hand-over waited is its router's.
    let user = user_id(&app, "olga").await;
    let role = app.role_of("olga").await;
    let id = app.installation_id().await;
    let of = memberships(&app).await;
    assert_eq!(
        of.get(&format!("tnt_{id}__r{}", router_of(user, 4))),
        Some(&BTreeSet::from([role])),
        "{of:?}"
    );
    assert_eq!(of, wanted(&app, 4).await);
}

#[tokio::test]
async fn a_router_whose_password_was_changed_by_hand_is_given_a_new_one_at_start() {
    let app = spawn_app_with(|s| s.router_roles = 2).await;
    let token = app.token("nat").await;
    let before = logins(&app).await;
    // Changed by hand (or restored from another installation): the
    // password the service keeps no longer logs in.
    let admin = app.db().await;
    admin
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD 'changed by hand'",
            before[0].role.quoted()
        ))
        .await
        .unwrap();
    // Over TCP, where the test cluster asks for passwords (its Unix
    // socket trusts every role, so no password could fail there).
    let svc = service_role(&app.db_name);
    admin
        .batch_execute(&format!("ALTER ROLE {svc} PASSWORD 'service password'"))
        .await
        .unwrap();
    let mut settings = test_settings(&app.db_name);
    settings.router_roles = 2;
    settings.database = tenantry::configuration::DatabaseTarget::Url(
        tenantry::configuration::SecretString::new(format!(
            "host=127.0.0.1 port={} user={svc} password='service password' dbname={}",
            CLUSTER.running.port, app.db_name
        )),
    );

    let again = spawn_app_on(settings, app.db_name.clone()).await;
    let after = logins(&again).await;
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].role, before[0].role);
    assert_ne!(after[0].password, before[0].password, "router 0 re-keyed");
    assert_eq!(after[1].password, before[1].password, "router 1 untouched");
    // The pool logs in as the routers again (with the new password over
    // TCP), not as the service: a session of the tenant's router opens
    // for the request and stays in the pool. (A SCRAM login over TCP may
    // take longer than the request waits for it: the request is then
    // served by the service, and the router's session opens all the same.)
    let seen = again
        .call(Method::GET, "/api/experiences", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    let router = installation(&again)
        .await
        .id
        .router_role(router_of(user_id(&again, "nat").await, 2));
    until("a session of the tenant's router is open", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2",
                &[&router.as_str(), &app.db_name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            >= 1
    })
    .await;
}

#[tokio::test]
async fn with_routers_serve_opens_the_services_own_connections_before_it_listens() {
    // Each of them builds the whole fleet's list of roles the service may
    // become as it opens (`db::WARM_MEMBERSHIPS`), so no signup opens one.
    let app = spawn_app_with(|s| s.router_roles = 2).await;
    // Pool size 20: a service shard of max(4, 20 / 4) = 5 connections,
    // all open before the first request; those opened last ran nothing
    // since their warm-up (an idle backend shows its last query).
    let row = app
        .db()
        .await
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE query = $2) FROM pg_stat_activity
             WHERE usename = $1 AND application_name = 'tenantry'",
            &[&service_role(&app.db_name), &tenantry::db::WARM_MEMBERSHIPS],
        )
        .await
        .unwrap();
    let (open, warmed): (i64, i64) = (row.get(0), row.get(1));
    assert!(open >= 5, "{open} service connections open");
    assert!(warmed >= 1, "none of {open} shows the warm-up");
}
