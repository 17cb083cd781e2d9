//! Suspension (restriction of processing): login and every token of the
//! account get 403 `account_suspended`, its data stays, the fleet still
//! migrates it, admins can export and erase it, and resuming gives it all
//! back. Suspended and resumed from the admin routes and the CLI.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// `user`'s signup response (tokens included).
async fn signup(app: &TestApp, user: &str) -> Value {
    let response = app.register(user).await;
    assert_eq!(response.status(), 201, "register {user}");
    json(response).await
}

fn bearer(tokens: &Value) -> &str {
    tokens["access_token"].as_str().unwrap()
}

async fn suspend(app: &TestApp, admin: &str, user: &str, body: Value) -> (u16, Value) {
    let path = format!("/admin/tenants/{user}/suspend");
    send(app, Method::POST, &path, admin, Some(body)).await
}

async fn resume(app: &TestApp, admin: &str, user: &str) -> (u16, Value) {
    let path = format!("/admin/tenants/{user}/resume");
    send(app, Method::POST, &path, admin, None).await
}

async fn login(app: &TestApp, user: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/api/auth/login",
        &json!({"username": user, "password": password}),
    )
    .await
}

fn assert_suspended(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 403, "{what}: {body}");
    assert_eq!(body["error"]["code"], "account_suspended", "{what}: {body}");
}

/// Rows of `user`'s experiences, read as the superuser.
async fn experiences(app: &TestApp, user: &str) -> i64 {
    app.count(&format!("SELECT count(*) FROM tenant_{user}.experiences"))
        .await
}

async fn add_experience(app: &TestApp, token: &str, title: &str) {
    let body = json!({"title": title, "organization": "Acme", "started_on": "2021-03-01"});
    let (status, created) = send(app, Method::POST, "/api/experiences", token, Some(body)).await;
    assert_eq!(status, 201, "{created}");
}

#[tokio::test]
async fn login_with_the_right_password_of_a_suspended_account_gets_403_and_a_wrong_one_401() {
    let app = spawn_app().await;
    signup(&app, "sara").await;
    let admin = admin_token(&app).await;
    let (status, body) = suspend(&app, &admin, "sara", json!({"reason": "abuse reports"})).await;
    assert_eq!(status, 200, "{body}");

    let response = login(&app, "sara", PASSWORD).await;
    let status = response.status().as_u16();
    assert_suspended(status, &json(response).await, "login");
    let wrong = login(&app, "sara", "not the password at all").await;
    assert_eq!(wrong.status(), 401, "no hint that the account exists");
    assert_eq!(json(wrong).await["error"]["code"], "invalid_credentials");
    // The refused login opened no session and says why in the audit log.
    let sessions = app
        .count("SELECT count(*) FROM tenantry.refresh_tokens r JOIN tenantry.users u ON u.id = r.user_id WHERE u.username = 'sara'")
        .await;
    assert_eq!(sessions, 1, "only the signup's");
    let refused = app
        .count("SELECT count(*) FROM tenantry.audit_log WHERE entry::jsonb -> 'details' ->> 'reason' = 'account_suspended'")
        .await;
    assert_eq!(refused, 1);
}

#[tokio::test]
async fn a_signup_retried_with_its_idempotency_key_gets_no_tokens_while_suspended() {
    let app = spawn_app().await;
    let body = json!({"username": "uma", "email": "uma@example.com", "password": PASSWORD});
    let signup = || {
        app.api
            .post(format!("{}/api/auth/register", app.address))
            .header("Idempotency-Key", "uma-signup-1")
            .json(&body)
            .send()
    };
    assert_eq!(signup().await.unwrap().status(), 201);
    let admin = admin_token(&app).await;
    assert_eq!(suspend(&app, &admin, "uma", json!({})).await.0, 200);

    let replayed = signup().await.unwrap();
    let status = replayed.status().as_u16();
    assert_suspended(status, &json(replayed).await, "signup replay");
    let sessions = app
        .count("SELECT count(*) FROM tenantry.refresh_tokens r JOIN tenantry.users u ON u.id = r.user_id WHERE u.username = 'uma'")
        .await;
    assert_eq!(sessions, 1, "only the first signup's");
}

#[tokio::test]
async fn an_existing_token_gets_403_on_the_very_next_request_and_the_data_stays() {
    let app = spawn_app().await;
    let tokens = signup(&app, "tom").await;
    let token = bearer(&tokens);
    add_experience(&app, token, "Welder").await;
    add_experience(&app, token, "Foreman").await;
    let admin = admin_token(&app).await;

    let (status, _) = send(&app, Method::GET, "/api/experiences", token, None).await;
    assert_eq!(status, 200);
    let (status, body) = suspend(&app, &admin, "tom", json!({})).await;
    assert_eq!(status, 200, "{body}");

    for (method, path, body) in [
        (Method::GET, "/api/experiences", None),
        (
            Method::POST,
            "/api/experiences",
            Some(json!({"title": "Painter", "started_on": "2022-01-01"})),
        ),
        (Method::GET, "/api/summaries/quick", None),
        (Method::GET, "/api/me", None),
        (Method::GET, "/api/me/export", None),
        (
            Method::DELETE,
            "/api/me",
            Some(json!({"password": PASSWORD})),
        ),
        (Method::GET, "/api/auth/sessions", None),
    ] {
        let what = format!("{method} {path}");
        let (status, answer) = send(&app, method, path, token, body).await;
        assert_suspended(status, &answer, &what);
    }
    // A token that is bad anyway stays a 401: only a valid token learns
    // that its account is suspended.
    let (status, _) = send(&app, Method::GET, "/api/experiences", "not-a-token", None).await;
    assert_eq!(status, 401);

    assert_eq!(experiences(&app, "tom").await, 2, "the data is untouched");
    assert_eq!(app.tenant_counts().await, (2, 1, 1), "admin ops, tom");
    let status: String = app
        .db()
        .await
        .query_one(
            "SELECT status FROM tenantry.tenants WHERE username = 'tom'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "active", "the registry's status is left as it is");

    let (status, body) = resume(&app, &admin, "tom").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "active");
    let (status, page) = send(&app, Method::GET, "/api/experiences", token, None).await;
    assert_eq!(status, 200, "the same token works again: {page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let (status, _) = send(&app, Method::GET, "/api/me", token, None).await;
    assert_eq!(status, 200);
    assert_eq!(login(&app, "tom", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn refresh_is_refused_while_suspended_and_the_same_refresh_token_works_after_resume() {
    let app = spawn_app().await;
    let tokens = signup(&app, "rita").await;
    let admin = admin_token(&app).await;
    assert_eq!(suspend(&app, &admin, "rita", json!({})).await.0, 200);

    let response = app
        .post_json(
            "/api/auth/refresh",
            &json!({"refresh_token": tokens["refresh_token"]}),
        )
        .await;
    let status = response.status().as_u16();
    assert_suspended(status, &json(response).await, "refresh");

    assert_eq!(resume(&app, &admin, "rita").await.0, 200);
    assert_eq!(app.refresh_status(&tokens["refresh_token"]).await, 200);
}

#[tokio::test]
async fn fleet_migrate_reaches_a_suspended_tenant() {
    let app = spawn_app().await;
    signup(&app, "fay").await;
    signup(&app, "gus").await;
    let admin = admin_token(&app).await;
    assert_eq!(suspend(&app, &admin, "fay", json!({})).await.0, 200);
    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__rating.sql"),
        "ALTER TABLE experiences ADD COLUMN rating integer NOT NULL DEFAULT 0;\n",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));

    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2 migrated, 0 failed"),
        "{}",
        stdout(&out)
    );
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT t.template_version, EXISTS (SELECT FROM information_schema.columns
                    WHERE table_schema = 'tenant_fay' AND table_name = 'experiences' AND column_name = 'rating')
             FROM tenantry.tenants t WHERE t.username = 'fay'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), added);
    assert!(row.get::<_, bool>(1));
    // Still suspended after the migration.
    let out = tenantry(&["tenants", "show", "fay", "--json"], &env, None).await;
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["status"], "suspended");
    assert_eq!(shown["template_version"], added);
}

#[tokio::test]
async fn an_admin_can_export_and_erase_a_suspended_tenant() {
    let app = spawn_app().await;
    let tokens = signup(&app, "ivan").await;
    add_experience(&app, bearer(&tokens), "Carpenter").await;
    let admin = admin_token(&app).await;
    assert_eq!(suspend(&app, &admin, "ivan", json!({})).await.0, 200);
    let env = cli_env(&app.db_name);

    let out = tenantry(&["tenants", "export", "ivan"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let export: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = export.to_string();
    assert!(text.contains("Carpenter"), "{text}");
    assert!(export["integrity"].is_object());

    let (status, receipt) = send(&app, Method::DELETE, "/admin/tenants/ivan", &admin, None).await;
    assert_eq!(status, 200, "{receipt}");
    assert_eq!(receipt["username"], "ivan");
    assert_eq!(
        app.tenant_counts().await,
        (1, 0, 0),
        "only the admin is left"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.outbox").await,
        0,
        "the user's mail went with the user"
    );
}

#[tokio::test]
async fn suspension_and_resumption_are_audited_and_mailed_to_the_user() {
    let data_dir = temp_dir("tenantry-suspension-mail");
    spawn_reaper(&data_dir);
    let app = spawn_app_with(|s| s.data_dir = data_dir.clone()).await;
    signup(&app, "mona").await;
    let admin = admin_token(&app).await;
    let (status, body) = suspend(
        &app,
        &admin,
        "mona",
        json!({"reason": "chargeback dispute"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(resume(&app, &admin, "mona").await.0, 200);

    let db = app.db().await;
    let mails: Vec<(String, String)> = db
        .query(
            "SELECT kind, recipient FROM tenantry.outbox WHERE kind LIKE 'tenant.%' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let to = "mona@example.com".to_string();
    assert_eq!(
        mails,
        [
            ("tenant.suspended".to_string(), to.clone()),
            ("tenant.resumed".to_string(), to.clone())
        ]
    );

    let entries = db
        .query(
            "SELECT entry::jsonb FROM tenantry.audit_log
             WHERE action IN ('tenant_suspended', 'tenant_resumed') ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let entries: Vec<Value> = entries.iter().map(|r| r.get(0)).collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["action"], "tenant_suspended");
    assert_eq!(entries[0]["details"]["reason_given"], true);
    assert_eq!(entries[1]["action"], "tenant_resumed");
    let admin_id: uuid::Uuid = db
        .query_one("SELECT id FROM tenantry.users WHERE username = 'ops'", &[])
        .await
        .unwrap()
        .get(0);
    for entry in &entries {
        assert!(
            entry["actor"].as_str().unwrap().starts_with("u_"),
            "{entry}"
        );
        assert!(
            entry["subject"].as_str().unwrap().starts_with("u_"),
            "{entry}"
        );
        assert_ne!(entry["actor"], entry["subject"]);
        assert!(
            !entry.to_string().contains("chargeback"),
            "the reason stays out of the log: {entry}"
        );
        assert!(!entry.to_string().contains(&admin_id.to_string()));
    }

    // No SMTP server configured: the service writes the mail under
    // <data dir>/mail/.
    let mail_dir = data_dir.join("mail");
    let suspended = mail_file(&mail_dir, "tenant_suspended").await;
    assert!(suspended.contains("To: mona@example.com"), "{suspended}");
    assert!(suspended.contains("chargeback dispute"), "{suspended}");
}

#[tokio::test]
async fn tenants_list_show_and_the_admin_routes_show_suspended_and_email_verified() {
    let app = spawn_app().await;
    signup(&app, "nell").await;
    signup(&app, "owen").await;
    app.db()
        .await
        .execute(
            "UPDATE tenantry.users SET email_verified_at = now() WHERE username = 'owen'",
            &[],
        )
        .await
        .unwrap();
    let admin = admin_token(&app).await;
    let (status, body) = suspend(
        &app,
        &admin,
        "nell",
        json!({"reason": "  GDPR art. 18 request  "}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "suspended");
    assert_eq!(body["suspension_reason"], "GDPR art. 18 request");
    assert!(body["suspended_at"].is_string());

    let (status, shown) = send(&app, Method::GET, "/admin/tenants/nell", &admin, None).await;
    assert_eq!(status, 200);
    assert_eq!(shown, body);
    assert_eq!(shown["email_verified"], false);
    let (_, owen) = send(&app, Method::GET, "/admin/tenants/owen", &admin, None).await;
    assert_eq!(owen["status"], "active");
    assert_eq!(owen["email_verified"], true);
    assert_eq!(owen["suspended_at"], Value::Null);
    assert_eq!(owen["suspension_reason"], Value::Null);

    let (_, page) = send(
        &app,
        Method::GET,
        "/admin/tenants?status=suspended",
        &admin,
        None,
    )
    .await;
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nell"]);
    let (_, page) = send(
        &app,
        Method::GET,
        "/admin/tenants?status=active",
        &admin,
        None,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["items"][0]["username"], "owen");
    assert_eq!(page["items"][0]["email_verified"], true);

    let env = cli_env(&app.db_name);
    let out = tenantry(&["tenants", "list", "--json"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list[0]["username"], "nell");
    assert_eq!(list[0]["status"], "suspended");
    assert_eq!(list[0]["email_verified"], false);
    assert_eq!(list[1]["status"], "active");
    assert_eq!(list[1]["email_verified"], true);
    let out = tenantry(&["tenants", "show", "nell", "--json"], &env, None).await;
    let show: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(show, list[0]);
    assert_eq!(show["suspension_reason"], "GDPR art. 18 request");
    let out = tenantry(&["tenants", "list"], &env, None).await;
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("nell "))
        .unwrap()
        .to_owned();
    assert!(line.contains(" suspended "), "{line}");
    let out = tenantry(&["tenants", "show", "nell"], &env, None).await;
    assert!(
        stdout(&out).contains("reason:           GDPR art. 18 request"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("email verified:   no"));
}

#[tokio::test]
async fn the_admin_routes_answer_404_409_400_and_403_for_non_admins() {
    let app = spawn_app().await;
    let tokens = signup(&app, "pia").await;
    let admin = admin_token(&app).await;

    let (status, body) = suspend(&app, &admin, "nobody", json!({})).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = suspend(&app, &admin, "x'; drop table y; --", json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = resume(&app, &admin, "nobody").await;
    assert_eq!(status, 404);
    // Staff accounts are not tenants.
    let (status, _) = suspend(&app, &admin, "ops", json!({})).await;
    assert_eq!(status, 404);

    let (status, body) = resume(&app, &admin, "pia").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_suspended");
    let long = "x".repeat(501);
    let (status, body) = suspend(&app, &admin, "pia", json!({"reason": long})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_reason");
    let (status, body) = suspend(&app, &admin, "pia", json!({"reason": "a\u{0}b"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = suspend(&app, &admin, "pia", json!({"why": "typo"})).await;
    assert_eq!(status, 400, "{body}");

    // A tenant may not suspend (itself or anyone).
    let (status, body) = suspend(&app, bearer(&tokens), "pia", json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");

    assert_eq!(suspend(&app, &admin, "pia", json!({})).await.0, 200);
    let (status, body) = suspend(&app, &admin, "pia", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_suspended");
    // Once: one mail, one audit entry.
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.outbox WHERE kind = 'tenant.suspended'")
            .await,
        1
    );
    let (status, _) = send(&app, Method::GET, "/admin/tenants/pia", &admin, None).await;
    assert_eq!(status, 200, "the admin is not suspended");
    // A suspended tenant's token is refused on the admin routes with the
    // same 403 account_suspended.
    let (status, body) = resume(&app, bearer(&tokens), "pia").await;
    assert_suspended(status, &body, "resume by the suspended tenant");
}

#[tokio::test]
async fn the_cli_suspends_and_resumes_with_clear_messages_and_exit_codes() {
    let app = spawn_app().await;
    let tokens = signup(&app, "quin").await;
    let token = bearer(&tokens);
    let env = cli_env(&app.db_name);

    let out = tenantry(
        &["tenants", "suspend", "quin", "--reason", "payment dispute"],
        &env,
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("suspended quin"), "{}", stdout(&out));
    let (status, body) = send(&app, Method::GET, "/api/experiences", token, None).await;
    assert_suspended(status, &body, "after the CLI's suspension");

    let out = tenantry(&["tenants", "suspend", "quin"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("quin is already suspended"),
        "{}",
        stderr(&out)
    );
    let out = tenantry(&["tenants", "suspend", "nobody"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no tenant named nobody"),
        "{}",
        stderr(&out)
    );
    let long = "x".repeat(501);
    for args in [
        vec!["tenants", "suspend"],
        vec!["tenants", "suspend", "Robert\"); --"],
        vec!["tenants", "suspend", "quin", "--reason", &long],
        vec!["tenants", "resume"],
    ] {
        let out = tenantry(&args, &env, None).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty());
    }

    let entry: Value = app
        .db()
        .await
        .query_one(
            "SELECT entry::jsonb FROM tenantry.audit_log WHERE action = 'tenant_suspended'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entry["actor"], "cli");
    let mails = app
        .count("SELECT count(*) FROM tenantry.outbox WHERE kind = 'tenant.suspended' AND recipient = 'quin@example.com'")
        .await;
    assert_eq!(mails, 1);

    let out = tenantry(&["tenants", "resume", "quin"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("resumed quin"), "{}", stdout(&out));
    let (status, _) = send(&app, Method::GET, "/api/experiences", token, None).await;
    assert_eq!(status, 200);
    let out = tenantry(&["tenants", "resume", "quin"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("quin is not suspended"),
        "{}",
        stderr(&out)
    );
}
