//! Tenant roles made ahead of signups (`tenancy::spares`, issue 28): a
//! signup takes one in its transaction and changes no role, so no other
//! session's membership cache is thrown away. Plain PostgreSQL only (on
//! Citus a signup's role is made in its head start; scripts/test-citus
//! leaves this module out).

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// A skill for `token`'s tenant (201).
async fn add_skill(app: &TestApp, token: &str) {
    let created = app
        .call(Method::POST, "/api/skills", token)
        .json(&json!({"name": "SQL", "level": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
}

/// `token`'s tenant writes an experience (201), and a new tenant `other`
/// sees none of it.
async fn writes_and_others_see_nothing(app: &TestApp, token: &str, other: &str) {
    let created = app
        .call(Method::POST, "/api/experiences", token)
        .json(&json!({"title": "Harbour pilot", "started_on": "2024-01-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let other = app.token(other).await;
    let seen: Value = json(
        app.call(Method::GET, "/api/experiences", &other)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen["items"].as_array().map(Vec::len), Some(0), "{seen}");
}

/// Every row of `pg_authid` and `pg_auth_members` that involves a role of
/// the installation, with the transaction that wrote it (`xmin`): equal
/// before and after only if nothing made, changed or granted a role.
async fn role_rows(app: &TestApp) -> String {
    let prefix = app.role_prefix().await;
    app.db()
        .await
        .query_one(
            "SELECT coalesce((SELECT string_agg(a.rolname || ':' || a.xmin::text, ',' ORDER BY a.rolname)
                              FROM pg_authid a WHERE starts_with(a.rolname, $1)), '')
                    || ' | ' ||
                    coalesce((SELECT string_agg(r.rolname || '>' || u.rolname || ':' || m.xmin::text, ','
                                                ORDER BY r.rolname, u.rolname)
                              FROM pg_auth_members m
                              JOIN pg_authid r ON r.oid = m.roleid
                              JOIN pg_authid u ON u.oid = m.member
                              WHERE starts_with(r.rolname, $1) OR starts_with(u.rolname, $1)), '')",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn serve_keeps_spare_roles_and_a_signup_takes_one_changing_no_role() {
    let app = spawn_app_with(|s| s.spare_roles = 4).await;
    // Made before the service listened.
    let spares = app.spare_roles().await;
    assert_eq!(spares.len(), 4);
    let prefix = app.role_prefix().await;
    for role in &spares {
        assert!(role.starts_with(&format!("{prefix}_t")), "{role}");
    }
    let before = role_rows(&app).await;

    let signup = app.register("sam").await;
    assert_eq!(signup.status(), 201);
    let token = json(signup).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let role = app.role_of("sam").await;
    assert!(spares.contains(&role), "{role} was a spare");
    let left = app.spare_roles().await;
    assert_eq!(left.len(), 3);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "tenantry_spare_roles 3"),
        "{metrics}"
    );
    assert!(!left.contains(&role));
    assert_eq!(
        role_rows(&app).await,
        before,
        "the signup made, changed or granted no role"
    );
    assert_eq!(app.stray_role_count().await, 0);

    // The tenant works as its role: its tables are the role's, its data
    // its own.
    let owners = app
        .count(&format!(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_sam' AND tablename <> 'refinery_schema_history' AND tableowner <> '{role}'"
        ))
        .await;
    assert_eq!(
        owners, 0,
        "every template table of tenant_sam belongs to {role}"
    );
    writes_and_others_see_nothing(&app, &token, "tess").await;

    // Two signups in, two spares are left: at half, no refill; the third
    // leaves one, and the service makes the stock whole again.
    assert_eq!(app.spare_roles().await.len(), 2);
    app.token("uma").await;
    until("the stock of spares is refilled", || async {
        app.spare_roles().await.len() == 4
    })
    .await;
    // The pool's sessions, warm from before the batch, act as its roles.
    let batch = app.spare_roles().await;
    for name in ["vera", "walt", "xena"] {
        let token = app.token(name).await;
        assert!(batch.contains(&app.role_of(name).await), "{name}");
        let created = app
            .call(Method::POST, "/api/experiences", &token)
            .json(&json!({"title": "Lock keeper", "started_on": "2024-01-01"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201, "{name}");
    }
    assert_eq!(app.stray_role_count().await, 0);
}

#[tokio::test]
async fn a_signup_killed_mid_transaction_leaves_its_spare_a_spare() {
    killed_signup_leaves_its_spare(0).await;
}

/// With router roles (`db::routers`) a spare is its router's: a killed
/// signup leaves it that router's spare, changing no membership.
#[tokio::test]
async fn with_routers_a_killed_signup_leaves_its_spare_its_routers() {
    killed_signup_leaves_its_spare(2).await;
}

/// The spares (name and router), sorted.
async fn spares_and_routers(app: &TestApp) -> Vec<(String, i32)> {
    app.db()
        .await
        .query(
            "SELECT role_name, router FROM tenantry.spare_roles ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn killed_signup_leaves_its_spare(routers: usize) {
    let db = create_database().await;
    // V2 sleeps, so the process can be killed while the tenant's schema and
    // V1 tables exist inside its open transaction, its spare taken.
    let (env, templates) = slow_signup_env(&db).await;
    let mut settings = test_settings(&db);
    settings.templates_dir = Some(templates.clone());
    let stock = 2 * routers.max(1);
    settings.spare_roles = stock;
    settings.router_roles = routers;
    let app = spawn_app_on(settings, db.clone()).await;
    let spares = app.spare_roles().await;
    assert_eq!(spares.len(), stock);
    let dealt = spares_and_routers(&app).await;
    let before = role_rows(&app).await;

    let mut child = spawn_tenants_create(&env, "quinn").await;
    let admin = connect(&db).await;
    let backend = sleeping_backend(&admin).await;
    // The signup holds one spare: only the other can be locked now.
    let mut probe = connect(&db).await;
    let tx = probe.transaction().await.unwrap();
    let free = tx
        .query(
            "SELECT role_name FROM tenantry.spare_roles FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await
        .unwrap()
        .len();
    tx.rollback().await.unwrap();
    assert_eq!(free, stock - 1, "the signup in flight has taken a spare");
    child.kill().await.unwrap(); // SIGKILL: no cleanup code runs

    // The server notices the vanished client and rolls back.
    backend_ended(&admin, backend).await;
    assert_eq!(app.spare_roles().await, spares, "every spare is a spare");
    assert_eq!(spares_and_routers(&app).await, dealt, "each its router's");
    assert_eq!(role_rows(&app).await, before, "no role was made or changed");
    assert_eq!(app.tenant_counts().await, (0, 0, 0));
    assert_eq!(app.stray_role_count().await, 0);

    // The name is free, and the next signup takes a spare.
    let out = tenantry(
        &["tenants", "create", "quinn", "--email", "quinn@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let role = app.role_of("quinn").await;
    assert!(spares.contains(&role));
    assert_eq!(app.spare_roles().await.len(), stock - 1);
    if routers > 0 {
        // Its router's spare, so its router's already.
        let user: uuid::Uuid = app
            .db()
            .await
            .query_one(
                "SELECT id FROM tenantry.users WHERE username = 'quinn'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let router = tenantry::db::routers::router_of(user, routers) as i32;
        assert!(
            dealt.contains(&(role.clone(), router)),
            "{role} was router {router}'s"
        );
        assert_eq!(role_rows(&app).await, before, "the signup changed no role");
    }
}

#[tokio::test]
async fn two_refills_at_once_make_one_batch() {
    let db = create_database().await;
    let mut service = connect_as_service(&db).await;
    let (installation, _) = tenantry::db::bootstrap(&mut service).await.unwrap();
    let mut holder = connect(&db).await;
    let lock = holder.transaction().await.unwrap();
    lock.execute(
        "SELECT pg_advisory_xact_lock($1, 0)",
        &[&tenantry::tenancy::spares::REFILL_LOCK_CLASS],
    )
    .await
    .unwrap();
    let refills: Vec<_> = (0..2)
        .map(|_| {
            let (db, installation) = (db.clone(), installation.clone());
            tokio::spawn(async move {
                let mut client = connect_as_service(&db).await;
                tenantry::tenancy::spares::refill(&mut client, &installation, 6)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let admin = connect(&db).await;
    until("both refills wait on the lock", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 2
    })
    .await;
    lock.commit().await.unwrap();
    let mut made = Vec::new();
    for refill in refills {
        made.push(refill.await.unwrap());
    }
    made.sort();
    assert_eq!(made, [0, 6], "one batch between them");
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM tenantry.spare_roles").await, 6);
    // Each a role in the group, the service a member of it.
    assert_eq!(
        count(
            "SELECT count(*) FROM tenantry.spare_roles s, tenantry.installation i
             WHERE pg_has_role(s.role_name, 'tnt_' || i.id || '__tenants', 'MEMBER')
               AND pg_has_role(current_database() || '_svc', s.role_name, 'MEMBER')
               AND NOT (SELECT rolcanlogin FROM pg_roles WHERE rolname = s.role_name)"
        )
        .await,
        6
    );
    // A full stock, or one at half, is left alone; below half it is made
    // whole.
    let mut client = connect_as_service(&db).await;
    use tenantry::tenancy::spares::refill;
    assert_eq!(refill(&mut client, &installation, 6).await.unwrap(), 0);
    assert_eq!(refill(&mut client, &installation, 12).await.unwrap(), 0);
    assert_eq!(refill(&mut client, &installation, 13).await.unwrap(), 7);
    assert_eq!(count("SELECT count(*) FROM tenantry.spare_roles").await, 13);
}

#[tokio::test]
async fn a_tenant_on_a_spare_is_erased_exported_imported_and_checked_like_any() {
    let app = spawn_app_with(|s| s.spare_roles = 6).await;
    let env = cli_env(&app.db_name);
    let spares = app.spare_roles().await;
    let signup = json(app.register("nora").await).await;
    let token = signup["access_token"].as_str().unwrap().to_owned();
    add_skill(&app, &token).await;
    let first_role = app.role_of("nora").await;
    assert!(spares.contains(&first_role));

    // Spares are no drift, and a repair leaves them.
    let out = tenantry(&["fleet", "check", "--repair"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(app.spare_roles().await.len(), 5);

    let exported = tenantry(&["tenants", "export", "nora"], &env, None).await;
    assert!(exported.status.success(), "{}", stderr(&exported));
    let dir = temp_dir("tenantry-spares-export");
    spawn_reaper(&dir);
    let file = dir.join("nora.json");
    std::fs::write(&file, &exported.stdout).unwrap();

    // Erased: its role is dropped, not made a spare again.
    let erased = app
        .call(Method::DELETE, "/api/me", &token)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{first_role}'"
        ))
        .await,
        0
    );
    assert!(!app.spare_roles().await.contains(&first_role));

    // Imported: the import takes a spare too, and the data is back.
    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let second_role = app.role_of("nora").await;
    assert!(spares.contains(&second_role) && second_role != first_role);
    assert_eq!(app.spare_roles().await.len(), 4);
    let again = tenantry(&["tenants", "export", "nora"], &env, None).await;
    let (before, after): (Value, Value) = (
        serde_json::from_slice(&exported.stdout).unwrap(),
        serde_json::from_slice(&again.stdout).unwrap(),
    );
    assert_eq!(before["tables"], after["tables"]);
    assert_eq!(app.stray_role_count().await, 0);
    let out = tenantry(&["fleet", "check"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[tokio::test]
async fn a_spare_the_service_cannot_act_as_is_passed_over_and_taken_out() {
    let app = spawn_app_with(|s| s.spare_roles = 2).await;
    let good = app.spare_roles().await;
    // A spare in the group whose membership of the service is missing (a
    // stock damaged by hand; a session whose cache missed a batch meets
    // the same refusal), and the oldest, so the next signup takes it.
    let id = app.installation_id().await;
    let bad = format!("tnt_{id}__t00000000000000ff");
    app.db()
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{bad}\" NOLOGIN; GRANT \"tnt_{id}__tenants\" TO \"{bad}\";
             INSERT INTO tenantry.spare_roles (role_name, made_at) VALUES ('{bad}', '2000-01-01')"
        ))
        .await
        .unwrap();

    let token = app.token("yara").await;
    let role = app.role_of("yara").await;
    assert_ne!(role, bad);
    assert!(!good.contains(&role), "made in the signup's transaction");
    assert_eq!(
        app.spare_roles().await,
        good,
        "the bad spare is out of the stock"
    );
    add_skill(&app, &token).await;
    // Left for `fleet check --repair`, like any role no tenant names.
    assert_eq!(app.stray_role_count().await, 1);
    let out = tenantry(
        &["fleet", "check", "--repair"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(stdout(&out).contains(&bad), "{}", stdout(&out));
    assert_eq!(app.stray_role_count().await, 0);
    // The next signup takes a good spare.
    app.token("zeno").await;
    assert!(good.contains(&app.role_of("zeno").await));
}

/// Four clients sign up while the stock runs low and is refilled again
/// and again under them (a stock of 20: a batch every ~10 signups).
#[tokio::test]
async fn signups_across_many_refills_all_succeed_each_on_its_own_role() {
    let app = spawn_app_with(|s| s.spare_roles = 20).await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (api, address, next) = (app.api.clone(), app.address.clone(), next.clone());
            tokio::spawn(async move {
                let mut refused = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= 200 {
                        break;
                    }
                    let name = format!("crowd{i}");
                    let signup = api
                        .post(format!("{address}/api/auth/register"))
                        .json(&json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD}))
                        .send()
                        .await
                        .unwrap();
                    if signup.status() != 201 {
                        refused.push(format!("{name}: {}", signup.status()));
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = Vec::new();
    for client in clients {
        refused.extend(client.await.unwrap());
    }
    assert_eq!(refused, Vec::<String>::new());
    assert_eq!(app.tenant_counts().await, (200, 200, 200));
    assert_eq!(
        app.count("SELECT count(DISTINCT role_name) FROM tenantry.tenants")
            .await,
        200
    );
    // Most roles came from batches: the transactions that wrote the
    // tenants' roles are far fewer than the tenants (a role made in its
    // signup has a transaction of its own).
    let writers = app
        .count(
            "SELECT count(DISTINCT a.xmin::text) FROM pg_authid a
             JOIN tenantry.tenants t ON t.role_name = a.rolname",
        )
        .await;
    assert!(
        writers < 100,
        "{writers} transactions wrote 200 tenant roles"
    );
    assert_eq!(app.stray_role_count().await, 0);
}

#[tokio::test]
async fn a_signup_that_finds_no_spare_makes_its_role_and_the_stock_is_made_again() {
    let app = spawn_app_with(|s| s.spare_roles = 2).await;
    let taken = app.spare_roles().await;
    assert_eq!(taken.len(), 2);
    // Taken by others (another process's signups, say): none is left.
    app.db()
        .await
        .batch_execute("DELETE FROM tenantry.spare_roles")
        .await
        .unwrap();
    app.token("ada").await;
    let role = app.role_of("ada").await;
    assert!(!taken.contains(&role), "made in the signup's transaction");
    until("the empty stock is made again", || async {
        app.spare_roles().await.len() == 2
    })
    .await;
    assert!(app.spare_roles().await.iter().all(|r| !taken.contains(r)));
}

/// The resets counter (`tenantry_membership_resets_total`) as rendered.
fn membership_resets() -> f64 {
    tenantry::metrics::handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("tenantry_membership_resets_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// A request refused its tenant's role (what a session whose cached
/// memberships missed a batch of spares does; here the membership is
/// revoked for real) resets every session's memberships with a change to a
/// role that changes nothing, at most once per 10 s, tries once more and
/// fails with a plain 500.
#[tokio::test]
async fn a_request_refused_its_tenants_role_resets_the_sessions_memberships_at_most_every_ten_seconds(
) {
    let app = spawn_app().await;
    let token = app.token("rita").await;
    let role = app.role_of("rita").await;
    let group_row = || async {
        app.db()
            .await
            .query_one(
                "SELECT a.xmin::text FROM pg_authid a, tenantry.installation i
                 WHERE a.rolname = 'tnt_' || i.id || '__tenants'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let read = || async {
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(read().await, 200);
    let svc = service_role(&app.db_name);
    app.db()
        .await
        .batch_execute(&format!("REVOKE \"{role}\" FROM \"{svc}\""))
        .await
        .unwrap();
    let (resets, group) = (membership_resets(), group_row().await);
    assert_eq!(read().await, 500);
    assert_eq!(membership_resets(), resets + 1.0);
    assert_ne!(
        group_row().await,
        group,
        "the group's row was written again"
    );
    let group = group_row().await;
    assert_eq!(read().await, 500);
    assert_eq!(membership_resets(), resets + 1.0, "not again within 10 s");
    assert_eq!(group_row().await, group);
    app.db()
        .await
        .batch_execute(&format!("GRANT \"{role}\" TO \"{svc}\""))
        .await
        .unwrap();
    assert_eq!(read().await, 200);
}

/// `serve` with `roles` spares, `schemas` of them built (waited for), and
/// `routers` router roles.
async fn app_with_built(roles: usize, schemas: usize, routers: usize) -> TestApp {
    let app = spawn_app_with(|s| {
        s.spare_roles = roles;
        s.spare_schemas = schemas;
        s.router_roles = routers;
    })
    .await;
    until("the spares' schemas are built", || async {
        built_spares(&app).await.len() == schemas
    })
    .await;
    app
}

/// `tenantry fleet check` finds no drift (spares and their schemas are
/// none).
async fn fleet_checks_clean(app: &TestApp) {
    let out = tenantry(&["fleet", "check"], &cli_env(&app.db_name), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("no drift"), "{}", stdout(&out));
}

/// The spares whose schema is built (on Citus: and distributed): (role,
/// schema, version), by role.
async fn built_spares(app: &TestApp) -> Vec<(String, String, i32)> {
    app.db()
        .await
        .query(
            "SELECT role_name, schema_name, template_version FROM tenantry.spare_roles
             WHERE template_version IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A schema's tables: (name, oid, owner), by name.
async fn tables_of(app: &TestApp, schema: &str) -> Vec<(String, u32, String)> {
    app.db()
        .await
        .query(
            "SELECT c.relname::text, c.oid, pg_get_userbyid(c.relowner)::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every template table of `schema` belongs to `role` (the history to the
/// service).
async fn owned_by(app: &TestApp, schema: &str, role: &str) {
    let tables = tables_of(app, schema).await;
    assert!(tables.len() > 5, "{schema}: {tables:?}");
    for (name, _, owner) in tables {
        if name == "refinery_schema_history" {
            assert_ne!(owner, role, "{schema}.{name}");
        } else {
            assert_eq!(owner, role, "{schema}.{name}");
        }
    }
}

/// When the spare builder's connection ("tenantry spares") last counted the
/// stock to decide whether to wait (`tenancy::spares::its_turn`).
async fn builder_counted(app: &TestApp) -> Option<std::time::SystemTime> {
    app.db()
        .await
        .query_opt(
            "SELECT query_start FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'tenantry spares'
               AND query LIKE 'SELECT router, count(*) FILTER (WHERE template_version = $1)%'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Until the builder has counted the stock twice more, its built stock
/// `built` all the while: whatever it decided at the first count (a build
/// included) is done by the second.
async fn builder_counted_twice_keeping(app: &TestApp, built: usize) {
    let mut last = builder_counted(app).await;
    for _ in 0..2 {
        let before = last;
        until("the spare builder counts its stock again", || async move {
            let now = built_spares(app).await.len();
            assert_eq!(now, built, "a spare's schema was built under load");
            let counted = builder_counted(app).await;
            counted.is_some() && counted > before
        })
        .await;
        last = builder_counted(app).await;
    }
}

#[tokio::test]
async fn under_load_spare_schemas_are_built_only_from_the_low_water_mark_and_when_requests_let_up()
{
    // 8 built: below a quarter of them (2) the builder builds whatever the
    // load, above it it waits for a moment with no request on the database.
    let app = spawn_app_with(|s| {
        // Eight signups below take eight: the roles are refilled meanwhile.
        s.spare_roles = 10;
        s.spare_schemas = 8;
        // The held request below must not be stopped meanwhile.
        s.statement_timeout = std::time::Duration::from_secs(300);
        s.client_timeout = std::time::Duration::from_secs(300);
    })
    .await;
    let token = app.token("hal").await;
    until("the stock is whole again", || async {
        built_spares(&app).await.len() == 8
    })
    .await;

    // A request held on a lock keeps one of the service's connections busy.
    let mut db = app.db().await;
    let held = db.transaction().await.unwrap();
    held.batch_execute("LOCK TABLE tenant_hal.experiences IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let request = tokio::spawn({
        let call = app
            .call(Method::GET, "/api/experiences", &token)
            .timeout(std::time::Duration::from_secs(300));
        async move { call.send().await.unwrap().status() }
    });
    until("the request waits for the lock", || async {
        app.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 1
    })
    .await;

    // Five signups take five built spares: 3 left, above the mark, and
    // nothing is built while the request runs; the roles, 4 of 10 left,
    // are made whole meanwhile.
    for name in ["ida", "ivo", "ivy", "iza", "inu"] {
        assert_eq!(app.register(name).await.status(), 201, "{name}");
    }
    until(
        "the spare roles are refilled while the builder waits",
        || async { app.count("SELECT count(*) FROM tenantry.spare_roles").await == 10 },
    )
    .await;
    builder_counted_twice_keeping(&app, 3).await;

    // Two more: 1 left, below the mark: the builder builds up to it,
    // the request still running.
    for name in ["jon", "jay"] {
        assert_eq!(app.register(name).await.status(), 201, "{name}");
    }
    until("the stock is built up to the low-water mark", || async {
        built_spares(&app).await.len() == 2
    })
    .await;
    builder_counted_twice_keeping(&app, 2).await;
    assert!(!request.is_finished(), "the request was running all along");

    // The request done, the stock is made whole.
    held.rollback().await.unwrap();
    assert_eq!(request.await.unwrap(), 200);
    until("the stock is whole once the requests let up", || async {
        built_spares(&app).await.len() == 8
    })
    .await;
    assert_eq!(app.stray_role_count().await, 0);
}

#[tokio::test]
async fn serve_builds_spare_schemas_and_a_signup_renames_one_running_no_template() {
    let app = app_with_built(4, 2, 0).await;
    let built = built_spares(&app).await;
    let latest = latest_version();
    let mut tables = std::collections::HashMap::new();
    for (role, schema, version) in &built {
        assert!(schema.starts_with("tenant__s"), "{schema}");
        assert_eq!(*version, latest);
        assert_eq!(history_of(&app, schema).await, versions_up_to(latest));
        owned_by(&app, schema, role).await;
        tables.insert(schema.clone(), tables_of(&app, schema).await);
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "tenantry_spare_schemas 2"),
        "{metrics}"
    );
    // A spare's schema is no drift.
    fleet_checks_clean(&app).await;
    let roles_before = role_rows(&app).await;

    let signup = app.register("sam").await;
    assert_eq!(signup.status(), 201);
    let token = json(signup).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let role = app.role_of("sam").await;
    let (_, spare, _) = built
        .iter()
        .find(|(r, _, _)| *r == role)
        .expect("sam took a spare whose schema was built");
    // The very tables of the spare (the same OIDs), now tenant_sam's: the
    // schema was renamed, no template ran.
    assert_eq!(tables_of(&app, "tenant_sam").await, tables[spare]);
    assert!(tables_of(&app, spare).await.is_empty(), "{spare} is gone");
    assert_eq!(history_of(&app, "tenant_sam").await, versions_up_to(latest));
    owned_by(&app, "tenant_sam", &role).await;
    assert_eq!(
        app.count("SELECT template_version::int8 FROM tenantry.tenants WHERE username = 'sam'")
            .await,
        i64::from(latest)
    );
    assert_eq!(role_rows(&app).await, roles_before, "no role was changed");

    // The tenant works, as its role, and sees only its own rows.
    writes_and_others_see_nothing(&app, &token, "tess").await;
    let mine: Value = json(
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(mine["items"].as_array().map(Vec::len), Some(1), "{mine}");

    // The two signups took both built schemas; the service builds two more.
    until("two spares' schemas are built again", || async {
        let now = built_spares(&app).await;
        now.len() == 2 && now.iter().all(|(_, s, _)| !tables.contains_key(s))
    })
    .await;
    assert_eq!(app.stray_role_count().await, 0);
    fleet_checks_clean(&app).await;

    // Erased like any tenant: its schema and its role are gone (on Citus
    // from every node: Citus drops them there).
    app.erase_self(&token).await;
    assert!(tables_of(&app, "tenant_sam").await.is_empty());
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = '{role}'"
        ))
        .await,
        0
    );
    assert_eq!(app.stray_role_count().await, 0);
    fleet_checks_clean(&app).await;
}

#[tokio::test]
async fn a_spare_built_before_a_new_version_is_brought_up_to_it() {
    let app = app_with_built(3, 2, 0).await;
    let built = built_spares(&app).await;
    let latest = latest_version();
    let mut tables = std::collections::HashMap::new();
    for (_, schema, _) in &built {
        tables.insert(schema.clone(), tables_of(&app, schema).await);
    }
    let next = latest + 1;
    let dir = builtin_templates_with(&[(
        &format!("V{next}__notes.sql"),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));
    let out = tenantry(&["templates", "publish"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    if on_citus() {
        // No spare is at the new version, and a distributed schema is not
        // brought up to date in a signup: sam's tenant is made with a head
        // start, every version run.
        assert_eq!(app.register("sam").await.status(), 201);
        let role = app.role_of("sam").await;
        assert!(!built.iter().any(|(r, _, _)| *r == role), "{role}");
        assert_eq!(history_of(&app, "tenant_sam").await, versions_up_to(next));
        // The service drops the spares built before and builds them again
        // at the new version.
        until("two spares' schemas are at the new version", || async {
            let now = built_spares(&app).await;
            now.len() == 2 && now.iter().all(|(_, _, v)| *v == next)
        })
        .await;
        for (_, schema, _) in &built {
            assert!(tables_of(&app, schema).await.is_empty(), "{schema} dropped");
        }
        for (role, schema, _) in built_spares(&app).await {
            assert_eq!(history_of(&app, &schema).await, versions_up_to(next));
            owned_by(&app, &schema, &role).await;
        }
        // The next signup takes one: its very tables.
        let mut fresh = std::collections::HashMap::new();
        for (role, schema, _) in built_spares(&app).await {
            fresh.insert(role, tables_of(&app, &schema).await);
        }
        assert_eq!(app.register("tom").await.status(), 201);
        let tom = app.role_of("tom").await;
        assert_eq!(
            Some(&tables_of(&app, "tenant_tom").await),
            fresh.get(&tom),
            "tom took a built spare"
        );
        assert_eq!(history_of(&app, "tenant_tom").await, versions_up_to(next));
        fleet_checks_clean(&app).await;
    } else {
        // The signup takes a spare built at the version before, and
        // applies only the new one.
        assert_eq!(app.register("sam").await.status(), 201);
        let role = app.role_of("sam").await;
        let (_, spare, _) = built
            .iter()
            .find(|(r, _, _)| *r == role)
            .expect("sam took a spare whose schema was built");
        let now = tables_of(&app, "tenant_sam").await;
        let kept: Vec<_> = now
            .iter()
            .filter(|(n, _, _)| n != "notes")
            .cloned()
            .collect();
        assert_eq!(kept, tables[spare], "the spare's tables, renamed");
        assert!(
            now.iter().any(|(n, _, o)| n == "notes" && *o == role),
            "{now:?}"
        );
        assert_eq!(history_of(&app, "tenant_sam").await, versions_up_to(next));
        assert_eq!(
            app.count("SELECT template_version::int8 FROM tenantry.tenants WHERE username = 'sam'")
                .await,
            i64::from(next)
        );

        // The service brings the other up to the new version (the same
        // schema) and builds one more at it.
        let (other_role, other, _) = built.iter().find(|(r, _, _)| *r != role).unwrap();
        until("two spares' schemas are at the new version", || async {
            let now = built_spares(&app).await;
            now.len() == 2 && now.iter().all(|(_, _, v)| *v == next)
        })
        .await;
        assert!(built_spares(&app)
            .await
            .iter()
            .any(|(r, s, _)| r == other_role && s == other));
        assert_eq!(history_of(&app, other).await, versions_up_to(next));
        owned_by(&app, other, other_role).await;
        fleet_checks_clean(&app).await;
    }
}

#[tokio::test]
async fn a_spare_build_cut_off_by_a_kill_is_finished_or_made_again_by_the_next_serve() {
    let app = spawn_app().await;
    // A version that waits on a lock the test holds: the build stops there.
    let next = latest_version() + 1;
    let dir = builtin_templates_with(&[(
        &format!("V{next}__wait.sql"),
        "SELECT pg_advisory_xact_lock(7077);",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));
    let out = tenantry(&["templates", "publish"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    env.push(("TENANTRY_SPARE_ROLES", "1".to_string()));
    env.push(("TENANTRY_SPARE_SCHEMAS", "1".to_string()));

    let holder = connect(&app.db_name).await;
    holder
        .execute("SELECT pg_advisory_lock(7077)", &[])
        .await
        .unwrap();
    let (mut serve, _) = serve_process(&app.db_name, &env).await;
    let admin = connect(&app.db_name).await;
    let backend = std::cell::Cell::new(0);
    until("the build waits on the lock", || async {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%pg_advisory_xact_lock(7077)%'",
                &[],
            )
            .await
            .unwrap();
        row.map(|r| backend.set(r.get(0))).is_some()
    })
    .await;
    let state = || async {
        let row = app
            .db()
            .await
            .query_one(
                "SELECT schema_name, template_version FROM tenantry.spare_roles",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, Option<String>>(0),
            row.get::<_, Option<i32>>(1),
        )
    };
    let on = &app;
    let distributed = |schema: String| async move {
        on.count(&format!(
            "SELECT count(*) FROM pg_dist_schema WHERE schemaid = to_regnamespace('{schema}')"
        ))
        .await
    };
    // SIGKILL mid-build: no cleanup code runs; the backend ends once the
    // lock is free and it finds its client gone.
    serve.kill().await.unwrap();
    holder
        .execute("SELECT pg_advisory_unlock(7077)", &[])
        .await
        .unwrap();
    backend_ended(&admin, backend.get()).await;
    let (schema, version) = state().await;
    assert_eq!(version, None, "no spare is built");
    let half = if on_citus() {
        // Citus distributes a committed schema only: the empty schema was
        // committed first, and is all there is.
        let schema = schema.expect("the empty schema, committed");
        assert_eq!(
            tables_of(&app, &schema)
                .await
                .iter()
                .map(|t| t.0.as_str())
                .collect::<Vec<_>>(),
            ["refinery_schema_history"]
        );
        assert_eq!(distributed(schema.clone()).await, 0);
        Some(schema)
    } else {
        // One transaction: nothing of the build is left.
        assert_eq!(schema, None);
        None
    };

    // The next serve builds it: on Citus the same schema, finished.
    let (mut again, _) = serve_process(&app.db_name, &env).await;
    until("the spare is built", || async {
        built_spares(&app).await.len() == 1
    })
    .await;
    let (role, schema, version) = built_spares(&app).await.remove(0);
    assert_eq!(version, next);
    if let Some(half) = half {
        assert_eq!(schema, half, "the schema begun, finished");
        assert_eq!(distributed(schema.clone()).await, 1);
    }
    assert_eq!(history_of(&app, &schema).await, versions_up_to(next));
    owned_by(&app, &schema, &role).await;
    again.kill().await.unwrap();
    fleet_checks_clean(&app).await;
}

#[tokio::test]
async fn a_killed_signup_leaves_its_built_spare_as_it_was() {
    let app = app_with_built(2, 2, 0).await;
    let built = built_spares(&app).await;
    let mut tables = Vec::new();
    for (_, schema, _) in &built {
        tables.push(tables_of(&app, schema).await);
    }
    let before = role_rows(&app).await;

    // The audit chain's head held: the signup's entry, its last statement,
    // waits on it, the spare's schema renamed inside its transaction.
    let mut holder = connect(&app.db_name).await;
    let head = holder.transaction().await.unwrap();
    head.execute("SELECT FROM tenantry.audit_head FOR UPDATE", &[])
        .await
        .unwrap();
    let mut child = spawn_tenants_create(&cli_env(&app.db_name), "quinn").await;
    let admin = connect(&app.db_name).await;
    let backend = std::cell::Cell::new(0);
    until("the signup waits on the audit chain", || async {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                 AND wait_event_type = 'Lock' AND query LIKE '%audit_head%'",
                &[],
            )
            .await
            .unwrap();
        row.map(|r| backend.set(r.get(0))).is_some()
    })
    .await;
    let mut probe = connect(&app.db_name).await;
    let tx = probe.transaction().await.unwrap();
    let free = tx
        .query(
            "SELECT role_name FROM tenantry.spare_roles FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await
        .unwrap()
        .len();
    tx.rollback().await.unwrap();
    assert_eq!(free, 1, "the signup in flight has taken a spare");
    // SIGKILL: no cleanup code runs. Its backend goes on once the head is
    // free, finds its client gone at the end of what it was sent, and
    // rolls back.
    child.kill().await.unwrap();
    head.rollback().await.unwrap();
    backend_ended(&admin, backend.get()).await;

    assert_eq!(built_spares(&app).await, built, "every spare is as it was");
    for ((_, schema, _), tables) in built.iter().zip(&tables) {
        assert_eq!(&tables_of(&app, schema).await, tables, "{schema}");
    }
    assert!(tables_of(&app, "tenant_quinn").await.is_empty());
    assert_eq!(role_rows(&app).await, before, "no role was made or changed");
    assert_eq!(app.tenant_counts().await, (0, 0, 0));

    // The name is free, and the next signup takes a built spare.
    let out = tenantry(
        &["tenants", "create", "quinn", "--email", "quinn@example.com"],
        &cli_env(&app.db_name),
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let role = app.role_of("quinn").await;
    let i = built.iter().position(|(r, _, _)| *r == role).unwrap();
    assert_eq!(tables_of(&app, "tenant_quinn").await, tables[i]);
}

#[tokio::test]
async fn with_routers_the_built_schemas_are_shared_among_the_routers() {
    let app = app_with_built(8, 4, 4).await;
    // One for each router: a signup takes one of its own router's spares.
    let routers = app
        .count(
            "SELECT count(DISTINCT router) FROM tenantry.spare_roles
             WHERE schema_name IS NOT NULL AND router BETWEEN 0 AND 3",
        )
        .await;
    assert_eq!(routers, 4);
    let built = built_spares(&app).await;
    let token = app.token("sam").await;
    let role = app.role_of("sam").await;
    let (_, spare, _) = built
        .iter()
        .find(|(r, _, _)| *r == role)
        .expect("sam took a built spare of its router's");
    assert!(
        tables_of(&app, spare).await.is_empty(),
        "{spare} was renamed"
    );
    owned_by(&app, "tenant_sam", &role).await;
    let created = app
        .call(Method::POST, "/api/experiences", &token)
        .json(&json!({"title": "Ferry pilot", "started_on": "2024-01-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
}

#[tokio::test]
async fn an_import_leaves_the_spares_built_at_a_newer_version_than_its_export() {
    let app = spawn_app_with(|s| {
        s.spare_roles = 4;
        s.spare_schemas = 2;
    })
    .await;
    let env = cli_env(&app.db_name);
    until("two spares' schemas are built", || async {
        built_spares(&app).await.len() == 2
    })
    .await;
    let token = app.token("nora").await;
    add_skill(&app, &token).await;
    let exported = tenantry(&["tenants", "export", "nora"], &env, None).await;
    assert!(exported.status.success(), "{}", stderr(&exported));
    let dir = temp_dir("tenantry-spares-export");
    spawn_reaper(&dir);
    let file = dir.join("nora.json");
    std::fs::write(&file, &exported.stdout).unwrap();
    let erased = app
        .call(Method::DELETE, "/api/me", &token)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);

    // A new version; a signup (which wakes the builder) takes one built
    // spare, and the builder brings every built spare up to it.
    let next = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{next}__notes.sql"),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let mut publishing = env.clone();
    publishing.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    let out = tenantry(&["templates", "publish"], &publishing, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    app.token("olga").await;
    until("two spares' schemas are at the new version", || async {
        let now = built_spares(&app).await;
        now.len() == 2 && now.iter().all(|(_, _, v)| *v == next)
    })
    .await;
    let built = built_spares(&app).await;

    // The export is at the version before: the import builds its tenant
    // there, so it leaves the built spares (newer) alone, then brings the
    // tenant up to the new version.
    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(built_spares(&app).await, built, "the built spares are left");
    let role = app.role_of("nora").await;
    assert!(built.iter().all(|(r, _, _)| *r != role));
    owned_by(&app, "tenant_nora", &role).await;
    assert_eq!(history_of(&app, "tenant_nora").await, versions_up_to(next));
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nora.skills").await,
        1
    );
    fleet_checks_clean(&app).await;
}

#[tokio::test]
async fn while_a_backup_runs_a_signup_takes_no_built_spare() {
    let app = app_with_built(2, 1, 0).await;
    let built = built_spares(&app).await;
    // What `tenantry backup` holds while pg_dump runs (pg_dump reads some
    // definitions from the live catalog: a schema renamed meanwhile would
    // be dumped half under each name).
    let holder = connect(&app.db_name).await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, 0)",
            &[&tenantry::db::BACKUP_LOCK_CLASS],
        )
        .await
        .unwrap();
    assert_eq!(app.register("sam").await.status(), 201);
    let sam = app.role_of("sam").await;
    assert!(built.iter().all(|(r, _, _)| *r != sam), "{sam} was built");
    assert_eq!(built_spares(&app).await, built, "the built spare is left");
    holder
        .execute(
            "SELECT pg_advisory_unlock($1, 0)",
            &[&tenantry::db::BACKUP_LOCK_CLASS],
        )
        .await
        .unwrap();
    // The backup done, the next signup takes it.
    assert_eq!(app.register("tess").await.status(), 201);
    assert_eq!(app.role_of("tess").await, built[0].0);
    assert!(tables_of(&app, &built[0].1).await.is_empty());
}

#[tokio::test]
async fn a_spare_whose_schema_cannot_be_built_is_passed_over() {
    let db = create_database().await;
    let mut settings = test_settings(&db);
    settings.spare_roles = 3;
    let app = spawn_app_on(settings, db.clone()).await;
    let spares = app.spare_roles().await;
    assert_eq!(spares.len(), 3);
    // One spare the service may no longer act as (revoked by hand).
    let admin = app.db().await;
    admin
        .batch_execute(&format!(
            "REVOKE \"{}\" FROM \"{}\"",
            spares[0],
            service_role(&db)
        ))
        .await
        .unwrap();
    // A second `serve` on the installation builds the spares' schemas.
    let mut settings = test_settings(&db);
    settings.spare_roles = 3;
    settings.spare_schemas = 3;
    let _builder = spawn_app_on(settings, db.clone()).await;
    until("the other two spares' schemas are built", || async {
        built_spares(&app).await.len() == 2
    })
    .await;
    let built: Vec<String> = built_spares(&app)
        .await
        .into_iter()
        .map(|(r, _, _)| r)
        .collect();
    assert!(!built.contains(&spares[0]), "{built:?}");
    assert_eq!(app.spare_roles().await, spares, "no spare was lost");
    // Nothing was left of the failed build.
    assert_eq!(
        app.count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenant\\_\\_%'")
            .await,
        2
    );
}

#[tokio::test]
async fn an_import_takes_a_spare_built_at_an_older_version_and_applies_the_rest() {
    let app = app_with_built(3, 2, 0).await;
    let built = built_spares(&app).await;
    let mut tables = std::collections::HashMap::new();
    for (role, schema, _) in &built {
        tables.insert(role.clone(), tables_of(&app, schema).await);
    }
    // A new version, and a tenant at it made and exported by the CLI (a
    // process of its own: `serve`'s builder is not woken, so the other
    // built spare stays at the version before).
    let next = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{next}__notes.sql"),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    let out = tenantry(&["templates", "publish"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(
        &["tenants", "create", "nora", "--email", "nora@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let token = app.access_token("nora").await;
    add_skill(&app, &token).await;
    app.db()
        .await
        .batch_execute("INSERT INTO tenant_nora.notes (body) VALUES ('kept')")
        .await
        .unwrap();
    let exported = tenantry(&["tenants", "export", "nora"], &env, None).await;
    assert!(exported.status.success(), "{}", stderr(&exported));
    let dir = temp_dir("tenantry-spares-export");
    spawn_reaper(&dir);
    let file = dir.join("nora.json");
    std::fs::write(&file, &exported.stdout).unwrap();
    let out = tenantry(&["tenants", "delete", "nora", "--yes"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let left = built_spares(&app).await;
    assert_eq!(left.len(), 1);
    assert!(left[0].2 < next, "{left:?}");

    // The import takes it, applies the new version to it, and loads the
    // rows into its tables.
    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let role = app.role_of("nora").await;
    assert_eq!(role, left[0].0, "the import took the built spare");
    let now = tables_of(&app, "tenant_nora").await;
    let kept: Vec<_> = now
        .iter()
        .filter(|(n, _, _)| n != "notes")
        .cloned()
        .collect();
    assert_eq!(kept, tables[&role], "the spare's tables, renamed");
    owned_by(&app, "tenant_nora", &role).await;
    assert_eq!(history_of(&app, "tenant_nora").await, versions_up_to(next));
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nora.skills").await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nora.notes WHERE body = 'kept'")
            .await,
        1
    );
    fleet_checks_clean(&app).await;
}
