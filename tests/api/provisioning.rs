//! What the database itself enforces once tenants exist.

use crate::helpers::*;

#[tokio::test]
async fn a_tenant_role_reaches_its_own_schema_and_reference_only() {
    let app = spawn_app().await;
    assert_eq!(app.register("lena").await.status(), 201);
    assert_eq!(app.register("mike").await.status(), 201);
    let lena = app.role_of("lena").await;
    let db = app.db().await;

    let as_lena = |sql: &str| format!("BEGIN; SET LOCAL ROLE \"{lena}\"; {sql}; ROLLBACK;");
    db.batch_execute(&as_lena(
        "INSERT INTO tenant_lena.experiences (title, started_on) VALUES ('Engineer', '2020-01-01')",
    ))
    .await
    .expect("own schema is writable");
    db.batch_execute(&as_lena("SELECT count(*) FROM reference.skills"))
        .await
        .expect("reference is readable");

    for forbidden in [
        "SELECT * FROM tenant_mike.experiences",
        "SELECT * FROM tenantry.users",
        "INSERT INTO reference.industries (code, name, level) VALUES ('99', 'x', 'sector')",
        "CREATE TABLE public.sneaky (id int)",
    ] {
        let err = db
            .batch_execute(&as_lena(forbidden))
            .await
            .expect_err(forbidden);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{forbidden}: {err}"
        );
        db.batch_execute("ROLLBACK").await.unwrap();
    }
}

#[tokio::test]
async fn the_reference_schema_is_seeded_with_real_data() {
    let app = spawn_app().await;
    let db = app.db().await;
    let count = |table: &'static str| {
        let db = &db;
        async move {
            db.query_one(&format!("SELECT count(*) FROM reference.{table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert!(count("skills").await >= 300);
    assert!(count("skill_categories").await >= 15);
    assert_eq!(
        db.query_one(
            "SELECT count(*) FROM reference.industries WHERE level = 'sector'",
            &[]
        )
        .await
        .unwrap()
        .get::<_, i64>(0),
        20,
        "the 20 NAICS sectors"
    );
    assert!(count("industries").await >= 100);
    assert!(count("career_paths").await >= 15);
    assert!(count("role_templates").await >= 30);
    assert!(count("competencies").await >= 20);
    let rust: String = db
        .query_one(
            "SELECT c.name FROM reference.skills s JOIN reference.skill_categories c ON c.id = s.category_id WHERE s.name = 'Rust'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rust, "Programming Languages");
}

fn account(name: &str) -> tenantry::provisioning::NewAccount {
    tenantry::provisioning::NewAccount {
        username: tenantry::domain::Username::parse(name).unwrap(),
        email: tenantry::domain::Email::parse(&format!("{name}@example.com")).unwrap(),
        password_hash: "$2b$04$not.a.real.hash.but.never.checked.here".into(),
        role: tenantry::auth::Role::User,
        refresh_token: None,
        idempotency_key: None,
        verification: None,
        audit: None,
    }
}

/// The one connection of a pool of one: same backend, default role and
/// search path, no transaction left open.
async fn assert_clean(pool: &tenantry::db::RequestPool, backend: Option<i32>) -> i32 {
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_user::text, session_user::text, current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    let pid: i32 = row.get(0);
    if let Some(expected) = backend {
        assert_eq!(pid, expected, "the pool kept its one connection");
    }
    assert_eq!(
        row.get::<_, String>(1),
        row.get::<_, String>(2),
        "back to the service's own role"
    );
    assert_eq!(row.get::<_, String>(3), "\"$user\", public");
    // SAVEPOINT only works inside a transaction block.
    let err = client.batch_execute("SAVEPOINT probe").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::NO_ACTIVE_SQL_TRANSACTION),
        "no transaction left open"
    );
    pid
}

#[tokio::test]
async fn a_pooled_connection_keeps_nothing_of_a_provisioning_also_after_an_error() {
    let db = create_database().await;
    // As `tenants create` opens it: publishing into the new database.
    let ctx = tenantry::startup::Context::open(&test_settings(&db), 1)
        .await
        .unwrap();
    ctx.ready_to_provision().await.unwrap();
    let broken = tenantry::templates::TemplateSet::from_dir(&templates_dir_with(&[(
        "V2__broken.sql",
        "CREATE TABLE broken (id bigint REFERENCES missing (id));",
    )]))
    .unwrap();
    // Provisioned with as if it were the published set.
    let broken = tenantry::tenancy::publication::Templates::new(
        tenantry::tenancy::publication::Published::new(
            std::sync::Arc::new(broken),
            ctx.templates.published().newest(),
        ),
    );
    let backend = assert_clean(&ctx.pool, None).await;
    // Each provisioning on the pool's one connection, then a check that the
    // connection came back clean.
    let provision_on_the_pool = |templates, name: &'static str| {
        let ctx = &ctx;
        async move {
            let mut client = ctx.pool.get().await.unwrap();
            let result = tenantry::provisioning::provision(
                &mut client,
                &ctx.installation,
                templates,
                &account(name),
            )
            .await;
            drop(client);
            assert_clean(&ctx.pool, Some(backend)).await;
            result
        }
    };

    provision_on_the_pool(&ctx.templates, "uma").await.unwrap();
    let err = provision_on_the_pool(&broken, "vera").await.unwrap_err();
    assert!(err.to_string().contains("V2__broken"), "{err}");
    let err = provision_on_the_pool(&ctx.templates, "uma")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            tenantry::provisioning::ProvisionError::UsernameTaken(_)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn refinerys_own_runner_reads_a_tenants_history_as_fully_applied() {
    // The history is in refinery's format: its runner, pointed at a tenant's
    // history table with the same templates, finds nothing to apply and no
    // divergent checksum.
    let app = spawn_app().await;
    assert_eq!(app.register("refi").await.status(), 201);
    let templates = tenantry::templates::TemplateSet::builtin().unwrap();
    let migrations: Vec<refinery::Migration> = templates
        .all()
        .iter()
        .map(|t| {
            refinery::Migration::unapplied(&t.file_name().replace(".sql", ""), t.sql()).unwrap()
        })
        .collect();
    let mut runner = refinery::Runner::new(&migrations).set_abort_divergent(true);
    runner.set_migration_table_name("tenant_refi.refinery_schema_history");
    let mut client = app.db().await;
    let applied = runner
        .get_applied_migrations_async(&mut client)
        .await
        .unwrap();
    assert_eq!(applied.len(), templates.all().len());
    for (m, t) in applied.iter().zip(templates.all()) {
        assert_eq!(m.version() as i32, t.version().get());
        assert_eq!(m.checksum(), t.checksum());
    }
    let report = runner.run_async(&mut client).await.unwrap();
    assert!(
        report.applied_migrations().is_empty(),
        "nothing left to apply"
    );
}
