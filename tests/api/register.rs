use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn registering_creates_a_user_a_role_and_a_complete_schema() {
    let app = spawn_app().await;
    let response = app
        .post_json(
            "/api/auth/register",
            &json!({"username": "  Alice_01 ", "email": "Alice@Example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    assert_eq!(body["username"], "alice_01");
    assert_eq!(body["schema"], "tenant_alice_01");
    assert_eq!(body["template_version"], latest_version());
    assert!(body["user_id"]
        .as_str()
        .unwrap()
        .parse::<uuid::Uuid>()
        .is_ok());
    // The access token is ours and says whom it is for.
    let claims = tenantry::auth::JwtKeys::new(JWT_SECRET.as_bytes())
        .verify(body["access_token"].as_str().unwrap())
        .expect("a valid access token");
    assert_eq!(claims.sub.to_string(), body["user_id"].as_str().unwrap());
    assert_eq!(claims.username, "alice_01");
    assert_eq!(claims.schema.as_deref(), Some("tenant_alice_01"));
    assert_eq!(claims.role, tenantry::auth::Role::User);
    assert_eq!(claims.exp - claims.iat, 900);
    assert!(!body["refresh_token"].as_str().unwrap().is_empty());

    let db = app.db().await;
    let user = db
        .query_one(
            "SELECT u.email, u.password_hash, t.schema_name, t.role_name, t.template_version, t.status
             FROM tenantry.users u JOIN tenantry.tenants t ON t.user_id = u.id WHERE u.username = 'alice_01'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(user.get::<_, String>(0), "alice@example.com");
    assert!(
        user.get::<_, String>(1).starts_with("$2"),
        "bcrypt hash stored"
    );
    assert_eq!(user.get::<_, String>(2), "tenant_alice_01");
    let role: String = user.get(3);
    let prefix = app.role_prefix().await;
    if on_citus() {
        // Made in the signup's head start, after the name.
        assert_eq!(role, format!("{prefix}alice_01"));
    } else {
        // A name that carries no username (`tenancy::spares`), in the
        // tenants' group, the service a member of it.
        let tag = role
            .strip_prefix(&format!("{prefix}_t"))
            .unwrap_or_else(|| panic!("{role}"));
        assert!(
            tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
            "{role}"
        );
        let memberships: (bool, bool) = {
            let row = db
                .query_one(
                    "SELECT pg_has_role($3, $1, 'MEMBER'),
                            pg_has_role($1, $2 || '_tenants', 'MEMBER')",
                    &[&role, &prefix, &service_role(&app.db_name)],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(
            memberships,
            (true, true),
            "service in the role, role in the group"
        );
    }
    assert_eq!(user.get::<_, i32>(4), latest_version());
    assert_eq!(user.get::<_, String>(5), "active");
    // The tenant role cannot log in; it is only ever switched to. On Citus
    // it can, without a password: Citus reaches the workers as the current
    // role (SECURITY.md "On Citus").
    let can_login: bool = db
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(can_login, on_citus());

    // Every template table exists, owned by the tenant's role.
    let tables: Vec<(String, String)> = db
        .query(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'tenant_alice_01' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for table in [
        "experiences",
        "experience_highlights",
        "conversations",
        "messages",
        "summaries",
        "summary_revisions",
        "skills",
        "skill_progress",
        "career_milestones",
        "achievements",
    ] {
        let found = tables.iter().find(|(t, _)| t == table);
        assert_eq!(
            found.map(|(_, o)| o.as_str()),
            Some(role.as_str()),
            "{table}"
        );
    }
    // The per-tenant history records each version with refinery's checksum.
    let history: Vec<(i32, String)> = db
        .query(
            "SELECT version, name FROM tenant_alice_01.refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let builtin: Vec<(i32, String)> = tenantry::templates::TemplateSet::builtin()
        .unwrap()
        .all()
        .iter()
        .map(|t| (t.version().get(), t.name().to_owned()))
        .collect();
    assert_eq!(history, builtin);
    assert_eq!(
        history[..4],
        [
            (1, "experiences".to_string()),
            (2, "conversations".to_string()),
            (3, "summaries".to_string()),
            (4, "skills".to_string())
        ]
    );
}

#[tokio::test]
async fn a_taken_username_or_email_gets_409() {
    let app = spawn_app().await;
    assert_eq!(app.register("bob").await.status(), 201);

    let again = app.register("BOB").await;
    assert_eq!(again.status(), 409);
    assert_eq!(json(again).await["error"]["code"], "username_taken");

    let same_email = app
        .post_json(
            "/api/auth/register",
            &json!({"username": "bobby", "email": "BOB@example.com", "password": PASSWORD}),
        )
        .await;
    assert_eq!(same_email.status(), 409);
    assert_eq!(json(same_email).await["error"]["code"], "email_taken");
    assert_eq!(app.schema_count().await, 1);
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test]
async fn hostile_usernames_are_rejected_and_leave_no_schema_or_role() {
    let app = spawn_app().await;
    let long = "a".repeat(10_000);
    let hostile = [
        "robert'); DROP TABLE tenantry.users;--",
        "x\"; DROP SCHEMA reference CASCADE; --",
        "tenant\" OR 1=1",
        "quote'quote",
        "semi;colon",
        "white space",
        "аlice",        // Cyrillic а
        "ａｌｉｃｅ",   // full-width
        "ali\u{0441}e", // Cyrillic с inside
        "zero\u{200b}width",
        "émile",
        "ab",
        "a_b_c_d_e_f_g_h_i_j_k_l_m_n_o_p_q",
        long.as_str(),
        "admin",
        "postgres",
        "public",
        "tenantry",
        "reference",
        "information_schema",
        "pg_signal_backend",
        "double__underscore",
        "trailing_",
        "9lives",
        "",
        "   ",
    ];
    for name in hostile {
        let response = app
            .post_json(
                "/api/auth/register",
                &json!({"username": name, "email": "ok@example.com", "password": PASSWORD}),
            )
            .await;
        assert_eq!(response.status(), 400, "{name:?}");
        assert_eq!(
            json(response).await["error"]["code"],
            "invalid_username",
            "{name:?}"
        );
    }
    assert_eq!(app.schema_count().await, 0);
    assert_eq!(app.tenant_role_count().await, 0);
    assert_eq!(app.user_count().await, 0);
    // And the system is intact.
    assert_eq!(app.register("survivor").await.status(), 201);
}

#[tokio::test]
async fn bad_emails_and_passwords_get_400_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"username": "carol", "email": "not-an-email", "password": PASSWORD}),
            "invalid_email",
        ),
        (
            json!({"username": "carol", "email": "a@b", "password": PASSWORD}),
            "invalid_email",
        ),
        (
            json!({"username": "carol", "email": format!("{}@example.com", "x".repeat(300)), "password": PASSWORD}),
            "invalid_email",
        ),
        (
            json!({"username": "carol", "email": "carol@example.com", "password": "short"}),
            "invalid_password",
        ),
        // 73 bytes: refused, never truncated.
        (
            json!({"username": "carol", "email": "carol@example.com", "password": "p".repeat(73)}),
            "invalid_password",
        ),
        // 37 two-byte characters: 37 characters, 74 bytes.
        (
            json!({"username": "carol", "email": "carol@example.com", "password": "é".repeat(37)}),
            "invalid_password",
        ),
        (
            json!({"username": "carol", "email": "carol@example.com", "password": "password1234"}),
            "invalid_password",
        ),
    ];
    for (body, code) in cases {
        let response = app.post_json("/api/auth/register", &body).await;
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(json(response).await["error"]["code"], code, "{body}");
    }
    assert_eq!(app.schema_count().await, 0);
}

#[tokio::test]
async fn malformed_requests_get_a_json_4xx_never_a_500() {
    let app = spawn_app().await;
    let url = format!("{}/api/auth/register", app.address);
    let send = |body: String, content_type: &'static str| {
        app.api
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let cases: Vec<(String, &str, u16, &str)> = vec![
        ("{not json".into(), "application/json", 400, "invalid_json"),
        ("".into(), "application/json", 400, "invalid_json"),
        ("[]".into(), "application/json", 400, "invalid_json"),
        (r#"{"username": 5, "email": "a@example.com", "password": "x"}"#.into(), "application/json", 400, "invalid_json"),
        (r#"{"username": "dave"}"#.into(), "application/json", 400, "invalid_json"),
        (r#"{"username": "dave", "email": "d@example.com", "password": "a perfectly fine password", "is_admin": true}"#.into(), "application/json", 400, "invalid_json"),
        (format!(r#"{{"username": "{}", "email": "d@example.com", "password": "x"}}"#, "a".repeat(100_000)), "application/json", 413, "payload_too_large"),
        (r#"{"username": "dave", "email": "d@example.com", "password": "a perfectly fine password"}"#.into(), "text/plain", 415, "unsupported_media_type"),
    ];
    for (body, content_type, status, code) in cases {
        let response = send(body.clone(), content_type).await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            status,
            "{}",
            &body[..body.len().min(80)]
        );
        assert_eq!(json(response).await["error"]["code"], code);
    }
    assert_eq!(app.schema_count().await, 0);
}

#[tokio::test]
async fn many_clients_registering_the_same_name_get_exactly_one_201() {
    let app = spawn_app().await;
    let bodies: Vec<_> = (0..24)
        .map(|i| json!({"username": "racer", "email": format!("racer{i}@example.com"), "password": PASSWORD}))
        .collect();
    let attempts = bodies
        .iter()
        .map(|b| app.post_json("/api/auth/register", b));
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        23,
        "{statuses:?}"
    );
    assert_eq!(app.schema_count().await, 1);
    assert_eq!(app.tenant_role_count().await, 1);
}

#[tokio::test]
async fn dozens_of_distinct_signups_at_once_all_complete() {
    let app = spawn_app().await;
    // On Citus a signup distributes its schema to a worker (~1 s of the
    // nodes' CPU on this 2-core machine, BENCHMARKS.md): a crowd beyond the
    // pool's 20 connections would wait past the pool's 5 s and get 503 +
    // Retry-After, as designed. There a crowd as large as the pool.
    let crowd: i64 = if on_citus() { 20 } else { 40 };
    let names: Vec<String> = (0..crowd as usize)
        .map(|i| format!("crowd_{i:02}"))
        .collect();
    let responses = futures::future::join_all(names.iter().map(|n| app.register(n))).await;
    for r in &responses {
        assert_eq!(r.status(), 201);
    }
    assert_eq!(app.schema_count().await, crowd);
    assert_eq!(app.tenant_role_count().await, crowd);
    let complete: i64 = app.count("SELECT count(*) FROM pg_tables WHERE schemaname LIKE 'tenant\\_crowd\\_%' AND tablename = 'achievements'").await;
    assert_eq!(complete, crowd);
}

#[tokio::test]
async fn a_template_that_fails_mid_provisioning_leaves_nothing_behind() {
    // Broken for ivan only: publishing builds a tenant from nothing first,
    // and refuses a version that fails for every tenant.
    let templates = templates_dir_with(&[(
        "V2__broken.sql",
        "CREATE TABLE notes (id bigserial PRIMARY KEY);\n\
         DO $$ BEGIN IF current_schema() = 'tenant_ivan' THEN\n\
           CREATE TABLE broken (note_id bigint REFERENCES no_such_table (id));\n\
         END IF; END $$;",
    )]);
    let app = spawn_app_with(|s| s.templates_dir = Some(templates)).await;

    let response = app.register("ivan").await;
    assert_eq!(response.status(), 500);
    let body = json(response).await;
    assert_eq!(body["error"]["code"], "internal_error");
    // Opaque: the cause goes to the log, not to the client.
    assert!(!body.to_string().contains("no_such_table"));

    assert_eq!(app.user_count().await, 0);
    assert_eq!(app.schema_count().await, 0);
    assert_eq!(app.tenant_role_count().await, 0);
    let tokens: i64 = app
        .count("SELECT count(*) FROM tenantry.refresh_tokens")
        .await;
    assert_eq!(tokens, 0);
}

#[tokio::test]
async fn templates_dir_overrides_the_built_in_templates() {
    let templates = templates_dir_with(&[(
        "V2__notes.sql",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let app = spawn_app_with(|s| s.templates_dir = Some(templates)).await;
    let response = app.register("judy").await;
    assert_eq!(response.status(), 201);
    assert_eq!(json(response).await["template_version"], 2);
    let notes: i64 = app.count("SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_judy' AND tablename = 'notes'").await;
    assert_eq!(notes, 1);
}

#[tokio::test]
async fn a_restart_keeps_the_data() {
    let app = spawn_app().await;
    assert_eq!(app.register("kate").await.status(), 201);
    // A second service on the same database: the bootstrap runs again
    // (idempotently) and the user and tenant are still there.
    let again = spawn_app_on(test_settings(&app.db_name), app.db_name.clone()).await;
    let response = again
        .post_json(
            "/api/auth/login",
            &json!({"username": "kate", "password": PASSWORD}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["schema"], "tenant_kate");
    let versions: i64 = again
        .count("SELECT count(*) FROM tenantry.refinery_schema_history")
        .await;
    assert_eq!(
        versions,
        system_migrations().len() as i64,
        "each file of system_migrations/"
    );
}

#[tokio::test]
async fn many_template_versions_are_applied_in_order() {
    // Each version depends on the one before it, so any reordering fails.
    let files: Vec<(String, String)> = (2..=41)
        .map(|v| {
            let sql = if v == 2 {
                "CREATE TABLE step_2 (id int PRIMARY KEY);".to_string()
            } else {
                format!(
                    "CREATE TABLE step_{v} (id int PRIMARY KEY, prev int REFERENCES step_{} (id));",
                    v - 1
                )
            };
            (format!("V{v}__step_{v}.sql"), sql)
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, s)| (f.as_str(), s.as_str()))
        .collect();
    let templates = templates_dir_with(&refs);
    let app = spawn_app_with(|s| s.templates_dir = Some(templates)).await;

    let response = app.register("olive").await;
    assert_eq!(response.status(), 201);
    assert_eq!(json(response).await["template_version"], 41);
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_olive.refinery_schema_history")
            .await,
        41
    );
}

#[tokio::test]
async fn random_hostile_signups_never_get_a_5xx_or_leave_a_partial_tenant() {
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};

    let app = spawn_app().await;
    let fragments = [
        "a",
        "z",
        "_",
        "__",
        "0",
        "9",
        "'",
        "\"",
        ";",
        "--",
        "/*",
        "*/",
        " ",
        "\t",
        "\n",
        "\\",
        "%",
        "DROP",
        "tenant",
        "pg_",
        "admin",
        "é",
        "а",
        "ｚ",
        "\u{0}",
        "\u{200b}",
        "😀",
        "$$",
        "(",
        ")",
        "@",
        ".",
        "example.com",
        "x".repeat(40).leak(),
    ];
    // A fixed seed: the same inputs on every run.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut piece = |n: usize| -> String {
        (0..rng.random_range(0..n))
            .map(|_| *fragments.choose(&mut rng).unwrap())
            .collect()
    };
    let mut bodies = Vec::new();
    let mut plausible = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..150 {
        // Half the requests are well-formed but for a random-ish name (some
        // valid, some taken twice), so that conflicts and successes mix with
        // the garbage.
        let (username, email, password) = if i % 2 == 0 {
            let len = plausible.random_range(1..34);
            let name: String = (0..len)
                .map(|_| *b"abcdefghij0123_".choose(&mut plausible).unwrap() as char)
                .collect();
            (
                format!("u{name}"),
                format!("user{}@example.com", i % 40),
                PASSWORD.to_string(),
            )
        } else {
            (
                format!("{}{}", if i % 3 == 0 { "u" } else { "" }, piece(6)),
                format!("{}@{}", piece(4), piece(3)),
                piece(20),
            )
        };
        let mut body = serde_json::json!({
            "username": username,
            "email": email,
            "password": password,
        });
        if i % 10 == 0 {
            body["username"] = serde_json::json!(i);
        }
        if i % 15 == 0 {
            body["email"] = serde_json::json!(null);
        }
        bodies.push(body);
    }
    for body in &bodies {
        let response = app.post_json("/api/auth/register", body).await;
        let status = response.status().as_u16();
        assert!([201, 400, 409].contains(&status), "{status} for {body}");
        let error = json(response).await;
        if status != 201 {
            assert!(error["error"]["code"].is_string(), "{error}");
        }
    }
    // Whatever was accepted is complete: one schema and one role per user.
    let users = app.user_count().await;
    assert!(users > 0, "some of the plausible signups succeed");
    assert_eq!(app.schema_count().await, users);
    assert_eq!(app.tenant_role_count().await, users);
}

#[tokio::test]
async fn two_signups_racing_on_one_email_get_one_201_and_one_409() {
    let app = spawn_app().await;
    let held = "INSERT INTO tenantry.users (username, email, password_hash) VALUES ('blocker', 'same@example.com', 'x')";
    let body =
        |name: &str| json!({"username": name, "email": "same@example.com", "password": PASSWORD});
    assert_eq!(
        race_past_the_pre_check(&app, held, [body("racer_a"), body("racer_b")]).await,
        [201, 409]
    );
    assert_eq!(app.tenant_counts().await, (1, 1, 1));
}

/// Two signups forced past the pre-check: the test holds an uncommitted
/// `held` insert (invisible to the pre-check, but holding the unique index)
/// while both are sent, then rolls it back. The sorted statuses.
async fn race_past_the_pre_check(
    app: &TestApp,
    held: &str,
    bodies: [serde_json::Value; 2],
) -> [u16; 2] {
    let db = app.db().await;
    db.batch_execute(&format!("BEGIN; {held}")).await.unwrap();
    let a = app.post_json("/api/auth/register", &bodies[0]);
    let b = app.post_json("/api/auth/register", &bodies[1]);
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        db.batch_execute("ROLLBACK").await.unwrap();
    };
    let (a, b, ()) = futures::join!(a, b, release);
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    statuses
}

#[tokio::test]
async fn a_schema_that_exists_outside_the_registry_makes_the_name_taken() {
    let app = spawn_app().await;
    app.db()
        .await
        .batch_execute("CREATE SCHEMA tenant_squatter")
        .await
        .unwrap();
    let response = app.register("squatter").await;
    assert_eq!(response.status(), 409);
    assert_eq!(json(response).await["error"]["code"], "username_taken");
    assert_eq!(app.user_count().await, 0);
    assert_eq!(app.tenant_role_count().await, 0);
}

#[tokio::test]
async fn two_signups_racing_past_the_pre_check_on_one_name_get_one_201() {
    // The unique-violation path, forced (the usual race mostly meets the
    // pre-check instead).
    let app = spawn_app().await;
    let held = "INSERT INTO tenantry.users (username, email, password_hash) VALUES ('duo', 'held@example.com', 'x')";
    let body = |n: u8| json!({"username": "duo", "email": format!("duo{n}@example.com"), "password": PASSWORD});
    assert_eq!(
        race_past_the_pre_check(&app, held, [body(1), body(2)]).await,
        [201, 409]
    );
    assert_eq!(app.tenant_counts().await, (1, 1, 1));
    assert_eq!(app.tenant_role_count().await, 1);
}
