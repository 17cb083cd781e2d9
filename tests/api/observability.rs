//! Metrics, request ids and the log format.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn metrics_are_prometheus_text_labelled_by_route_pattern() {
    let app = spawn_app().await;
    let token = app.token("mira").await;
    let created = json(
        app.call(Method::POST, "/api/experiences", &token)
            .json(&json!({"title": "Engineer", "started_on": "2020-01-01"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = created["id"].as_i64().unwrap();
    let path = format!("/api/experiences/{id}");
    assert_eq!(
        app.call(Method::GET, &path, &token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for expected in [
        "http_requests_total{method=\"GET\",route=\"/api/experiences/{id}\",status=\"200\"}",
        "http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/auth/register\",status=\"201\"",
        "tenantry_provisioning_duration_seconds_count",
        &format!("tenantry_tenants{{template_version=\"{}\"}}", latest_version()),
        "tenantry_tenants_pending_migration",
        "tenantry_pool_connections{state=\"max\"}",
        "tenantry_pool_waiting",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    // Never a raw path, a tenant or a user in a label.
    for line in text.lines().filter(|l| l.starts_with("http_")) {
        assert!(!line.contains(&path) && !line.contains("mira"), "{line}");
    }
}

#[tokio::test]
async fn metrics_want_their_token_when_one_is_set() {
    let app = spawn_app_with(|s| {
        s.metrics_token = Some(tenantry::configuration::SecretString::new(
            "metrics-token-0123456789".into(),
        ))
    })
    .await;
    assert_eq!(app.get("/metrics").await.status(), 401);
    let wrong = app
        .call(Method::GET, "/metrics", "not-the-token-000000")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = app
        .call(Method::GET, "/metrics", "metrics-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let id = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let a = app.get("/health").await;
    let b = app.get("/no/such/route").await;
    let (a, b) = (id(&a).unwrap(), id(&b).unwrap());
    assert_ne!(a, b);
    assert!(uuid::Uuid::parse_str(&a).is_ok());
    let echoed = app
        .api
        .get(format!("{}/health", app.address))
        .header("X-Request-Id", "lb-7f3a.42_x")
        .send()
        .await
        .unwrap();
    assert_eq!(id(&echoed).as_deref(), Some("lb-7f3a.42_x"));
    let replaced = app
        .api
        .get(format!("{}/health", app.address))
        .header("X-Request-Id", "no spaces or <tags> please")
        .send()
        .await
        .unwrap();
    let replaced = id(&replaced).unwrap();
    assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    // Also on refusals made before any handler runs.
    let limited = spawn_app_with(|s| s.limits.auth_per_minute = 1).await;
    limited
        .post_json("/api/auth/logout", &json!({"refresh_token": "x"}))
        .await;
    let r = limited
        .post_json("/api/auth/logout", &json!({"refresh_token": "x"}))
        .await;
    assert_eq!(r.status(), 429);
    assert!(id(&r).is_some());
}

#[tokio::test]
async fn logs_can_be_json_and_a_bad_format_is_a_usage_error() {
    let db = create_database().await;
    let mut env = cli_env(&db);
    env.push(("TENANTRY_LOG_FORMAT", "json".into()));
    env.push(("RUST_LOG", "info".into()));
    let out = tenantry(&["system", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<&str> = std::str::from_utf8(&out.stderr).unwrap().lines().collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("{line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let mut env = cli_env(&db);
    env.push(("TENANTRY_LOG_FORMAT", "xml".into()));
    let out = tenantry(&["system", "migrate"], &env, None).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("TENANTRY_LOG_FORMAT"));
}
