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
