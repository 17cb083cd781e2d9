//! GDPR: export, erasure (self-service, admin, CLI) and restore from an
//! export.

use reqwest::Method;
use serde_json::{json, Value};

use crate::accounts::staff_token;
use crate::helpers::*;

/// Register `name` and give them some data through the API.
async fn tenant_with_data(app: &TestApp, name: &str) -> Value {
    let signup = json(app.register(name).await).await;
    let token = signup["access_token"].as_str().unwrap();
    for (title, year) in [
        ("Data engineer", 2019),
        ("Analyst \"quoted\" \\ back", 2016),
    ] {
        let r = app
            .call(Method::POST, "/api/experiences", token)
            .json(&json!({"title": title, "organization": "Acme", "started_on": format!("{year}-01-01"), "skills": ["SQL"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let c = json(
        app.call(Method::POST, "/api/conversations", token)
            .json(&json!({"topic": "career_planning"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let r = app
        .call(
            Method::POST,
            &format!("/api/conversations/{}/messages", c["id"]),
            token,
        )
        .json(&json!({"content": "Where next? ünïcødé ✓"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = app
        .call(Method::POST, "/api/skills", token)
        .json(&json!({"name": "SQL", "level": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    signup
}

async fn export_api(app: &TestApp, token: &str) -> (u16, String) {
    let r = app
        .call(Method::GET, "/api/me/export", token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn table<'a>(export: &'a Value, name: &str) -> &'a Vec<Value> {
    export["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("table {name} in the export"))["rows"]
        .as_array()
        .unwrap()
}

#[tokio::test]
async fn an_export_holds_every_row_and_the_account_from_the_api_and_the_cli() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "elsa").await;
    tenant_with_data(&app, "other").await;
    let token = signup["access_token"].as_str().unwrap();
    let (status, text) = export_api(&app, token).await;
    assert_eq!(status, 200);
    let export: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(export["format"], "tenantry-export");
    assert_eq!(export["template_version"], latest_version());
    assert_eq!(export["account"]["username"], "elsa");
    assert_eq!(export["account"]["email"], "elsa@example.com");
    assert!(export["account"].get("password_hash").is_none());
    assert_eq!(export["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(table(&export, "experiences").len(), 2);
    assert_eq!(
        table(&export, "messages")[0]["content"],
        "Where next? ünïcødé ✓"
    );
    assert_eq!(table(&export, "skills").len(), 1);
    // Every table of the schema, found in the catalog (none left out).
    let names: Vec<&str> = export["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let in_schema = app
        .count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_elsa'
             AND tablename <> 'refinery_schema_history'",
        )
        .await;
    assert_eq!(names.len() as i64, in_schema);
    assert!(
        names.iter().position(|n| *n == "experiences")
            < names.iter().position(|n| *n == "experience_highlights"),
        "parents before the tables that reference them: {names:?}"
    );
    assert!(!text.contains("other@example.com"), "another tenant's data");
    let rows: usize = export["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["rows"].as_array().unwrap().len())
        .sum();
    assert_eq!(export["integrity"]["rows"], rows as i64);
    assert_eq!(rows, 6);

    // The CLI exports the same tables.
    let out = tenantry(&["tenants", "export", "elsa"], &cli_env(&app.db_name), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let from_cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_cli["tables"], export["tables"]);
    let out = tenantry(
        &["tenants", "export", "nobody"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(status_of(app.get("/api/me/export").await), 401);
}

fn status_of(r: reqwest::Response) -> u16 {
    r.status().as_u16()
}

#[tokio::test]
async fn self_service_erasure_needs_the_password_and_leaves_nothing_behind() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "erik").await;
    let other = tenant_with_data(&app, "frida").await;
    let token = signup["access_token"].as_str().unwrap();
    let role = app.role_of("erik").await;

    let wrong = app
        .call(Method::DELETE, "/api/me", token)
        .json(&json!({"password": "not the password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        app.schema_count().await,
        2,
        "a wrong password removes nothing"
    );

    let erased = app
        .call(Method::DELETE, "/api/me", token)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);
    let receipt = json(erased).await;
    assert_eq!(receipt["schema"], "tenant_erik");
    assert_eq!(
        receipt["rows"], 6,
        "2 experiences, 1 conversation, 1 message, 1 skill and its progress: {receipt}"
    );
    let experiences = receipt["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "experiences")
        .unwrap()
        .clone();
    assert_eq!(experiences["rows"], 2);
    let seq = receipt["audit_entry"].as_i64().unwrap();

    // Nothing of the tenant remains in the catalog or the control plane.
    let db = app.db().await;
    let left = db
        .query_one(
            "SELECT to_regnamespace('tenant_erik') IS NULL,
                    NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1),
                    NOT EXISTS (SELECT 1 FROM tenantry.users WHERE username = 'erik'),
                    NOT EXISTS (SELECT 1 FROM tenantry.refresh_tokens r
                                WHERE r.user_id = $2::text::uuid),
                    NOT EXISTS (SELECT 1 FROM pg_default_acl d JOIN pg_roles r ON r.oid = d.defaclrole
                                WHERE r.rolname = $1)",
            &[&role, &signup["user_id"].as_str().unwrap()],
        )
        .await
        .unwrap();
    for i in 0..5 {
        assert!(left.get::<_, bool>(i), "check {i}");
    }
    let entry: String = db
        .query_one(
            "SELECT entry FROM tenantry.audit_log WHERE seq = $1",
            &[&seq],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        entry.contains("tenant_erased") && !entry.contains("erik"),
        "{entry}"
    );

    // Old tokens are dead; the name can be registered again, empty.
    assert_eq!(
        status_of(
            app.call(Method::GET, "/api/experiences", token)
                .send()
                .await
                .unwrap()
        ),
        401
    );
    let refresh = app
        .post_json(
            "/api/auth/refresh",
            &json!({"refresh_token": signup["refresh_token"]}),
        )
        .await;
    assert_eq!(refresh.status(), 401);
    let again = json(app.register("erik").await).await;
    let fresh = again["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{again}"));
    let list = json(
        app.call(Method::GET, "/api/experiences", fresh)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        list["items"]
            .as_array()
            .unwrap_or_else(|| panic!("{list}"))
            .len(),
        0
    );
    // The other tenant is untouched.
    let theirs = json(
        app.call(
            Method::GET,
            "/api/experiences",
            other["access_token"].as_str().unwrap(),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(theirs["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn admins_and_the_cli_erase_with_a_receipt_and_the_cli_asks_for_yes() {
    let app = spawn_app().await;
    tenant_with_data(&app, "gina").await;
    tenant_with_data(&app, "hans").await;
    let admin = staff_token(&app, "ada", false).await;
    let user = app.token("ivan").await;
    assert_eq!(
        status_of(
            app.call(Method::DELETE, "/admin/tenants/gina", &user)
                .send()
                .await
                .unwrap()
        ),
        403
    );
    let r = app
        .call(Method::DELETE, "/admin/tenants/gina", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["rows"], 6);
    assert_eq!(
        status_of(
            app.call(Method::DELETE, "/admin/tenants/gina", &admin)
                .send()
                .await
                .unwrap()
        ),
        404
    );

    let env = cli_env(&app.db_name);
    let out = tenantry(&["tenants", "delete", "hans"], &env, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert_eq!(app.schema_count().await, 2, "without --yes nothing happens");
    let out = tenantry(
        &["tenants", "delete", "hans", "--yes", "--json"],
        &env,
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (receipt["schema"].as_str(), receipt["rows"].as_i64()),
        (Some("tenant_hans"), Some(6))
    );
    assert!(receipt["audit_entry"].as_i64().unwrap() > 0);
    let out = tenantry(&["tenants", "delete", "hans", "--yes"], &env, None).await;
    assert_eq!(out.status.code(), Some(1), "no such tenant any more");
    assert_eq!(app.schema_count().await, 1);
}

#[tokio::test]
async fn an_erasure_waits_for_requests_in_flight_and_later_ones_get_401() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "jana").await;
    let token = signup["access_token"].as_str().unwrap().to_owned();
    let user_id: uuid::Uuid = signup["user_id"].as_str().unwrap().parse().unwrap();
    // A request in flight: a routed transaction held open by the test.
    let pool = tenantry::db::pool(
        service_url(&app.db_name).parse().unwrap(),
        2,
        tenantry::db::ConnectionLimits::default(),
    )
    .unwrap();
    let tx = tenantry::routing::TenantTx::begin(
        &pool,
        tenantry::routing::Caller {
            user_id,
            generation: 0,
            session: None,
        },
        tenantry::routing::Access::ReadWrite,
    )
    .await
    .unwrap();
    tx.query("SELECT count(*) FROM experiences", &[])
        .await
        .unwrap();
    let erase = app
        .call(Method::DELETE, "/api/me", &token)
        .json(&json!({"password": PASSWORD}))
        .send();
    let in_flight = async {
        // The erasure waits on the request's lock; the request finishes.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        assert_eq!(
            app.schema_count().await,
            1,
            "nothing dropped under a running request"
        );
        tx.execute(
            "INSERT INTO experiences (title, started_on) VALUES ('late', '2020-01-01')",
            &[],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    };
    let (erased, ()) = futures::join!(erase, in_flight);
    let erased = erased.unwrap();
    assert_eq!(erased.status(), 200);
    assert_eq!(
        json(erased).await["rows"],
        7,
        "counted once the request ended (6 + its insert)"
    );
    assert_eq!(app.schema_count().await, 0);
    // Requests during and after erasure: 401, never a 500.
    let statuses = futures::future::join_all((0..20).map(|_| async {
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
}

#[tokio::test]
async fn requests_racing_an_erasure_end_cleanly() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "karl").await;
    let token = signup["access_token"].as_str().unwrap().to_owned();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let hammer = async {
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let rounds = futures::future::join_all((0..8).map(|i| {
                let (method, path) = if i % 2 == 0 {
                    (Method::GET, "/api/experiences")
                } else {
                    (Method::POST, "/api/skills")
                };
                app.call(method, path, &token)
                    .json(&json!({"name": format!("s{i}"), "level": 2}))
                    .send()
            }))
            .await;
            seen.extend(rounds.into_iter().map(|r| r.unwrap().status().as_u16()));
        }
        seen
    };
    let erase = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = app
            .call(Method::DELETE, "/api/me", &token)
            .json(&json!({"password": PASSWORD}))
            .send()
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        r.status().as_u16()
    };
    let (seen, erased) = futures::join!(hammer, erase);
    assert_eq!(erased, 200);
    assert!(
        seen.iter().all(|s| [200, 201, 401, 404].contains(s)),
        "{seen:?}"
    );
    assert!(seen.contains(&401));
}

#[tokio::test]
async fn a_fleet_run_skips_a_tenant_being_erased_and_erasing_again_finishes_it() {
    let dir = builtin_templates_with(&[(
        &format!("V{}__notes.sql", latest_version() + 1),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let app = spawn_app().await;
    tenant_with_data(&app, "lena").await;
    tenant_with_data(&app, "mona").await;
    // An erasure that stopped after marking the tenant (a crash, say).
    app.db()
        .await
        .execute(
            "UPDATE tenantry.tenants SET status = 'deleting' WHERE username = 'lena'",
            &[],
        )
        .await
        .unwrap();
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));
    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let versions = app
        .db()
        .await
        .query(
            "SELECT username, template_version FROM tenantry.tenants ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
        .collect::<Vec<_>>();
    assert_eq!(
        versions,
        [
            ("lena".into(), latest_version()),
            ("mona".into(), latest_version() + 1)
        ]
    );
    let out = tenantry(&["tenants", "delete", "lena", "--yes"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(app.schema_count().await, 1);
}

/// `tenants export NAME` into a file of its own: the output and the file's
/// path.
async fn export_to_file(
    env: &[(&'static str, String)],
    name: &str,
) -> (std::process::Output, String) {
    let exported = tenantry(&["tenants", "export", name], env, None).await;
    assert!(exported.status.success(), "{}", stderr(&exported));
    let dir = temp_dir("tenantry-export");
    spawn_reaper(&dir);
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, &exported.stdout).unwrap();
    (exported, file.display().to_string())
}

#[tokio::test]
async fn export_erase_import_export_gives_the_same_data() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "nora").await;
    let env = cli_env(&app.db_name);
    let (before, file_arg) = export_to_file(&env, "nora").await;

    // A name that exists is refused.
    let out = tenantry(
        &["tenants", "import", &file_arg],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("taken") || stderr(&out).contains("registered"),
        "{}",
        stderr(&out)
    );

    let token = signup["access_token"].as_str().unwrap();
    let r = app
        .call(Method::DELETE, "/api/me", token)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = tenantry(
        &["tenants", "import", &file_arg],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let after = tenantry(&["tenants", "export", "nora"], &env, None).await;
    let (before, after): (Value, Value) = (
        serde_json::from_slice(&before.stdout).unwrap(),
        serde_json::from_slice(&after.stdout).unwrap(),
    );
    assert_eq!(after["tables"], before["tables"]);
    assert_eq!(after["account"]["email"], before["account"]["email"]);

    // The restored tenant works, and new rows get new ids.
    let login = json(
        app.post_json(
            "/api/auth/login",
            &json!({"username": "nora", "password": "a new password, fine"}),
        )
        .await,
    )
    .await;
    let token = login["access_token"].as_str().unwrap();
    let created = json(
        app.call(Method::POST, "/api/experiences", token)
            .json(&json!({"title": "New", "started_on": "2024-01-01"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let loaded: Vec<i64> = table(&before, "experiences")
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    let new_id = created["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{created}"));
    if on_citus() {
        // A row made on a worker (direct routing) takes its id from that
        // worker's range of the sequence (Citus: the node's group id times
        // 2^48 on): past every loaded id of that range, whichever worker
        // the tenant came back to.
        assert!(
            loaded
                .iter()
                .filter(|&&id| id >> 48 == new_id >> 48)
                .all(|&id| id < new_id),
            "{new_id} after {loaded:?}"
        );
    } else {
        assert!(new_id > *loaded.iter().max().unwrap());
    }

    // Under another name, as a copy.
    let out = tenantry(
        &[
            "tenants",
            "import",
            &file_arg,
            "--as",
            "nora_copy",
            "--email",
            "copy@example.com",
        ],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nora_copy.experiences")
            .await,
        2
    );
}

#[tokio::test]
async fn a_tampered_truncated_or_foreign_export_is_refused_and_creates_nothing() {
    let app = spawn_app().await;
    tenant_with_data(&app, "otto").await;
    let env = cli_env(&app.db_name);
    let exported = tenantry(&["tenants", "export", "otto"], &env, None)
        .await
        .stdout;
    let text = String::from_utf8(exported.clone()).unwrap();
    let dir = temp_dir("tenantry-export");
    spawn_reaper(&dir);
    let cases = [
        (
            "tampered",
            text.replacen("Data engineer", "Data engineeR", 1)
                .into_bytes(),
        ),
        ("truncated", exported[..exported.len() - 120].to_vec()),
        ("truncated", exported[..exported.len() / 2].to_vec()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let file = dir.join(format!("{i}.json"));
        std::fs::write(&file, bytes).unwrap();
        let out = tenantry(
            &[
                "tenants",
                "import",
                &file.display().to_string(),
                "--as",
                "copy_x",
                "--email",
                "x@example.com",
            ],
            &env,
            Some("a new password, fine"),
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let expected = if *what == "tampered" {
            "altered"
        } else {
            "truncated"
        };
        assert!(stderr(&out).contains(expected), "{what}: {}", stderr(&out));
    }
    // Signed with another installation's secret.
    let file = dir.join("ok.json");
    std::fs::write(&file, &exported).unwrap();
    let mut foreign = env.clone();
    foreign.retain(|(k, _)| *k != "JWT_SECRET");
    foreign.push((
        "JWT_SECRET",
        "another-secret-another-secret-another-1".into(),
    ));
    let out = tenantry(
        &[
            "tenants",
            "import",
            &file.display().to_string(),
            "--as",
            "copy_y",
            "--email",
            "y@example.com",
        ],
        &foreign,
        Some("a new password, fine"),
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(app.schema_count().await, 1);
}

#[tokio::test]
async fn an_export_at_an_older_version_imports_forward_and_a_newer_one_is_refused() {
    // A database whose tenants are one version ahead (a template this
    // binary lacks).
    let v5 = builtin_templates_with(&[(
        &format!("V{}__notes.sql", latest_version() + 1),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let newer_app = spawn_app_with({
        let v5 = v5.clone();
        move |s| s.templates_dir = Some(v5)
    })
    .await;
    tenant_with_data(&newer_app, "pia").await;
    let mut env = cli_env(&newer_app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", v5.display().to_string()));
    let exported = tenantry(&["tenants", "export", "pia"], &env, None)
        .await
        .stdout;
    let dir = temp_dir("tenantry-export");
    spawn_reaper(&dir);
    let file = dir.join("pia.json");
    std::fs::write(&file, &exported).unwrap();

    let app = spawn_app().await;
    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &cli_env(&app.db_name),
        Some("a new password, fine"),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("newer"), "{}", stderr(&out));
    assert_eq!(app.schema_count().await, 0);

    // An export made at the binary's latest version imports into the newer
    // database and is moved to its version.
    tenant_with_data(&app, "quinn").await;
    let exported = tenantry(
        &["tenants", "export", "quinn"],
        &cli_env(&app.db_name),
        None,
    )
    .await
    .stdout;
    assert_eq!(
        serde_json::from_slice::<Value>(&exported).unwrap()["template_version"],
        latest_version()
    );
    std::fs::write(&file, &exported).unwrap();
    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let version: i32 = newer_app
        .db()
        .await
        .query_one(
            "SELECT template_version FROM tenantry.tenants WHERE username = 'quinn'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, latest_version() + 1);
    assert_eq!(
        newer_app
            .count("SELECT count(*) FROM tenant_quinn.experiences")
            .await,
        2
    );
    assert_eq!(
        newer_app
            .count("SELECT count(*) FROM tenant_quinn.notes")
            .await,
        0
    );
}

#[tokio::test]
async fn a_tenant_larger_than_the_lock_table_is_erased() {
    // A cluster of its own with a small lock table: 10 locks per transaction
    // x (20 connections + 0 prepared) = room for about 200 locks in all.
    let dir = temp_dir("tenantry-small-locks");
    let cluster = tenantry::embedded::Cluster::open(&dir).unwrap();
    let running = cluster
        .ensure_running(&[
            ("fsync", "off"),
            ("max_connections", "20"),
            ("max_locks_per_transaction", "10"),
        ])
        .unwrap();
    spawn_reaper(&dir);
    let url = |db: &str, user: &str| {
        format!(
            "host={} port={} user={user} dbname={db}",
            running.socket_dir.display(),
            running.port
        )
    };
    let admin = tenantry::db::connect(&url("postgres", "postgres").parse().unwrap())
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE svc LOGIN CREATEROLE")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE big OWNER svc")
        .await
        .unwrap();
    let mut settings = test_settings("unused");
    settings.database = tenantry::configuration::DatabaseTarget::Url(
        tenantry::configuration::SecretString::new(url("big", "svc")),
    );
    settings.pool_size = 4;
    let app = spawn_app_on(settings, "big".into()).await;
    let signup = json(app.register("huge").await).await;

    // 400 more tables in the tenant's schema, made as its role, a batch per
    // transaction (more than that would not fit either).
    let db = tenantry::db::connect(&url("big", "postgres").parse().unwrap())
        .await
        .unwrap();
    let role: String = db
        .query_one(
            "SELECT role_name FROM tenantry.tenants WHERE username = 'huge'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for batch in 0..40 {
        let mut sql = format!("BEGIN; SET LOCAL ROLE \"{role}\";");
        for i in 0..10 {
            sql.push_str(&format!(
                "CREATE TABLE tenant_huge.extra_{batch}_{i} (id int, note text);"
            ));
        }
        sql.push_str("COMMIT;");
        db.batch_execute(&sql).await.unwrap();
    }
    let (relations, lock_table): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'tenant_huge'::regnamespace),
                        current_setting('max_locks_per_transaction')::int8
                          * (current_setting('max_connections')::int8 + current_setting('max_prepared_transactions')::int8)",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        relations > lock_table,
        "{relations} relations, lock table {lock_table}"
    );
    // One transaction could not drop them all at once.
    let err = db
        .batch_execute("BEGIN; DROP SCHEMA tenant_huge CASCADE; ROLLBACK;")
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("shared memory"), "{err:?}");
    db.batch_execute("ROLLBACK").await.ok();

    let r = app
        .call(
            Method::DELETE,
            "/api/me",
            signup["access_token"].as_str().unwrap(),
        )
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let gone: bool = db
        .query_one(
            "SELECT to_regnamespace('tenant_huge') IS NULL
                    AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone);
}

/// An export signed before a key rotation imports while the old secret is
/// `JWT_PREVIOUS_SECRET`, and is refused once it is gone.
#[tokio::test]
async fn an_export_signed_before_a_key_rotation_imports_with_the_previous_secret() {
    let app = spawn_app().await;
    let signup = tenant_with_data(&app, "rosa").await;
    let env = cli_env(&app.db_name);
    let (_, file_arg) = export_to_file(&env, "rosa").await;
    app.erase_self(signup["access_token"].as_str().unwrap())
        .await;

    let new_secret = "the-next-secret-the-next-secret-0123456789".to_string();
    let rotated_away = vec![
        ("DATABASE_URL", service_url(&app.db_name)),
        ("JWT_SECRET", new_secret.clone()),
    ];
    let out = tenantry(
        &["tenants", "import", &file_arg],
        &rotated_away,
        Some("a new password, fine"),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let mut rotating = rotated_away.clone();
    rotating.push(("JWT_PREVIOUS_SECRET", JWT_SECRET.to_string()));
    let out = tenantry(
        &["tenants", "import", &file_arg],
        &rotating,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(app.schema_count().await, 1);
}
