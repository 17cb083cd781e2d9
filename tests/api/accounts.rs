//! Password change, disabled accounts, idempotent signup, staff roles and
//! the admin routes.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

async fn login(app: &TestApp, name: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/api/auth/login",
        &json!({"username": name, "password": password}),
    )
    .await
}

#[tokio::test]
async fn changing_the_password_ends_other_sessions_and_old_access_tokens_at_once() {
    let app = spawn_app().await;
    let signup = json(app.register("paula").await).await;
    let here = json(login(&app, "paula", PASSWORD).await).await;
    let old_access = here["access_token"].as_str().unwrap().to_owned();
    let other_access = signup["access_token"].as_str().unwrap().to_owned();

    // A wrong current password changes nothing.
    let wrong = app
        .call(Method::POST, "/api/auth/change-password", &old_access)
        .json(
            &json!({"current_password": "not it at all", "new_password": "a brand new passphrase"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // A weak new password is refused, naming the field.
    let weak = app
        .call(Method::POST, "/api/auth/change-password", &old_access)
        .json(&json!({"current_password": PASSWORD, "new_password": "short"}))
        .send()
        .await
        .unwrap();
    assert_eq!(weak.status(), 400);
    assert_eq!(json(weak).await["error"]["code"], "invalid_new_password");
    assert_eq!(
        status_of(app.call(Method::GET, "/api/experiences", &other_access)).await,
        200
    );

    let changed = app
        .call(Method::POST, "/api/auth/change-password", &old_access)
        .json(&json!({"current_password": PASSWORD, "new_password": "a brand new passphrase"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let changed = json(changed).await;
    assert_eq!(changed["sessions_revoked"], 1, "the signup's session");
    let new_access = changed["access_token"].as_str().unwrap();

    // Every access token from before is dead, on tenant and other routes.
    for token in [&old_access, &other_access] {
        assert_eq!(
            status_of(app.call(Method::GET, "/api/experiences", token)).await,
            401
        );
        assert_eq!(
            status_of(app.call(Method::GET, "/api/me", token)).await,
            401
        );
        assert_eq!(
            status_of(app.call(Method::GET, "/api/auth/sessions", token)).await,
            401
        );
    }
    assert_eq!(
        status_of(app.call(Method::GET, "/api/experiences", new_access)).await,
        200
    );
    // The other session's refresh token is revoked; this session's lives on.
    let refresh = |token: &Value| {
        let body = json!({"refresh_token": token.as_str().unwrap()});
        let app = &app;
        async move { app.post_json("/api/auth/refresh", &body).await }
    };
    assert_eq!(refresh(&signup["refresh_token"]).await.status(), 401);
    let renewed = refresh(&here["refresh_token"]).await;
    assert_eq!(renewed.status(), 200);
    let renewed = json(renewed).await;
    assert_eq!(
        status_of(app.call(
            Method::GET,
            "/api/experiences",
            renewed["access_token"].as_str().unwrap()
        ))
        .await,
        200
    );
    // Only the new password logs in.
    assert_eq!(login(&app, "paula", PASSWORD).await.status(), 401);
    assert_eq!(
        login(&app, "paula", "a brand new passphrase")
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_disabled_account_is_locked_out_at_once() {
    let app = spawn_app().await;
    let signup = json(app.register("dora").await).await;
    let access = signup["access_token"].as_str().unwrap();
    assert_eq!(
        status_of(app.call(Method::GET, "/api/me", access)).await,
        200
    );
    app.db()
        .await
        .execute(
            "UPDATE tenantry.users SET disabled_at = now() WHERE username = 'dora'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        status_of(app.call(Method::GET, "/api/experiences", access)).await,
        401
    );
    assert_eq!(
        status_of(app.call(Method::GET, "/api/me", access)).await,
        401
    );
    assert_eq!(app.refresh_status(&signup["refresh_token"]).await, 401);
    assert_eq!(login(&app, "dora", PASSWORD).await.status(), 401);
}

async fn register_with_key(app: &TestApp, key: &str, body: &Value) -> reqwest::Response {
    app.api
        .post(format!("{}/api/auth/register", app.address))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_signup_retried_with_its_idempotency_key_gets_the_original_account() {
    let app = spawn_app().await;
    let body = json!({"username": "ivo", "email": "ivo@example.com", "password": PASSWORD});
    let first = register_with_key(&app, "key-0001", &body).await;
    assert_eq!(first.status(), 201);
    let first = json(first).await;
    let retry = register_with_key(&app, "key-0001", &body).await;
    assert_eq!(retry.status(), 201, "not a 409");
    let retry = json(retry).await;
    assert_eq!(retry["user_id"], first["user_id"]);
    assert_eq!(retry["schema"], first["schema"]);
    assert_eq!(
        status_of(app.call(
            Method::GET,
            "/api/experiences",
            retry["access_token"].as_str().unwrap()
        ))
        .await,
        200,
        "the retry's tokens work"
    );
    assert_eq!(app.user_count().await, 1);
    assert_eq!(app.schema_count().await, 1);

    // The same key with another body (or another password) is a 422.
    let other = register_with_key(
        &app,
        "key-0001",
        &json!({"username": "ivo", "email": "ivo@example.com", "password": "another fine password"}),
    )
    .await;
    assert_eq!(other.status(), 422);
    assert_eq!(json(other).await["error"]["code"], "idempotency_key_reused");
    let other = register_with_key(
        &app,
        "key-0001",
        &json!({"username": "ivo2", "email": "ivo2@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(other.status(), 422);
    // Without the key, a repeat is the usual 409.
    assert_eq!(app.register("ivo").await.status(), 409);
    // A bad key is refused before anything is made.
    let bad = register_with_key(
        &app,
        "",
        &json!({"username": "jan", "email": "jan@example.com", "password": PASSWORD}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    assert_eq!(app.user_count().await, 1);

    // The key is honoured for a bounded time (24 hours).
    app.db()
        .await
        .execute(
            "UPDATE tenantry.idempotency_keys SET created_at = now() - interval '25 hours'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        register_with_key(&app, "key-0001", &body).await.status(),
        409
    );
}

#[tokio::test]
async fn two_concurrent_signups_with_one_key_make_one_account() {
    let app = spawn_app().await;
    let body = json!({"username": "kurt", "email": "kurt@example.com", "password": PASSWORD});
    // Hold the username's registry slot from the test so both requests are
    // in flight together: the first waits on the lock, the second on it.
    let db = app.db().await;
    db.batch_execute("BEGIN; LOCK TABLE tenantry.idempotency_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let a = register_with_key(&app, "same-key", &body);
    let b = register_with_key(&app, "same-key", &body);
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        db.batch_execute("COMMIT").await.unwrap();
    };
    let (a, b, ()) = futures::join!(a, b, release);
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201));
    let (a, b) = (json(a).await, json(b).await);
    assert_eq!(a["user_id"], b["user_id"]);
    assert_eq!(app.user_count().await, 1);
}

/// An admin (or auditor) made with the CLI, logged in.
pub async fn staff_token(app: &TestApp, name: &str, auditor: bool) -> String {
    let email = format!("{name}@example.com");
    let mut args = vec!["admin", "create", name, "--email", &email];
    if auditor {
        args.push("--auditor");
    }
    let out = tenantry(&args, &cli_env(&app.db_name), Some(PASSWORD)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let response = login(app, name, PASSWORD).await;
    assert_eq!(response.status(), 200);
    json(response).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn admin_routes_are_for_admins_and_the_audit_log_for_auditors_too() {
    let app = spawn_app().await;
    let user = app.token("ulla").await;
    let admin = staff_token(&app, "ada", false).await;
    let auditor = staff_token(&app, "audrey", true).await;
    assert_eq!(
        app.schema_count().await,
        1,
        "staff accounts get no tenant schema"
    );

    for path in [
        "/admin/tenants",
        "/admin/tenants/ulla",
        "/admin/fleet",
        "/admin/audit",
    ] {
        assert_eq!(app.get(path).await.status(), 401, "{path} without a token");
        let by_user = app.call(Method::GET, path, &user).send().await.unwrap();
        assert_eq!(by_user.status(), 403, "{path} for a user");
        assert_eq!(json(by_user).await["error"]["code"], "forbidden");
        assert_eq!(
            status_of(app.call(Method::GET, path, &admin)).await,
            200,
            "{path}"
        );
        let expected = if path == "/admin/audit" { 200 } else { 403 };
        assert_eq!(
            status_of(app.call(Method::GET, path, &auditor)).await,
            expected,
            "{path} for an auditor"
        );
    }
    // A staff account has no tenant to route to.
    assert_eq!(
        status_of(app.call(Method::GET, "/api/experiences", &admin)).await,
        401
    );
    // A demoted admin loses access at once.
    app.db()
        .await
        .execute(
            "UPDATE tenantry.users SET role = 'user' WHERE username = 'ada'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        status_of(app.call(Method::GET, "/admin/tenants", &admin)).await,
        403
    );
}

#[tokio::test]
async fn admins_page_and_filter_the_tenant_registry() {
    let app = spawn_app().await;
    for name in ["tom", "tina", "theo", "tara", "toni"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    app.db()
        .await
        .execute(
            "UPDATE tenantry.tenants SET template_version = 1 WHERE username IN ('tina', 'toni')",
            &[],
        )
        .await
        .unwrap();
    let admin = staff_token(&app, "ada", false).await;
    let get = |path: String| {
        let request = app.call(Method::GET, &path, &admin);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let mut names = Vec::new();
    let mut path = "/admin/tenants?limit=2".to_string();
    loop {
        let (status, page) = get(path.clone()).await;
        assert_eq!(status, 200, "{page}");
        for t in page["items"].as_array().unwrap() {
            names.push(t["username"].as_str().unwrap().to_owned());
            assert!(t["schema"].is_string() && t["template_version"].is_i64());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/admin/tenants?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(names, ["tara", "theo", "tina", "tom", "toni"]);
    let (_, v1) = get("/admin/tenants?version=1&status=active".into()).await;
    let v1: Vec<&str> = v1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["username"].as_str().unwrap())
        .collect();
    assert_eq!(v1, ["tina", "toni"]);
    let (status, one) = get("/admin/tenants/theo".into()).await;
    assert_eq!((status, one["schema"].as_str()), (200, Some("tenant_theo")));
    assert_eq!(get("/admin/tenants/nobody".into()).await.0, 404);
    assert_eq!(get("/admin/tenants?status=sleeping".into()).await.0, 400);
    assert_eq!(get("/admin/tenants?version=0".into()).await.0, 400);
    assert_eq!(get("/admin/tenants?sort=evil".into()).await.0, 400);
}

#[tokio::test]
async fn the_cluster_routes_are_for_admins_and_say_when_the_database_is_not_citus() {
    let app = spawn_app().await;
    let user = app.token("ulrik").await;
    let admin = staff_token(&app, "adam", false).await;
    assert_eq!(app.get("/admin/cluster").await.status(), 401);
    assert_eq!(
        status_of(app.call(Method::GET, "/admin/cluster", &user)).await,
        403
    );
    let response = app
        .call(Method::GET, "/admin/cluster", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(json(response).await["error"]["code"], "not_citus");
    let response = app
        .call(Method::POST, "/admin/tenants/ulrik/move", &admin)
        .json(&serde_json::json!({"node": "127.0.0.1:5432"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    assert_eq!(
        status_of(
            app.call(Method::POST, "/admin/tenants/ulrik/move", &user)
                .json(&serde_json::json!({"node": "127.0.0.1:5432"}))
        )
        .await,
        403
    );
    for (method, path) in [
        (Method::POST, "/admin/cluster/rebalance"),
        (Method::GET, "/admin/cluster/rebalance/1"),
    ] {
        assert_eq!(status_of(app.call(method.clone(), path, &user)).await, 403);
        let response = app.call(method, path, &admin).send().await.unwrap();
        assert_eq!(response.status(), 409, "{path}");
        assert_eq!(json(response).await["error"]["code"], "not_citus");
    }
}
