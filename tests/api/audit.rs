//! The audit log: what is recorded, that it holds no secrets or clear
//! personal data, that it is append-only, and that tampering of every kind
//! is detected by `tenantry audit verify`.

use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{json, Value};

use crate::accounts::staff_token;
use crate::helpers::*;

fn anchors_env(app: &TestApp, anchors: &Path) -> Vec<(&'static str, String)> {
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_AUDIT_ANCHOR_FILE", anchors.display().to_string()));
    env
}

async fn verify(app: &TestApp, anchors: &Path) -> std::process::Output {
    tenantry(&["audit", "verify"], &anchors_env(app, anchors), None).await
}

async fn anchor(app: &TestApp, anchors: &Path) {
    let out = tenantry(&["audit", "anchor"], &anchors_env(app, anchors), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

fn anchor_file() -> PathBuf {
    let dir = temp_dir("tenantry-anchors");
    spawn_reaper(&dir);
    dir.join("anchors")
}

async fn actions(app: &TestApp) -> Vec<String> {
    app.db()
        .await
        .query("SELECT action FROM tenantry.audit_log ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn security_actions_are_recorded_by_pseudonym_without_secrets() {
    let app = spawn_app_with(|s| s.limits.login_max_failures = 2).await;
    let signup = json(app.register("vera").await).await;
    let access = signup["access_token"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        app.post_json(
            "/api/auth/login",
            &json!({"username": "vera", "password": "a wrong password"}),
        )
        .await;
    }
    app.db()
        .await
        .execute("DELETE FROM tenantry.login_throttle", &[])
        .await
        .unwrap();
    let login = json(
        app.post_json(
            "/api/auth/login",
            &json!({"username": "vera", "password": PASSWORD}),
        )
        .await,
    )
    .await;
    let first = signup["refresh_token"].clone();
    let refresh = |t: Value| {
        let body = json!({ "refresh_token": t });
        let app = &app;
        async move { app.post_json("/api/auth/refresh", &body).await }
    };
    assert_eq!(refresh(first.clone()).await.status(), 200);
    assert_eq!(refresh(first).await.status(), 401, "a replay");
    app.post_json(
        "/api/auth/logout",
        &json!({"refresh_token": login["refresh_token"]}),
    )
    .await;
    // The replay ended the signup's session, its access token with it.
    let ended = app
        .call(Method::GET, "/api/me", &access)
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 401);
    let again = json(
        app.post_json(
            "/api/auth/login",
            &json!({"username": "vera", "password": PASSWORD}),
        )
        .await,
    )
    .await;
    let changed = app
        .call(
            Method::POST,
            "/api/auth/change-password",
            again["access_token"].as_str().unwrap(),
        )
        .json(&json!({"current_password": PASSWORD, "new_password": "the next passphrase"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let admin = staff_token(&app, "ada", false).await;
    let run = app
        .call(Method::POST, "/admin/fleet/migrations", &admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 202);
    // The run finishes in the background.
    for _ in 0..100 {
        if actions(&app)
            .await
            .contains(&"fleet_run_finished".to_string())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    assert_eq!(
        actions(&app).await,
        [
            "register",
            "login_failed",
            "login_failed",
            "login_throttled",
            "login_succeeded",
            "refresh_token_reuse",
            "logout",
            "login_succeeded",
            "password_changed",
            "admin_created",
            "login_succeeded",
            "fleet_run_started",
            "fleet_run_finished",
        ]
    );

    // No password, token, name, email, id or address in clear.
    let db = app.db().await;
    let everything: String = db
        .query_one(
            "SELECT string_agg(entry, E'\\n' ORDER BY seq) FROM tenantry.audit_log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for secret in [
        PASSWORD,
        "the next passphrase",
        "a wrong password",
        "vera",
        "ada@example.com",
        "127.0.0.1",
        signup["user_id"].as_str().unwrap(),
        signup["refresh_token"].as_str().unwrap(),
        login["refresh_token"].as_str().unwrap(),
        &access,
    ] {
        assert!(
            !everything.contains(secret),
            "{secret:?} is in the audit log"
        );
    }
    // The user's entries share one pseudonym, and an admin finds them by name.
    let entries = app
        .call(Method::GET, "/admin/audit?user=vera&limit=200", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(entries.status(), 200);
    let entries = json(entries).await;
    let found: Vec<&str> = entries["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        found,
        [
            "password_changed",
            "login_succeeded",
            "logout",
            "refresh_token_reuse",
            "login_succeeded",
            "login_throttled",
            "login_failed",
            "login_failed",
            "register",
        ],
        "newest first"
    );
    let pseudonym = entries["items"][0]["actor"].as_str().unwrap();
    assert!(pseudonym.starts_with("u_"));
    let failed = app
        .call(Method::GET, "/admin/audit?action=login_failed", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(json(failed).await["items"].as_array().unwrap().len(), 2);
    let bad = app
        .call(Method::GET, "/admin/audit?action=tea_time", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let out = verify(&app, &anchor_file()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("13 entries"), "{}", stdout(&out));
}

#[tokio::test]
async fn the_log_refuses_update_delete_and_truncate() {
    let app = spawn_app().await;
    assert_eq!(app.register("wanda").await.status(), 201);
    let service = connect_as_service(&app.db_name).await;
    for sql in [
        "UPDATE tenantry.audit_log SET entry = '{}'",
        "DELETE FROM tenantry.audit_log",
        "TRUNCATE tenantry.audit_log",
        "DELETE FROM tenantry.audit_head",
        "UPDATE tenantry.audit_head SET seq = 0",
    ] {
        let err = service.batch_execute(sql).await.unwrap_err();
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains("audit")),
            "{sql}: {err:?}"
        );
    }
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.audit_log").await,
        1
    );
}

/// A superuser working around the triggers: what `audit verify` must catch.
async fn tamper(app: &TestApp, sql: &str) {
    app.db()
        .await
        .batch_execute(&format!(
            "SET session_replication_role = replica; {sql}; RESET session_replication_role"
        ))
        .await
        .unwrap();
}

async fn app_with_entries(n: usize) -> (TestApp, PathBuf) {
    let app = spawn_app().await;
    for i in 0..n {
        assert_eq!(app.register(&format!("user_{i}")).await.status(), 201);
    }
    let anchors = anchor_file();
    let out = verify(&app, &anchors).await;
    assert!(
        out.status.success(),
        "intact before tampering: {}",
        stderr(&out)
    );
    (app, anchors)
}

fn broken_at(out: &std::process::Output, seq: i64) {
    assert_eq!(out.status.code(), Some(1), "{}", stdout(out));
    assert!(
        stderr(out).contains(&format!("broken at entry {seq}")),
        "{}",
        stderr(out)
    );
}

#[tokio::test]
async fn an_edited_entry_is_detected_and_named() {
    let (app, anchors) = app_with_entries(5).await;
    tamper(
        &app,
        "UPDATE tenantry.audit_log SET entry = replace(entry, 'register', 'login_failed') WHERE seq = 3",
    )
    .await;
    broken_at(&verify(&app, &anchors).await, 3);
}

#[tokio::test]
async fn an_entry_rehashed_after_editing_breaks_the_next_one() {
    let (app, anchors) = app_with_entries(5).await;
    // Recompute entry 2's own hash: its successor no longer chains to it.
    tamper(
        &app,
        "UPDATE tenantry.audit_log l
         SET entry = replace(l.entry, 'register', 'login_failed'),
             hash = sha256(p.hash || int8send(l.seq) || convert_to(replace(l.entry, 'register', 'login_failed'), 'UTF8'))
         FROM tenantry.audit_log p WHERE p.seq = 1 AND l.seq = 2",
    )
    .await;
    broken_at(&verify(&app, &anchors).await, 3);
}

#[tokio::test]
async fn a_deleted_entry_is_detected() {
    let (app, anchors) = app_with_entries(5).await;
    tamper(&app, "DELETE FROM tenantry.audit_log WHERE seq = 2").await;
    broken_at(&verify(&app, &anchors).await, 2);
}

#[tokio::test]
async fn a_truncated_log_is_detected() {
    let (app, anchors) = app_with_entries(3).await;
    tamper(&app, "TRUNCATE tenantry.audit_log").await;
    broken_at(&verify(&app, &anchors).await, 1);
}

#[tokio::test]
async fn a_deleted_tail_is_detected_by_the_anchors_even_with_the_head_rewound() {
    let (app, anchors) = app_with_entries(5).await;
    anchor(&app, &anchors).await;
    // Remove the last two entries and move the head back to entry 3, so
    // that the chain in the database is consistent again.
    tamper(
        &app,
        "DELETE FROM tenantry.audit_log WHERE seq > 3;
         UPDATE tenantry.audit_head SET seq = 3, hash = (SELECT hash FROM tenantry.audit_log WHERE seq = 3)",
    )
    .await;
    let out = verify(&app, &anchors).await;
    broken_at(&out, 4);
    assert!(stderr(&out).contains("anchor"), "{}", stderr(&out));
    // Without the anchor file the rewound chain would look intact: that is
    // what the anchors are for.
    let out = verify(&app, &anchor_file()).await;
    assert!(out.status.success());
}

#[tokio::test]
async fn serve_anchors_the_chain_periodically() {
    let anchors = anchor_file();
    let path = anchors.clone();
    let app = spawn_app_with(move |s| {
        s.audit_anchor_file = path;
        s.maintenance_interval = std::time::Duration::from_millis(300);
    })
    .await;
    assert_eq!(app.register("yusuf").await.status(), 201);
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(&anchors).unwrap_or_default();
        if text.contains(" 1 ") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let installation = app.installation_id().await;
    assert!(text.starts_with(&format!("{installation} 1 ")), "{text:?}");
}

#[tokio::test]
async fn two_hundred_concurrent_audited_actions_leave_one_unbroken_chain() {
    let app = spawn_app().await;
    assert_eq!(app.register("zora").await.status(), 201);
    let attempts = (0..200).map(|i| {
        let app = &app;
        async move {
            let body = if i % 2 == 0 {
                json!({"username": "zora", "password": PASSWORD})
            } else {
                json!({"username": format!("ghost_{i}"), "password": PASSWORD})
            };
            app.post_json("/api/auth/login", &body)
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(attempts).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 100);
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 100);
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.audit_log").await,
        201
    );
    let out = verify(&app, &anchor_file()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("201 entries"), "{}", stdout(&out));
}

#[tokio::test]
async fn expired_rows_are_purged_in_the_background() {
    let app =
        spawn_app_with(|s| s.maintenance_interval = std::time::Duration::from_millis(300)).await;
    let signup = json(app.register("xena").await).await;
    let db = app.db().await;
    db.batch_execute(
        "UPDATE tenantry.refresh_tokens SET expires_at = now() - interval '1 minute';
         INSERT INTO tenantry.login_throttle (username, failures, window_start)
         VALUES ('old_name', 3, now() - interval '2 days'), ('fresh_name', 1, now())",
    )
    .await
    .unwrap();
    let mut left = (1, 1);
    for _ in 0..50 {
        left = (
            app.count("SELECT count(*) FROM tenantry.refresh_tokens")
                .await,
            app.count("SELECT count(*) FROM tenantry.login_throttle")
                .await,
        );
        if left == (0, 1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        left,
        (0, 1),
        "expired tokens and stale throttle rows go; fresh ones stay"
    );
    assert_eq!(app.refresh_status(&signup["refresh_token"]).await, 401);
}
