//! Revocation is immediate: after revoke-all, a logout or a session ended,
//! the access tokens it covers get 401 on their very next request, on the
//! tenant data routes (the guard's entry statement) and on the others (the
//! registry check of `CurrentUser`), while other sessions go on.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn status(app: &TestApp, method: Method, path: &str, token: &str) -> u16 {
    app.call(method, path, token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Signed up (first session) and signed in again (second session).
async fn two_sessions(app: &TestApp, name: &str) -> (Value, Value) {
    let first = json(app.register(name).await).await;
    let second = json(
        app.post_json(
            "/api/auth/login",
            &json!({"username": name, "password": PASSWORD}),
        )
        .await,
    )
    .await;
    (first, second)
}

fn access(tokens: &Value) -> &str {
    tokens["access_token"].as_str().unwrap()
}

#[tokio::test]
async fn after_revoke_all_every_access_token_of_the_user_gets_401_at_once() {
    let app = spawn_app().await;
    let (first, second) = two_sessions(&app, "rosa").await;
    let other = app.token("saul").await;
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", access(&first)).await,
        200
    );
    assert_eq!(
        status(&app, Method::POST, "/api/auth/revoke-all", access(&second)).await,
        204
    );
    for tokens in [&first, &second] {
        assert_eq!(
            status(&app, Method::GET, "/api/experiences", access(tokens)).await,
            401
        );
        assert_eq!(
            status(&app, Method::GET, "/api/me", access(tokens)).await,
            401
        );
    }
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", &other).await,
        200
    );
}

#[tokio::test]
async fn after_logout_that_sessions_access_tokens_get_401_at_once() {
    let app = spawn_app().await;
    let (first, second) = two_sessions(&app, "tess").await;
    let logout = app
        .post_json(
            "/api/auth/logout",
            &json!({"refresh_token": first["refresh_token"]}),
        )
        .await;
    assert_eq!(logout.status(), 204);
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", access(&first)).await,
        401
    );
    assert_eq!(
        status(&app, Method::GET, "/api/me", access(&first)).await,
        401
    );
    // The other session goes on.
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", access(&second)).await,
        200
    );
    assert_eq!(
        status(&app, Method::GET, "/api/me", access(&second)).await,
        200
    );
}

#[tokio::test]
async fn an_ended_sessions_access_tokens_get_401_at_once() {
    let app = spawn_app().await;
    let (first, second) = two_sessions(&app, "ugo").await;
    let listed = json(
        app.call(Method::GET, "/api/auth/sessions", access(&second))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let ended = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] != true)
        .expect("the first session")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/auth/sessions/{ended}");
    assert_eq!(
        status(&app, Method::DELETE, &path, access(&second)).await,
        204
    );
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", access(&first)).await,
        401
    );
    assert_eq!(
        status(&app, Method::GET, "/api/me", access(&first)).await,
        401
    );
    assert_eq!(
        status(&app, Method::GET, "/api/experiences", access(&second)).await,
        200
    );
}
