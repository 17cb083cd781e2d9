//! `tenantry templates`: publishing versions into the database (where every
//! process reads them from) and listing what is published.

use serde_json::Value;

use crate::helpers::*;

async fn published_files(db_name: &str) -> Vec<String> {
    let out = tenantry(&["templates", "list", "--json"], &cli_env(db_name), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    listed["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file"].as_str().unwrap().to_owned())
        .collect()
}

async fn publish(db_name: &str, dir: &std::path::Path) -> std::process::Output {
    tenantry(
        &["templates", "publish", &dir.display().to_string()],
        &cli_env(db_name),
        None,
    )
    .await
}

#[tokio::test]
async fn publishing_refuses_a_changed_version_and_only_goes_forward() {
    let app = spawn_app().await;
    let builtin = published_files(&app.db_name).await;
    assert_eq!(builtin.len() as i32, latest_version());

    // A published version edited: refused, naming it; nothing published.
    let changed = builtin_templates_with(&[
        (
            "V1__experiences.sql",
            "CREATE TABLE experiences (id bigint);",
        ),
        ("V6__notes.sql", "CREATE TABLE notes (id bigint);"),
    ]);
    let out = publish(&app.db_name, &changed).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("template V1__experiences.sql has changed since it was published"),
        "{}",
        stderr(&out)
    );
    assert_eq!(published_files(&app.db_name).await, builtin);

    // Fewer versions than published: nothing to do, nothing taken back.
    let out = publish(&app.db_name, &templates_dir_with(&[])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("nothing new to publish"),
        "{}",
        stdout(&out)
    );
    assert_eq!(published_files(&app.db_name).await, builtin);

    // A version that cannot build a tenant is never published (it could
    // not be taken back): every signup would fail.
    let broken = builtin_templates_with(&[("V6__broken.sql", "CREATE TABLEX notes (id bigint);")]);
    let out = publish(&app.db_name, &broken).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("nothing was published") && stderr(&out).contains("V6__broken"),
        "{}",
        stderr(&out)
    );
    assert_eq!(published_files(&app.db_name).await, builtin);
    let leftovers = app
        .count(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname LIKE '%template\\_\\_check%')
                  + (SELECT count(*) FROM pg_roles WHERE rolname LIKE '%template\\_\\_check%')",
        )
        .await;
    assert_eq!(leftovers, 0, "the tenant built to check is gone");
    let signup = app.register("mae").await;
    assert_eq!(json(signup).await["template_version"], latest_version());

    // The next version: published once.
    let next = builtin_templates_with(&[("V6__notes.sql", "CREATE TABLE notes (id bigint);")]);
    let out = publish(&app.db_name, &next).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("published V6__notes.sql"),
        "{}",
        stdout(&out)
    );
    let again = publish(&app.db_name, &next).await;
    assert!(
        stdout(&again).contains("nothing new to publish"),
        "{}",
        stdout(&again)
    );
    let listed = tenantry(&["templates", "list"], &cli_env(&app.db_name), None).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    let text = stdout(&listed);
    let line = text.lines().find(|l| l.contains("V6__notes.sql")).unwrap();
    assert!(
        line.contains(&next.display().to_string()) && line.contains("by cli:"),
        "{text}"
    );
    let signup = app.register("nia").await;
    assert_eq!(json(signup).await["template_version"], 6);

    // A directory that cannot be read: a clear error.
    let out = publish(&app.db_name, std::path::Path::new("/nonexistent/templates")).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/templates is not a directory"),
        "{}",
        stderr(&out)
    );

    // The database itself holds a published version to what it was.
    let db = app.db().await;
    for sql in [
        "UPDATE tenantry.templates SET checksum = '1' WHERE version = 6",
        "UPDATE tenantry.templates SET name = 'other' WHERE version = 6",
        "DELETE FROM tenantry.templates WHERE version = 6",
        "TRUNCATE tenantry.templates",
    ] {
        let err = db.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::RESTRICT_VIOLATION),
            "{sql}: {err:?}"
        );
    }
    assert_eq!(published_files(&app.db_name).await.len(), 6);
}

/// An installation with templates of its own: the built-in templates of a
/// later binary disagree from V5 on. The published set wins; `serve`
/// starts and provisions with it, and publishes nothing of the built-in
/// ones.
#[tokio::test]
async fn the_published_set_wins_over_the_builtin_templates() {
    let db_name = create_database().await;
    let own =
        builtin_templates_with(&[("V5__mine.sql", "CREATE TABLE mine (id bigint PRIMARY KEY);")]);
    std::fs::remove_file(own.join("V5__experience_search.sql")).unwrap();
    // The baseline stands for the built-in V1..V5: it goes with their V5.
    std::fs::remove_file(own.join("B5__baseline.sql")).unwrap();
    let out = publish(&db_name, &own).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let app = spawn_app_on(test_settings(&db_name), db_name.clone()).await;
    let signup = app.register("oda").await;
    assert_eq!(json(signup).await["template_version"], 5);
    let mine = app
        .count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_oda' AND tablename = 'mine'",
        )
        .await;
    assert_eq!(mine, 1);
    let files = published_files(&db_name).await;
    assert_eq!(files.last().unwrap(), "V5__mine.sql");
    assert_eq!(files.len(), 5);
}

/// Looking changes nothing: on a database with no template yet, a dry run,
/// `fleet status` and `templates list` publish nothing.
#[tokio::test]
async fn a_dry_run_status_and_list_publish_nothing_on_a_new_database() {
    let db_name = create_database().await;
    let mut env = cli_env(&db_name);
    let dir = builtin_templates_with(&[("V6__notes.sql", "CREATE TABLE notes (id bigint);")]);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));
    for args in [
        &["fleet", "migrate", "--dry-run"][..],
        &["fleet", "status"],
        &["templates", "list"],
    ] {
        let out = tenantry(args, &env, None).await;
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let listed = tenantry(&["templates", "list"], &env, None).await;
    assert!(
        stdout(&listed).contains("not published, proposed by"),
        "{}",
        stdout(&listed)
    );
    let published = connect(&db_name)
        .await
        .query_one("SELECT count(*) FROM tenantry.templates", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(published, 0);
}

/// A run refused before it starts publishes nothing; a run to a target
/// publishes up to it; a published file renamed is refused, naming both;
/// `templates show` gives the published text back.
#[tokio::test]
async fn fleet_migrate_publishes_only_what_it_runs_to() {
    let app = spawn_app().await;
    assert_eq!(app.register("pia").await.status(), 201);
    let base = latest_version();
    let six = format!("V{}__rating.sql", base + 1);
    let seven = format!("V{}__notes.sql", base + 2);
    let rating = "ALTER TABLE experiences ADD COLUMN rating integer;";
    let dir =
        builtin_templates_with(&[(&six, rating), (&seven, "CREATE TABLE notes (id bigint);")]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));

    let refused = tenantry(&["fleet", "migrate", "--tenant", "nobody"], &env, None).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("no tenant named nobody"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(published_files(&app.db_name).await.len() as i32, base);

    let target = (base + 1).to_string();
    let out = tenantry(&["fleet", "migrate", "--to", &target], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("published {six}")),
        "{}",
        stdout(&out)
    );
    assert_eq!(published_files(&app.db_name).await.last().unwrap(), &six);

    let shown = tenantry(
        &["templates", "show", &target],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert_eq!(stdout(&shown), rating);
    let unknown = tenantry(&["templates", "show", "99"], &cli_env(&app.db_name), None).await;
    assert_eq!(unknown.status.code(), Some(2));

    // The same text under another name: refused, naming both.
    let renamed = format!("V{}__stars.sql", base + 1);
    std::fs::rename(dir.join(&six), dir.join(&renamed)).unwrap();
    let out = publish(&app.db_name, &dir).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("template {six} is published; {renamed}")),
        "{}",
        stderr(&out)
    );
    assert_eq!(published_files(&app.db_name).await.last().unwrap(), &six);
}

/// The built-in baseline with `marker` (SQL the check does not compare,
/// such as a comment) appended: a tenant that has it was built from it.
fn baseline_with(marker: &str) -> String {
    let builtin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tenant_templates/B5__baseline.sql"
    ))
    .unwrap();
    format!("{builtin}\n{marker}\n")
}

/// The comment on a schema's `experiences` (what marks a baseline used),
/// read apart from any tenant table: on Citus a query that reads one runs
/// on the tenant's worker, whose table has no comment.
async fn comment_on_experiences(db: &tokio_postgres::Client, schema: &str) -> Option<String> {
    db.query_one(
        "SELECT obj_description(to_regclass(quote_ident($1) || '.experiences'), 'pg_class')",
        &[&schema],
    )
    .await
    .unwrap()
    .get(0)
}

/// Schema `by_versions`, built by the built-in V1..V5 in turn, by hand.
async fn by_the_versions(db: &tokio_postgres::Client) {
    db.batch_execute("CREATE SCHEMA by_versions; SET search_path TO by_versions")
        .await
        .unwrap();
    for template in tenantry::templates::TemplateSet::builtin().unwrap().all() {
        db.batch_execute(template.sql()).await.unwrap();
    }
    db.batch_execute("RESET search_path").await.unwrap();
}

/// What PostgreSQL says of a schema, as the baseline's check compares it.
async fn described(db: &tokio_postgres::Client, schema: &str, role: &str) -> Vec<String> {
    db.batch_execute(&format!("SET search_path TO \"{schema}\""))
        .await
        .unwrap();
    let rows = db
        .query(tenantry::tenancy::baseline::DESCRIBE, &[&schema, &role])
        .await
        .unwrap();
    db.batch_execute("RESET search_path").await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn a_new_tenant_is_built_from_the_baseline_and_is_what_the_versions_build() {
    let dir = builtin_templates_with(&[(
        "B5__baseline.sql",
        &baseline_with("COMMENT ON TABLE experiences IS 'built from the baseline';"),
    )]);
    let app = spawn_app_with(|s| s.templates_dir = Some(dir.clone())).await;
    let signup = app.register("bea").await;
    assert_eq!(signup.status(), 201);
    let db = app.db().await;
    assert_eq!(
        comment_on_experiences(&db, "tenant_bea").await.as_deref(),
        Some("built from the baseline")
    );

    // Its history says V1..V5, as published: a fleet migration sees a
    // tenant like any other.
    let versions = |from: &'static str| {
        let db = &db;
        async move {
            db.query(
                &format!("SELECT version, name, checksum FROM {from} ORDER BY version"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect::<Vec<(i32, String, String)>>()
        }
    };
    let history = versions("tenant_bea.refinery_schema_history").await;
    let published = versions("tenantry.templates").await;
    assert_eq!(history, published);
    assert_eq!(history.len() as i32, latest_version());

    // The same schema as one built by V1..V5 in turn, here by hand.
    by_the_versions(&db).await;
    let role: String = db
        .query_one(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'tenant_bea'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let tenant_role: String = db
        .query_one(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'tenant_bea' AND tablename = 'experiences'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(role, tenant_role);
    let mut by_baseline = described(&db, "tenant_bea", &tenant_role).await;
    let mut by_versions = described(&db, "by_versions", &tenant_role).await;
    // Only the tenant has the history table (the service's).
    by_baseline.retain(|l| !l.contains("refinery_schema_history"));
    by_versions.retain(|l| !l.contains("refinery_schema_history"));
    assert!(by_baseline.len() > 60, "{by_baseline:?}");
    assert_eq!(by_baseline, by_versions);

    // And a new version after it: new tenants take the baseline, then V6.
    let later = builtin_templates_with(&[
        (
            "B5__baseline.sql",
            &baseline_with("COMMENT ON TABLE experiences IS 'built from the baseline';"),
        ),
        (
            "V6__notes.sql",
            "CREATE TABLE notes (id bigint PRIMARY KEY);",
        ),
    ]);
    let out = publish(&app.db_name, &later).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let app6 = spawn_app_on(
        {
            let mut s = test_settings(&app.db_name);
            s.templates_dir = Some(later.clone());
            s
        },
        app.db_name.clone(),
    )
    .await;
    let signup = app6.register("cyd").await;
    assert_eq!(json(signup).await["template_version"], 6);
    assert_eq!(
        comment_on_experiences(&db, "tenant_cyd").await.as_deref(),
        Some("built from the baseline")
    );
    assert_eq!(app.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_cyd' AND tablename = 'notes'").await, 1);
    assert_eq!(history_of(&app, "tenant_cyd").await, versions_up_to(6));
}

#[tokio::test]
async fn a_baseline_that_builds_something_else_is_refused_naming_the_difference() {
    let app = spawn_app().await;
    // The first such check is experiences'.
    let wrong = baseline_with("").replacen(
        "CHECK (length(title) BETWEEN 1 AND 300)",
        "CHECK (length(title) BETWEEN 1 AND 400)",
        1,
    );
    assert!(wrong.contains("BETWEEN 1 AND 400"));
    let dir = builtin_templates_with(&[
        ("B5__baseline.sql", &wrong),
        (
            "V6__notes.sql",
            "CREATE TABLE notes (id bigint PRIMARY KEY);",
        ),
    ]);
    let out = publish(&app.db_name, &dir).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("baseline B5__baseline.sql does not build what V1..V5 build")
            && err.contains("experiences experiences_title_check")
            && err.contains("<= 300"),
        "{err}"
    );
    let leftovers = app
        .count(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname LIKE '%template\\_\\_check%')
                  + (SELECT count(*) FROM pg_roles WHERE rolname LIKE '%template\\_\\_check%')",
        )
        .await;
    assert_eq!(leftovers, 0, "the tenants built to check are gone");

    // Nothing of the set was published (the check comes first).
    assert_eq!(
        published_files(&app.db_name).await.len() as i32,
        latest_version()
    );

    // `serve` with it refuses to start, saying the same.
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", dir.display().to_string()));
    env.push(("TENANTRY_BIND", format!("127.0.0.1:{}", free_port())));
    let out = tenantry(&["serve"], &env, None).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("baseline B5__baseline.sql does not build what V1..V5 build"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn by_default_new_tenants_are_built_from_the_built_in_baseline() {
    // A table rewritten after it was made (V5's generated column added
    // later) gets a new file; one made with its column keeps the file it
    // was made with.
    let app = spawn_app().await;
    assert_eq!(app.register("dee").await.status(), 201);
    let rewritten: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT relname FROM pg_class
             WHERE relnamespace = 'tenant_dee'::regnamespace AND relkind = 'r' AND relfilenode <> oid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rewritten, Vec::<String>::new());
    // Built by the versions, as a running `serve` does after a new version
    // is published, experiences is rewritten: the check above can fail.
    let db = app.db().await;
    by_the_versions(&db).await;
    let rewritten: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_class
             WHERE relnamespace = 'by_versions'::regnamespace AND relname = 'experiences' AND relfilenode <> oid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rewritten, 1);
}
