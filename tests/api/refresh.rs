//! Refresh tokens: rotated on every use, consumed once, a replay revokes the
//! whole family, logout revokes it too.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn refresh(app: &TestApp, token: &str) -> (u16, Value) {
    let response = app
        .post_json("/api/auth/refresh", &json!({ "refresh_token": token }))
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn registered(app: &TestApp, name: &str) -> Value {
    let response = app.register(name).await;
    assert_eq!(response.status(), 201);
    json(response).await
}

#[tokio::test]
async fn a_refresh_token_is_rotated_and_its_replay_revokes_the_family() {
    let app = spawn_app().await;
    let first = registered(&app, "rita").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, pair) = refresh(&app, &first).await;
    assert_eq!(status, 200, "{pair}");
    let second = pair["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first, "rotated");
    let access = pair["access_token"].as_str().unwrap();
    let me = app
        .call(Method::GET, "/api/experiences", access)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200, "the new access token works");

    // The first token again: a replay. 401, and the family is gone, the
    // holder's current token with it.
    assert_eq!(refresh(&app, &first).await.0, 401);
    assert_eq!(refresh(&app, &second).await.0, 401);
    let live = app
        .count("SELECT count(*) FROM tenantry.refresh_tokens WHERE revoked_at IS NULL")
        .await;
    assert_eq!(live, 0);
}

#[tokio::test]
async fn two_racing_refreshes_of_one_token_give_exactly_one_new_pair() {
    let app = spawn_app().await;
    let token = registered(&app, "rafa").await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Hold the token's row so both refreshes are in flight at once.
    let mut holder = app.db().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM tenantry.refresh_tokens FOR UPDATE", &[])
        .await
        .unwrap();
    let spawn_refresh = |address: String, token: String| {
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{address}/api/auth/refresh"))
                .json(&json!({ "refresh_token": token }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let racing = spawn_refresh(app.address.clone(), token.clone());
    let other = spawn_refresh(app.address.clone(), token.clone());
    // Both are waiting on the row lock.
    let waiting = wait_for_lock_waiters(&app, 2).await;
    assert!(waiting, "both refreshes reached the token's row");
    tx.commit().await.unwrap();
    let mut statuses = vec![racing.await.unwrap(), other.await.unwrap()];
    statuses.sort();
    assert_eq!(statuses, [200, 401]);
}

async fn wait_for_lock_waiters(app: &TestApp, n: i64) -> bool {
    for _ in 0..200 {
        let waiting = app
            .count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%refresh_tokens SET used_at%'",
            )
            .await;
        if waiting >= n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn expired_unknown_and_logged_out_tokens_get_401() {
    let app = spawn_app().await;
    let tokens = registered(&app, "remy").await;
    let token = tokens["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(refresh(&app, "not-a-token").await.0, 401);
    assert_eq!(refresh(&app, &"x".repeat(10_000)).await.0, 401);
    let bad = app
        .post_json(
            "/api/auth/refresh",
            &json!({ "refresh_token": token, "extra": 1 }),
        )
        .await;
    assert_eq!(bad.status(), 400);

    // Logout revokes the family; logging out an unknown token looks the same.
    let out = app
        .post_json("/api/auth/logout", &json!({ "refresh_token": token }))
        .await;
    assert_eq!(out.status(), 204);
    let unknown = app
        .post_json("/api/auth/logout", &json!({ "refresh_token": "nope" }))
        .await;
    assert_eq!(unknown.status(), 204);
    assert_eq!(refresh(&app, &token).await.0, 401);

    // A fresh login's token, expired behind its back.
    let login = app
        .post_json(
            "/api/auth/login",
            &json!({ "username": "remy", "password": PASSWORD }),
        )
        .await;
    let fresh = json(login).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    app.db()
        .await
        .batch_execute(
            "UPDATE tenantry.refresh_tokens SET expires_at = now() - interval '1 second' WHERE revoked_at IS NULL",
        )
        .await
        .unwrap();
    assert_eq!(refresh(&app, &fresh).await.0, 401);
}

async fn with_agent(app: &TestApp, path: &str, agent: &str, body: &Value) -> Value {
    let response = app
        .api
        .post(format!("{}{path}", app.address))
        .header("User-Agent", agent)
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{path}");
    json(response).await
}

async fn sessions(app: &TestApp, access: &str) -> Vec<Value> {
    let response = app
        .call(Method::GET, "/api/auth/sessions", access)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    json(response).await["sessions"].as_array().unwrap().clone()
}

#[tokio::test]
async fn sessions_are_listed_and_can_be_ended_one_by_one_or_all_at_once() {
    let app = spawn_app().await;
    let phone = with_agent(
        &app,
        "/api/auth/register",
        "phone-app/1.0",
        &json!({"username": "sara", "email": "sara@example.com", "password": PASSWORD}),
    )
    .await;
    let laptop = with_agent(
        &app,
        "/api/auth/login",
        "laptop-browser",
        &json!({"username": "sara", "password": PASSWORD}),
    )
    .await;
    let access = laptop["access_token"].as_str().unwrap().to_owned();
    let listed = sessions(&app, &access).await;
    let agents: Vec<&str> = listed
        .iter()
        .map(|s| s["user_agent"].as_str().unwrap())
        .collect();
    assert_eq!(
        agents,
        ["laptop-browser", "phone-app/1.0"],
        "most recent first"
    );

    // A refresh keeps the session (same family).
    let (status, rotated) = refresh(&app, phone["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(sessions(&app, &access).await.len(), 2);

    // End the phone's session: its token stops working; ending it again,
    // or a session of someone else, is 404.
    let phone_id = listed[1]["id"].as_str().unwrap().to_owned();
    let end = |id: String, token: String| {
        let request = app.call(Method::DELETE, &format!("/api/auth/sessions/{id}"), &token);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(end(phone_id.clone(), access.clone()).await, 204);
    assert_eq!(
        refresh(&app, rotated["refresh_token"].as_str().unwrap())
            .await
            .0,
        401
    );
    assert_eq!(end(phone_id.clone(), access.clone()).await, 404);
    let other = registered(&app, "otto").await;
    let laptop_id = sessions(&app, &access).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        end(
            laptop_id,
            other["access_token"].as_str().unwrap().to_owned()
        )
        .await,
        404,
        "another user's session"
    );
    assert_eq!(sessions(&app, &access).await.len(), 1);

    // Revoke all: every refresh token of the user is dead, others' live.
    let all = app
        .call(Method::POST, "/api/auth/revoke-all", &access)
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), 204);
    // Its own access token ends too, at the very next request.
    let old = app
        .call(Method::GET, "/api/auth/sessions", &access)
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 401);
    let again = with_agent(
        &app,
        "/api/auth/login",
        "laptop-browser",
        &json!({"username": "sara", "password": PASSWORD}),
    )
    .await;
    let fresh = again["access_token"].as_str().unwrap();
    assert_eq!(sessions(&app, fresh).await.len(), 1, "only the new one");
    assert_eq!(
        refresh(&app, laptop["refresh_token"].as_str().unwrap())
            .await
            .0,
        401
    );
    assert_eq!(
        refresh(&app, other["refresh_token"].as_str().unwrap())
            .await
            .0,
        200
    );
    let anonymous = app
        .api
        .get(format!("{}/api/auth/sessions", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}
