//! The CLI against a test database (DATABASE_URL mode).

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn tenants_can_be_created_listed_and_shown_from_the_cli() {
    let db = create_database().await;
    let env = cli_env(&db);

    let out = tenantry(
        &["tenants", "create", "Nina", "--email", "nina@example.com"],
        &env,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("tenant_nina"));

    let out = tenantry(&["tenants", "list", "--json"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["username"], "nina");
    assert_eq!(list[0]["schema"], "tenant_nina");
    assert_eq!(list[0]["template_version"], latest_version());
    assert_eq!(list[0]["status"], "active");
    assert_eq!(list[0]["role"], role_in(&db, "nina").await);

    let out = tenantry(&["tenants", "show", "nina", "--json"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown, list[0]);

    // Only `serve` needs a JWT secret.
    let out = tenantry(&["tenants", "list"], &env[..1], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("tenant_nina"));
    let out = tenantry(&["serve"], &env[..1], None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("JWT_SECRET is required"),
        "{}",
        stderr(&out)
    );

    // The password set on the CLI logs in over HTTP.
    let app = spawn_app_on(test_settings(&db), db.clone()).await;
    let login = app
        .post_json(
            "/api/auth/login",
            &serde_json::json!({"username": "nina", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status(), 200);
}

#[tokio::test]
async fn bad_cli_input_exits_2_and_creates_nothing() {
    let db = create_database().await;
    let env = cli_env(&db);
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (
            vec![
                "tenants",
                "create",
                "x'; drop table y; --",
                "--email",
                "a@example.com",
            ],
            Some("a perfectly fine password\n"),
        ),
        (
            vec!["tenants", "create", "admin", "--email", "a@example.com"],
            Some("a perfectly fine password\n"),
        ),
        (
            vec!["tenants", "create", "olga", "--email", "nope"],
            Some("a perfectly fine password\n"),
        ),
        (
            vec!["tenants", "create", "olga", "--email", "olga@example.com"],
            Some("short\n"),
        ),
        (
            vec!["tenants", "create", "olga", "--email", "olga@example.com"],
            Some(""),
        ),
        (
            vec!["tenants", "create", "olga"],
            Some("a perfectly fine password\n"),
        ),
        (vec!["tenants", "frobnicate"], None),
        (vec!["tenants", "show", "Robert\"); --"], None),
    ];
    for (args, stdin) in cases {
        let out = tenantry(&args, &env, stdin).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty());
    }
    let out = tenantry(&["tenants", "list", "--json"], &env, None).await;
    assert_eq!(stdout(&out).trim(), "[]");
}

#[tokio::test]
async fn other_cli_failures_exit_1_with_a_message() {
    let db = create_database().await;
    let env = cli_env(&db);
    let out = tenantry(&["tenants", "show", "nobody"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no tenant named nobody"));

    let create = ["tenants", "create", "paul", "--email", "paul@example.com"];
    let out = tenantry(&create, &env, Some(PASSWORD)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(&create, &env, Some(PASSWORD)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already taken"), "{}", stderr(&out));

    let mut unreachable = env.clone();
    unreachable[0].1 = "host=127.0.0.1 port=1 user=postgres dbname=x connect_timeout=2".into();
    let out = tenantry(&["tenants", "list"], &unreachable, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
}

#[tokio::test]
async fn system_migrate_is_idempotent_and_safe_when_run_twice_at_once() {
    let db = create_database().await;
    let env = cli_env(&db);
    let (a, b) = tokio::join!(
        tenantry(&["system", "migrate"], &env, None),
        tenantry(&["system", "migrate"], &env, None)
    );
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    // Exactly one of them applied the migrations.
    let applied = [&a, &b]
        .iter()
        .filter(|o| stdout(o).contains("applied V1__control_plane"))
        .count();
    assert_eq!(applied, 1);

    let again = tenantry(&["system", "migrate"], &env, None).await;
    assert!(again.status.success());
    let latest = system_migrations().into_iter().max().unwrap();
    assert!(
        stdout(&again).contains(&format!("up to date at version {latest}")),
        "{}",
        stdout(&again)
    );
    let client = connect(&db).await;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM tenantry.refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows,
        system_migrations().len() as i64,
        "each file of system_migrations/, once"
    );
    let installations: i64 = client
        .query_one("SELECT count(*) FROM tenantry.installation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(installations, 1);
}

#[tokio::test]
async fn a_provisioning_killed_mid_transaction_leaves_nothing_behind() {
    let db = create_database().await;
    // V2 sleeps, so the process can be killed while the tenant's role,
    // schema and V1 tables exist inside its open transaction.
    let (env, _) = slow_signup_env(&db).await;

    let mut child = spawn_tenants_create(&env, "quinn").await;
    let admin = connect(&db).await;
    let backend = sleeping_backend(&admin).await;
    child.kill().await.unwrap(); // SIGKILL: no cleanup code runs

    // The server notices the vanished client and rolls back: wait until the
    // killed client's backend is gone (until then its transaction is open,
    // and invisible, so counting now would prove nothing).
    backend_ended(&admin, backend).await;
    // Users, head starts (Citus), quinn's schema and the installation's
    // tenant roles (quinn's is the only one there could be).
    let leftovers = || async {
        let row = admin
            .query_one(
                "SELECT (SELECT count(*) FROM tenantry.users),
                        (SELECT count(*) FROM tenantry.pending_tenants),
                        (SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_quinn'),
                        (SELECT count(*) FROM pg_roles r, tenantry.installation i
                         WHERE starts_with(r.rolname, 'tnt_' || i.id || '_')
                           AND r.rolname <> 'tnt_' || i.id || '__tenants')",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
        )
    };
    if on_citus() {
        // On Citus the role and the empty schema went first, in their own
        // transaction, written down as a head start (provisioning's
        // `Reservation`): no account, and swept by the next command.
        assert_eq!(leftovers().await, (0, 1, 1, 1));
        let out = tenantry(&["fleet", "status"], &env, None).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(leftovers().await, (0, 0, 0, 0));

    // The name is free again (with the same templates: the database has
    // recorded V2__slow as applied and refuses a different V2).
    let out = tenantry(
        &["tenants", "create", "quinn", "--email", "quinn@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn invalid_settings_exit_2_naming_the_variable() {
    let db = create_database().await;
    for (name, value) in [
        ("BCRYPT_COST", "99"),
        ("TENANTRY_BIND", "not an address"),
        ("TENANTRY_RATE_LIMIT_USER", "-1"),
        ("TENANTRY_TRUSTED_PROXIES", "10.0.0.0/8x"),
        ("TENANTRY_POOL_SIZE", "0"),
        ("JWT_SECRET", "short"),
        ("TENANTRY_METRICS_TOKEN", "short"),
    ] {
        let mut env = cli_env(&db);
        env.retain(|(k, _)| *k != name);
        env.push((name, value.to_string()));
        let out = tenantry(&["tenants", "list"], &env, None).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}={value}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains(name), "{name}: {}", stderr(&out));
    }
}

/// Sessions of this database waiting for an advisory lock.
async fn waiters(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn two_system_migrates_held_at_the_bootstrap_lock_apply_everything_once() {
    // Force the overlap: the test holds the bootstrap lock while both start,
    // so both are waiting on it when it is released.
    let db = create_database().await;
    let env = cli_env(&db);
    let holder = connect(&db).await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&tenantry::db::BOOTSTRAP_LOCK],
        )
        .await
        .unwrap();
    let a = tenantry(&["system", "migrate"], &env, None);
    let b = tenantry(&["system", "migrate"], &env, None);
    let release = async {
        // Both wait on the lock before it is released.
        for _ in 0..100 {
            if waiters(&holder).await == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let waiting = waiters(&holder).await;
        holder
            .execute(
                "SELECT pg_advisory_unlock($1)",
                &[&tenantry::db::BOOTSTRAP_LOCK],
            )
            .await
            .unwrap();
        waiting
    };
    let (a, b, waiting) = tokio::join!(a, b, release);
    assert_eq!(waiting, 2, "both runs waited on the lock at once");
    assert!(
        a.status.success() && b.status.success(),
        "{}{}",
        stderr(&a),
        stderr(&b)
    );
    let applied = [&a, &b]
        .iter()
        .filter(|o| stdout(o).contains("applied V1__control_plane"))
        .count();
    assert_eq!(applied, 1);
    let rows = connect(&db)
        .await
        .query_one("SELECT count(*) FROM tenantry.refinery_schema_history", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, system_migrations().len() as i64);
}

#[tokio::test]
async fn cluster_commands_on_plain_postgresql_say_it_is_not_citus() {
    let db = create_database().await;
    let env = cli_env(&db);
    let out = tenantry(&["cluster", "status"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a Citus coordinator"),
        "{}",
        stderr(&out)
    );
    let out = tenantry(
        &["tenants", "create", "moe", "--email", "moe@example.com"],
        &env,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(
        &["tenants", "move", "moe", "--node", "127.0.0.1:5432"],
        &env,
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not a Citus coordinator"),
        "{}",
        stderr(&out)
    );
    let out = tenantry(&["tenants", "move", "moe", "--node", "no-port"], &env, None).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed node is a usage error"
    );
}

#[tokio::test]
async fn secrets_are_read_from_the_files_their_file_variables_name() {
    let db = create_database().await;
    let dir = temp_dir("tenantry-secret-files");
    let (url_file, secret_file) = (dir.join("database_url"), dir.join("jwt_secret"));
    std::fs::write(&url_file, format!("{}\n", service_url(&db))).unwrap();
    std::fs::write(&secret_file, format!("{JWT_SECRET}\n")).unwrap();
    let files = vec![
        ("DATABASE_URL_FILE", url_file.to_string_lossy().into_owned()),
        (
            "JWT_SECRET_FILE",
            secret_file.to_string_lossy().into_owned(),
        ),
    ];
    let created = tenantry(
        &["tenants", "create", "fern", "--email", "fern@example.com"],
        &files,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));
    // The same secret as the service's: its tokens verify there.
    let app = spawn_app_on(test_settings(&db), db.clone()).await;
    let login = app
        .post_json(
            "/api/auth/login",
            &serde_json::json!({"username": "fern", "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status(), 200);

    // A variable and its _FILE both: a usage error naming them.
    let mut both = files.clone();
    both.push(("JWT_SECRET", JWT_SECRET.to_owned()));
    let out = tenantry(&["tenants", "list"], &both, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("set either JWT_SECRET or JWT_SECRET_FILE, not both"),
        "{}",
        stderr(&out)
    );
    let missing = vec![("DATABASE_URL_FILE", "/nonexistent/database_url".to_owned())];
    let out = tenantry(&["tenants", "list"], &missing, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("DATABASE_URL_FILE"),
        "{}",
        stderr(&out)
    );
}
