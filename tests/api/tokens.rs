//! Access tokens: only an HS256 token of ours, of type `access`, unexpired,
//! for this issuer and audience, opens a route.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::Method;
use tenantry::auth::Claims;

use crate::helpers::*;

fn sign(claims: &Claims, algorithm: Algorithm, secret: &[u8]) -> String {
    encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn forged_altered_and_foreign_tokens_get_401() {
    let app = spawn_app().await;
    let registered = json(app.register("tess").await).await;
    let good = registered["access_token"].as_str().unwrap().to_owned();
    let refresh_token = registered["refresh_token"].as_str().unwrap().to_owned();
    let claims = tenantry::auth::JwtKeys::new(JWT_SECRET.as_bytes())
        .verify(&good)
        .expect("our own token verifies");
    let now = chrono::Utc::now().timestamp();
    let secret = JWT_SECRET.as_bytes();

    let with = |change: &dyn Fn(&mut Claims)| {
        let mut c = claims.clone();
        change(&mut c);
        c
    };
    let unsigned = {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        format!("{header}.{payload}.")
    };
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let payload = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&with(&|c| c.role = tenantry::auth::Role::Admin)).unwrap());
        parts[1] = payload;
        parts.join(".")
    };
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned),
        (
            "HS512 with the right key",
            sign(&claims, Algorithm::HS512, secret),
        ),
        (
            "wrong key",
            sign(
                &claims,
                Algorithm::HS256,
                b"another-secret-another-secret-0000",
            ),
        ),
        ("tampered payload", tampered),
        (
            "wrong audience",
            sign(
                &with(&|c| c.aud = "someone-else".into()),
                Algorithm::HS256,
                secret,
            ),
        ),
        (
            "wrong issuer",
            sign(
                &with(&|c| c.iss = "someone-else".into()),
                Algorithm::HS256,
                secret,
            ),
        ),
        (
            "expired",
            sign(&with(&|c| c.exp = now - 60), Algorithm::HS256, secret),
        ),
        (
            "another token type",
            sign(
                &with(&|c| c.typ = "refresh".into()),
                Algorithm::HS256,
                secret,
            ),
        ),
        ("a refresh token", refresh_token),
    ];
    for (what, token) in cases {
        for path in ["/api/me", "/api/experiences"] {
            let response = app.call(Method::GET, path, &token).send().await.unwrap();
            assert_eq!(response.status(), 401, "{what} on {path}");
        }
    }
    // The real one, with the scheme in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = app
            .api
            .get(format!("{}/api/experiences", app.address))
            .header("Authorization", format!("{scheme} {good}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scheme}");
    }
    let basic = app
        .api
        .get(format!("{}/api/me", app.address))
        .header("Authorization", format!("Basic {good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
}

/// Rotating the signing key (`JWT_SECRET` new, `JWT_PREVIOUS_SECRET` the
/// old one) logs nobody out: tokens signed before keep working until they
/// expire, new ones carry the new key's `kid`; once the previous secret is
/// dropped, only its tokens end.
#[tokio::test]
async fn rotating_the_signing_key_logs_nobody_out() {
    const NEW_SECRET: &str = "the-next-secret-the-next-secret-0123456789";
    let before = spawn_app().await;
    let old_token = before.token("rhea").await;
    let me = |app: &TestApp, token: &str| app.call(reqwest::Method::GET, "/api/me", token).send();
    assert_eq!(me(&before, &old_token).await.unwrap().status(), 200);

    let mut rotated = test_settings(&before.db_name);
    rotated.jwt_secret = Some(tenantry::configuration::SecretString::new(
        NEW_SECRET.into(),
    ));
    rotated.jwt_previous_secret = Some(tenantry::configuration::SecretString::new(
        JWT_SECRET.into(),
    ));
    let after = spawn_app_on(rotated, before.db_name.clone()).await;
    assert_eq!(me(&after, &old_token).await.unwrap().status(), 200);
    let new_token = after.access_token("rhea").await;
    let kid = |token: &str| jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    assert_ne!(kid(&new_token), kid(&old_token));
    assert_eq!(me(&after, &new_token).await.unwrap().status(), 200);

    let mut settled = test_settings(&before.db_name);
    settled.jwt_secret = Some(tenantry::configuration::SecretString::new(
        NEW_SECRET.into(),
    ));
    let later = spawn_app_on(settled, before.db_name.clone()).await;
    assert_eq!(me(&later, &old_token).await.unwrap().status(), 401);
    assert_eq!(me(&later, &new_token).await.unwrap().status(), 200);
}

#[test]
fn a_previous_secret_like_the_current_one_or_short_is_refused() {
    let settings = |previous: &str| {
        tenantry::configuration::Settings::from_lookup(|k| match k {
            "JWT_SECRET" => Some(JWT_SECRET.into()),
            "JWT_PREVIOUS_SECRET" => Some(previous.into()),
            _ => None,
        })
    };
    let same = settings(JWT_SECRET).unwrap_err().to_string();
    assert!(same.contains("same as JWT_SECRET"), "{same}");
    let short = settings("short").unwrap_err().to_string();
    assert!(short.contains("at least 32 bytes"), "{short}");
    assert!(settings("an-older-secret-an-older-secret-0123456789").is_ok());
}

/// A rolling rotation over two running processes, as docs/configuration.md
/// says: first every process accepts the new secret (as its previous one)
/// while still signing with the old, then every process signs with the new
/// and accepts the old. At every step a token from either process works on
/// both.
#[tokio::test]
async fn a_rolling_rotation_over_two_processes_never_refuses_a_token() {
    const NEW_SECRET: &str = "the-next-secret-the-next-secret-0123456789";
    let secret = |s: &str| Some(tenantry::configuration::SecretString::new(s.into()));
    let first = spawn_app().await;
    let db = first.db_name.clone();
    let with = |current: &str, previous: Option<&str>| {
        let mut settings = test_settings(&db);
        settings.jwt_secret = secret(current);
        settings.jwt_previous_secret = previous.and_then(secret);
        settings
    };
    first.token("ines").await;
    let me = |app: &TestApp, token: &str| {
        let request = app.call(reqwest::Method::GET, "/api/me", token);
        async move { request.send().await.unwrap().status() }
    };
    let both_accept_each_others = |a: TestApp, b: TestApp| async move {
        let from_a = a.access_token("ines").await;
        let from_b = b.access_token("ines").await;
        for app in [&a, &b] {
            for token in [&from_a, &from_b] {
                assert_eq!(me(app, token).await, 200);
            }
        }
    };
    // Step 1: one process restarted accepting the new secret, signing with
    // the old; the other not yet restarted.
    let step1 = spawn_app_on(with(JWT_SECRET, Some(NEW_SECRET)), db.clone()).await;
    both_accept_each_others(first, step1).await;
    // Both at step 1, then one at step 2.
    let a = spawn_app_on(with(JWT_SECRET, Some(NEW_SECRET)), db.clone()).await;
    let b = spawn_app_on(with(NEW_SECRET, Some(JWT_SECRET)), db.clone()).await;
    both_accept_each_others(a, b).await;
    // Both at step 2.
    let a = spawn_app_on(with(NEW_SECRET, Some(JWT_SECRET)), db.clone()).await;
    let b = spawn_app_on(with(NEW_SECRET, Some(JWT_SECRET)), db.clone()).await;
    both_accept_each_others(a, b).await;
}
