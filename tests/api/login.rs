use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn login_with_the_right_password_returns_working_tokens() {
    let app = spawn_app().await;
    assert_eq!(app.register("erin").await.status(), 201);

    let response = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "Erin", "password": PASSWORD}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["username"], "erin");
    assert_eq!(body["schema"], "tenant_erin");
    assert!(body["refresh_token"].as_str().unwrap().len() >= 40);

    let me = app
        .api
        .get(format!("{}/api/me", app.address))
        .bearer_auth(body["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let me = json(me).await;
    assert_eq!(me["username"], "erin");
    assert_eq!(me["email"], "erin@example.com");
    assert_eq!(me["tenant"]["schema"], "tenant_erin");
    assert_eq!(me["tenant"]["template_version"], latest_version());
    assert!(me["last_login_at"].is_string());

    // Refresh tokens are stored only as hashes.
    let stored: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM tenantry.refresh_tokens WHERE token_hash = sha256(convert_to($1, 'UTF8'))",
            &[&body["refresh_token"].as_str().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn an_unknown_user_and_a_wrong_password_get_the_same_401() {
    let app = spawn_app().await;
    assert_eq!(app.register("frank").await.status(), 201);

    let wrong = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "frank", "password": "not the password at all"}),
        )
        .await;
    let unknown = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "nobody_here", "password": "not the password at all"}),
        )
        .await;
    let hostile = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "x'; DROP TABLE tenantry.users; --", "password": "p"}),
        )
        .await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert_eq!(hostile.status(), 401);
    let (wrong, unknown, hostile) = (json(wrong).await, json(unknown).await, json(hostile).await);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong, hostile);
    assert_eq!(wrong["error"]["code"], "invalid_credentials");
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test]
async fn a_password_that_only_matches_in_its_first_72_bytes_is_refused() {
    let app = spawn_app().await;
    let password = "p".repeat(72);
    let response = app
        .post_json(
            "/api/auth/register",
            &json!({"username": "grace", "email": "grace@example.com", "password": password}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let longer = format!("{password}extra");
    let response = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "grace", "password": longer}),
        )
        .await;
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn api_me_refuses_missing_forged_and_foreign_tokens() {
    let app = spawn_app().await;
    let url = format!("{}/api/me", app.address);
    let missing = app.api.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(json(missing).await["error"]["code"], "unauthorized");

    let garbage = app
        .api
        .get(&url)
        .bearer_auth("not-a-jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);

    let registered = json(app.register("heidi").await).await;
    let foreign = tenantry::auth::JwtKeys::new(b"some-other-secret-some-other-secret")
        .issue(&tenantry::auth::Subject {
            user_id: registered["user_id"].as_str().unwrap().parse().unwrap(),
            username: "heidi",
            schema: Some("tenant_heidi"),
            db_role: None,
            role: tenantry::auth::Role::Admin,
            generation: 0,
            session: None,
        })
        .unwrap();
    let forged = app.api.get(&url).bearer_auth(foreign).send().await.unwrap();
    assert_eq!(forged.status(), 401);

    let good = app
        .api
        .get(&url)
        .bearer_auth(registered["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
}
