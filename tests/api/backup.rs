//! Backups that restore (docs/backups.md): `tenantry backup` of an
//! installation, `tenantry restore` into a new cluster as its service role,
//! and the installation working there; the refusals that keep a restore
//! from touching an installation. On Citus a backup is refused (Citus's own
//! backup covers its workers); these tests assert that there.

use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{json, Value};
use tenantry::configuration::{DatabaseTarget, SecretString};
use tenantry::embedded::{Cluster, Running};

use crate::helpers::*;

const TENANTS: usize = 20;

/// A private PostgreSQL of its own, as on a new machine (the harness's
/// cluster holds the original installation and its roles).
struct NewCluster {
    _cluster: Cluster,
    running: Running,
}

async fn new_cluster() -> NewCluster {
    tokio::task::spawn_blocking(|| {
        let dir = temp_dir("tenantry-test-restore");
        let cluster = Cluster::open(&dir).expect("open the new cluster");
        spawn_reaper(&dir);
        let running = cluster
            .ensure_running(&[
                ("fsync", "off"),
                ("synchronous_commit", "off"),
                ("full_page_writes", "off"),
            ])
            .expect("start the new cluster");
        NewCluster {
            _cluster: cluster,
            running,
        }
    })
    .await
    .unwrap()
}

impl NewCluster {
    fn url(&self, user: &str, db_name: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={db_name}",
            self.running.socket_dir.display(),
            self.running.port
        )
    }

    async fn connect(&self, user: &str, db_name: &str) -> tokio_postgres::Client {
        let config: tokio_postgres::Config = self.url(user, db_name).parse().unwrap();
        tenantry::db::connect(&config).await.expect("connect")
    }

    /// What docs/backups.md has an admin do on a managed PostgreSQL: the
    /// service role (named as in the backup) and an empty database it owns.
    /// Returns the DATABASE_URL.
    async fn prepare(&self, service: &str) -> String {
        let admin = self.connect("postgres", "postgres").await;
        for sql in [
            format!("CREATE ROLE {service} LOGIN CREATEROLE"),
            format!("CREATE DATABASE tenantry OWNER {service}"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        self.url(service, "tenantry")
    }
}

/// The built-in templates up to `version`: what an installation had before
/// the later ones were added.
fn builtin_templates_up_to(version: i32) -> PathBuf {
    let dir = temp_dir("tenantry-templates");
    spawn_reaper(&dir);
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_templates");
    for entry in std::fs::read_dir(builtin).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let v: i32 = name[1..name.find("__").unwrap()].parse().unwrap();
        if v <= version {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    dir
}

/// A directory for a backup to go to (removed after the run).
fn backup_dir() -> PathBuf {
    let root = temp_dir("tenantry-test-backup");
    spawn_reaper(&root);
    root.join("backup")
}

fn with(
    mut env: Vec<(&'static str, String)>,
    key: &'static str,
    value: &Path,
) -> Vec<(&'static str, String)> {
    env.push((key, value.display().to_string()));
    env
}

/// Two experiences for `token`'s tenant, one naming `who`.
async fn add_rows(app: &TestApp, token: &str, who: &str) {
    for body in [
        json!({"title": format!("Engineer at {who}"), "organization": "Acme", "started_on": "2019-03-01",
               "skills": ["Rust", who]}),
        json!({"title": "Gardener", "started_on": "2012-05-01", "description": format!("{who}'s garden")}),
    ] {
        let response = app
            .call(Method::POST, "/api/experiences", token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{who}");
    }
}

async fn experiences(app: &TestApp, token: &str) -> Value {
    let response = app
        .call(Method::GET, "/api/experiences?limit=100", token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    json(response).await
}

/// On Citus: `tenantry backup` refuses, saying what to use instead.
async fn assert_refused_on_citus(db: &str) {
    let out = tenantry(
        &["backup", backup_dir().to_str().unwrap()],
        &cli_env(db),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Citus's own backup"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn an_installation_restored_into_a_new_cluster_logs_in_reads_its_rows_and_checks_clean() {
    let db = create_database().await;
    if on_citus() {
        let app = spawn_app_on(test_settings(&db), db.clone()).await;
        app.token("tenant01").await;
        return assert_refused_on_citus(&db).await;
    }
    // One tenant signed up before the latest template version existed.
    let older = latest_version() - 1;
    let mut then = test_settings(&db);
    then.templates_dir = Some(builtin_templates_up_to(older));
    let then = spawn_app_on(then, db.clone()).await;
    let mut users = vec!["elder".to_string()];
    let elder = then.token("elder").await;
    add_rows(&then, &elder, "elder").await;
    // With spare roles (made ahead of signups), which the backup carries,
    // and router roles, which it does not (`serve` makes them again).
    let mut now = test_settings(&db);
    now.spare_roles = 8;
    now.spare_schemas = 8;
    now.router_roles = 4;
    let app = spawn_app_on(now, db.clone()).await;
    users.extend((1..TENANTS).map(|i| format!("tenant{i:02}")));
    futures::future::join_all(users[1..].iter().map(|user| {
        let app = &app;
        async move {
            let token = app.token(user).await;
            add_rows(app, &token, user).await;
        }
    }))
    .await;
    let mut rows = Vec::new();
    for user in &users {
        rows.push(experiences(&app, &app.access_token(user).await).await);
    }
    // The stock the backup will hold: at half or more (a refill done), and
    // read while no refill runs (its lock taken), so no other comes.
    until("the spares are made again", || async {
        app.spare_roles().await.len() >= 4
    })
    .await;
    // And each has its schema built (nothing takes one after this, so the
    // builder has nothing more to do).
    let built = || async {
        app.db()
            .await
            .query(
                "SELECT role_name FROM tenantry.spare_roles WHERE schema_name IS NOT NULL ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    until("every spare's schema is built", || async {
        built().await.len() == app.spare_roles().await.len()
    })
    .await;
    let built = built().await;
    let stock = {
        let mut admin = app.db().await;
        let quiet = admin.transaction().await.unwrap();
        quiet
            .execute(
                "SELECT pg_advisory_xact_lock($1, 0)",
                &[&tenantry::tenancy::spares::REFILL_LOCK_CLASS],
            )
            .await
            .unwrap();
        let stock = app.spare_roles().await;
        quiet.commit().await.unwrap();
        stock
    };
    let anchors = test_settings(&db).audit_anchor_file;
    let env = with(cli_env(&db), "TENANTRY_AUDIT_ANCHOR_FILE", &anchors);
    let out = tenantry(&["audit", "anchor"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // Backed up as docs/backups.md says.
    let dir = backup_dir();
    let out = tenantry(&["backup", dir.to_str().unwrap()], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("20 tenants"), "{}", stdout(&out));
    let routers = format!("tnt_{}__r", app.installation_id().await);
    assert!(
        !stderr(&out).contains(&routers) && !stdout(&out).contains(&routers),
        "nothing of the routers is said left out: {}{}",
        stdout(&out),
        stderr(&out)
    );
    // The routers are in roles.sql bare: no login, no tenant.
    let roles_sql = std::fs::read_to_string(dir.join("roles.sql")).unwrap();
    let of_routers: Vec<&str> = roles_sql.lines().filter(|l| l.contains(&routers)).collect();
    assert_eq!(
        of_routers,
        (0..4)
            .map(|k| format!("CREATE ROLE \"{routers}{k}\" NOLOGIN NOINHERIT;"))
            .collect::<Vec<_>>(),
        "{roles_sql}"
    );
    for file in [
        "manifest.json",
        "roles.sql",
        "database.dump",
        "audit-anchors",
    ] {
        assert!(dir.join(file).is_file(), "{file} is in the backup");
    }

    // Restored into a new cluster, as its service role.
    let cluster = new_cluster().await;
    let url = cluster.prepare(&service_role(&db)).await;
    let restored_anchors = dir.parent().unwrap().join("restored-anchors");
    let env = vec![
        ("DATABASE_URL", url.clone()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        (
            "TENANTRY_AUDIT_ANCHOR_FILE",
            restored_anchors.display().to_string(),
        ),
    ];
    let out = tenantry(&["restore", dir.to_str().unwrap()], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&restored_anchors).unwrap(),
        std::fs::read(&anchors).unwrap(),
        "the anchors are back where TENANTRY_AUDIT_ANCHOR_FILE points"
    );

    let out = tenantry(&["fleet", "check"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("no drift"), "{}", stdout(&out));
    let out = tenantry(&["fleet", "status", "--json"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        status["versions"],
        json!([{"version": older, "tenants": 1}, {"version": latest_version(), "tenants": TENANTS - 1}]),
        "the elder is still behind"
    );
    assert_eq!(status["pending"], 1);
    let out = tenantry(&["audit", "verify"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let anchored = std::fs::read_to_string(&anchors).unwrap().lines().count();
    assert!(
        stdout(&out).contains(&format!("{anchored} anchor(s)")),
        "{}",
        stdout(&out)
    );

    // The service on the restored installation.
    let mut settings = test_settings(&db);
    settings.database = DatabaseTarget::Url(SecretString::new(url));
    settings.audit_anchor_file = restored_anchors;
    settings.router_roles = 4;
    let restored = spawn_app_on(settings, db.clone()).await;
    for (user, before) in users.iter().zip(&rows) {
        let token = restored.access_token(user).await;
        assert_eq!(
            &experiences(&restored, &token).await,
            before,
            "{user}'s rows"
        );
    }
    let token = restored.access_token("elder").await;
    let me = json(
        restored
            .call(Method::GET, "/api/me", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(me["tenant"]["template_version"], older);

    // The spares came back as spares: roles in the group, the service a
    // member, and a signup on the restored installation takes one.
    let new_db = cluster.connect("postgres", "tenantry").await;
    let spares: Vec<String> = new_db
        .query("SELECT role_name FROM tenantry.spare_roles", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut spares = spares;
    spares.sort();
    assert_eq!(spares, stock, "the backup's spares");
    let usable: i64 = new_db
        .query_one(
            "SELECT count(*) FROM tenantry.spare_roles s, tenantry.installation i
             WHERE pg_has_role(s.role_name, 'tnt_' || i.id || '__tenants', 'MEMBER')
               AND pg_has_role($1, s.role_name, 'MEMBER')",
            &[&service_role(&db)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(usable, spares.len() as i64);
    let late = restored.token("latecomer").await;
    let role: String = new_db
        .query_one(
            "SELECT role_name FROM tenantry.tenants WHERE username = 'latecomer'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(spares.contains(&role), "{role} was a restored spare");
    // One whose schema was built before the backup: the restored schema,
    // renamed, its tables still the spare's role's.
    assert!(built.contains(&role), "{role} had its schema built");
    let (tables, theirs): (i64, i64) = {
        let row = new_db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE tableowner = $1)
                 FROM pg_tables WHERE schemaname = 'tenant_latecomer'
                   AND tablename <> 'refinery_schema_history'",
                &[&role],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(tables > 5 && tables == theirs, "{theirs} of {tables}");
    let left: i64 = new_db
        .query_one(
            "SELECT count(*) FROM tenantry.spare_roles s JOIN pg_namespace n ON n.nspname = s.schema_name",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left as usize,
        built.len() - 1,
        "the other spares came back with their schemas"
    );
    assert_eq!(experiences(&restored, &late).await["items"], json!([]));
    // The restored `serve` made the routers again and handed each tenant
    // and spare to its router, one router each.
    let handed: Vec<(String, i64)> = new_db
        .query(
            "SELECT r.role_name, count(a.member)
             FROM (SELECT role_name FROM tenantry.tenants UNION ALL
                   SELECT role_name FROM tenantry.spare_roles) r
             JOIN pg_roles g ON g.rolname = r.role_name
             LEFT JOIN pg_auth_members a ON a.roleid = g.oid
                  AND a.member IN (SELECT oid FROM pg_roles WHERE starts_with(rolname, $1))
             GROUP BY 1",
            &[&routers],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(handed.len(), TENANTS + spares.len(), "{handed:?}");
    assert!(handed.iter().all(|(_, n)| *n == 1), "{handed:?}");
}

#[tokio::test]
async fn a_restore_never_touches_an_installation_and_a_backup_never_a_full_directory() {
    let app = spawn_app().await;
    app.token("solo").await;
    if on_citus() {
        return assert_refused_on_citus(&app.db_name).await;
    }
    let env = cli_env(&app.db_name);
    let dir = backup_dir();
    let out = tenantry(&["backup", dir.to_str().unwrap()], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // A backup into a directory that is not empty, or under one that does
    // not exist.
    let listing = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing(&dir);
    let out = tenantry(&["backup", dir.to_str().unwrap()], &env, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_eq!(listing(&dir), before);
    let nowhere = dir.join("missing/backup");
    let out = tenantry(&["backup", nowhere.to_str().unwrap()], &env, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // A restore into the installation itself.
    let state = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(
                // This installation's roles only: pg_roles is the cluster's,
                // where other tests sign up at the same time.
                "SELECT (SELECT count(*) FROM tenantry.users),
                        (SELECT count(*) FROM pg_roles, tenantry.installation i WHERE starts_with(rolname, 'tnt_' || i.id || '_')),
                        (SELECT count(*) FROM pg_namespace), (SELECT max(seq) FROM tenantry.audit_log)",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, Option<i64>>(3),
        )
    };
    let before = state(app.db().await).await;
    let out = tenantry(&["restore", dir.to_str().unwrap()], &env, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("holds a Tenantry installation already"),
        "{}",
        stderr(&out)
    );
    assert_eq!(state(app.db().await).await, before, "nothing changed");

    // Into an empty database of another service role: the backup's objects
    // belong to this installation's.
    let other = create_database().await;
    let out = tenantry(&["restore", dir.to_str().unwrap()], &cli_env(&other), None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&service_role(&app.db_name)),
        "{}",
        stderr(&out)
    );

    // Into an empty database beside the installation, in the same cluster:
    // its roles are in use there.
    let copy = format!("{}_copy", app.db_name);
    connect("postgres")
        .await
        .batch_execute(&format!(
            "CREATE DATABASE {copy} OWNER {}",
            service_role(&app.db_name)
        ))
        .await
        .unwrap();
    let mut env_copy = cli_env(&app.db_name);
    env_copy[0].1 = service_url(&app.db_name).replace(
        &format!("dbname={}", app.db_name),
        &format!("dbname={copy}"),
    );
    let out = tenantry(&["restore", dir.to_str().unwrap()], &env_copy, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("still lives in a database of this cluster"),
        "{}",
        stderr(&out)
    );
    let schemas: i64 = connect(&copy)
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('tenantry', 'reference')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schemas, 0);
    assert_eq!(state(app.db().await).await, before, "nothing changed");

    // A damaged dump, and a directory that is no backup.
    let damaged = backup_dir();
    std::fs::create_dir(&damaged).unwrap();
    for name in listing(&dir) {
        std::fs::copy(dir.join(&name), damaged.join(&name)).unwrap();
    }
    let mut dump = std::fs::read(damaged.join("database.dump")).unwrap();
    let middle = dump.len() / 2;
    dump[middle] ^= 0xff;
    std::fs::write(damaged.join("database.dump"), dump).unwrap();
    let out = tenantry(&["restore", damaged.to_str().unwrap()], &env_copy, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is damaged"), "{}", stderr(&out));
    let empty = temp_dir("tenantry-test-no-backup");
    spawn_reaper(&empty);
    let out = tenantry(&["restore", empty.to_str().unwrap()], &env_copy, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a backup"), "{}", stderr(&out));
}

#[tokio::test]
async fn an_embedded_installation_comes_back_with_its_secret_and_anchors() {
    let (base, to) = (temp_dir("tenantry-test-from"), temp_dir("tenantry-test-to"));
    spawn_reaper(&base);
    spawn_reaper(&to);
    // A data dir not made yet: the first command makes it.
    let from = base.join("not-made-yet");
    spawn_reaper(&from);
    let env_from = vec![("TENANTRY_DATA_DIR", from.display().to_string())];
    let env_to = vec![("TENANTRY_DATA_DIR", to.display().to_string())];
    let out = tenantry(
        &["tenants", "create", "alice", "--email", "alice@example.com"],
        &env_from,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(&["audit", "anchor"], &env_from, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = backup_dir();
    let out = tenantry(&["backup", dir.to_str().unwrap()], &env_from, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(&["db", "stop"], &env_from, None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = tenantry(&["restore", dir.to_str().unwrap()], &env_to, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(to.join("jwt_secret")).unwrap(),
        std::fs::read(from.join("jwt_secret")).unwrap(),
        "the data dir's secret came along"
    );
    let out = tenantry(&["audit", "verify"], &env_to, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("1 anchor(s)"), "{}", stdout(&out));
    let out = tenantry(&["tenants", "list", "--json"], &env_to, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list[0]["username"], "alice");

    // Restoring it again there is refused.
    let out = tenantry(&["restore", dir.to_str().unwrap()], &env_to, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = tenantry(&["db", "stop"], &env_to, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A restore that fails half-way through the dump, inside its one
/// transaction (here the new database refuses the second tenant's tables),
/// leaves the new cluster as it was: no roles, no schemas.
#[tokio::test]
async fn a_restore_that_fails_half_way_leaves_the_new_cluster_as_it_was() {
    let app = spawn_app().await;
    let token = app.token("whole1").await;
    add_rows(&app, &token, "whole1").await;
    let token = app.token("whole2").await;
    add_rows(&app, &token, "whole2").await;
    if on_citus() {
        return assert_refused_on_citus(&app.db_name).await;
    }
    let dir = backup_dir();
    let out = tenantry(
        &["backup", dir.to_str().unwrap()],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    let new = new_cluster().await;
    let url = new.prepare(&service_role(&app.db_name)).await;
    // The new database refuses the second tenant's tables: by then the
    // restore has made the roles, the schemas and the first tenant's tables.
    new.connect("postgres", "tenantry")
        .await
        .batch_execute(
            "CREATE FUNCTION public.refuse_whole2() RETURNS event_trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands()
                           WHERE schema_name = 'tenant_whole2') THEN
                 RAISE EXCEPTION 'the test refuses tenant_whole2';
               END IF;
             END $$;
             CREATE EVENT TRIGGER refuse_whole2 ON ddl_command_end
               EXECUTE FUNCTION public.refuse_whole2();",
        )
        .await
        .unwrap();
    let anchors = temp_dir("tenantry-test-anchors").join("audit-anchors");
    let env = vec![
        ("DATABASE_URL", url),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        ("TENANTRY_AUDIT_ANCHOR_FILE", anchors.display().to_string()),
    ];
    let out = tenantry(&["restore", dir.to_str().unwrap()], &env, None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // It got as far as the dump's SQL.
    assert!(
        stderr(&out).contains("the test refuses tenant_whole2"),
        "{}",
        stderr(&out)
    );
    assert!(!anchors.exists());

    let admin = new.connect("postgres", "postgres").await;
    let roles: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'tnt\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 0);
    let db = new.connect("postgres", "tenantry").await;
    let schemas: Vec<String> = db
        .query(
            "SELECT nspname::text FROM pg_namespace
              WHERE nspname IN ('tenantry', 'reference') OR nspname LIKE 'tenant\\_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, Vec::<String>::new());
}
