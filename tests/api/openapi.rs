//! `GET /openapi.json`: the API as its clients see it, and the fixes the
//! fuzzer (scripts/fuzz-api) led to.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn document(app: &TestApp) -> Value {
    let response = app.get("/openapi.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    json(response).await
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Every (path, method) the document lists.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((path.clone(), method.to_owned(), op.clone()));
            }
        }
    }
    out
}

/// `{id}`-style parameters filled with something of the right shape.
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{run_id}", "1")
        .replace("{name}", "nobody")
        .replace("{table}", "skills")
}

#[tokio::test]
async fn the_document_describes_every_route_the_service_answers_and_only_those() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let ops = operations(&doc);
    // What DESIGN.md and the README promise, at least.
    for (path, method) in [
        ("/api/auth/register", "post"),
        ("/api/auth/login", "post"),
        ("/api/experiences", "get"),
        ("/api/experiences/{id}", "patch"),
        ("/api/summaries/quick", "put"),
        ("/api/reference/{table}", "get"),
        ("/api/me/export", "get"),
        ("/api/me", "delete"),
        ("/admin/fleet/migrations", "post"),
        ("/admin/audit", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            ops.iter().any(|(p, m, _)| p == path && m == method),
            "{method} {path} is not documented"
        );
    }
    for (path, method, _) in &ops {
        // Documented means routed: never the catch-all 404 or a 405.
        let response = app
            .api
            .request(
                method.to_uppercase().parse().unwrap(),
                format!("{}{}", app.address, concrete(path)),
            )
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !(status == 404 && body.contains("no such route")),
            "{method} {path} is documented but not routed"
        );
    }
    // A method a path does not document gets 405, and `Allow` lists
    // exactly the documented methods (and HEAD where GET).
    for (path, item) in doc["paths"].as_object().unwrap() {
        let mut documented: Vec<String> = METHODS
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_uppercase())
            .collect();
        if documented.contains(&"GET".to_string()) {
            documented.push("HEAD".into());
        }
        let other = ["PUT", "PATCH", "DELETE", "POST"]
            .into_iter()
            .find(|m| !documented.iter().any(|d| d == m))
            .unwrap();
        let response = app
            .api
            .request(
                other.parse().unwrap(),
                format!("{}{}", app.address, concrete(path)),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{other} {path}");
        let mut allow: Vec<String> = response.headers()["allow"]
            .to_str()
            .unwrap()
            .split(", ")
            .map(str::to_owned)
            .collect();
        allow.sort();
        documented.sort();
        assert_eq!(allow, documented, "Allow of {path}");
        assert_eq!(json(response).await["error"]["code"], "method_not_allowed");
    }
    assert_eq!(app.get("/nowhere").await.status(), 404);
}

#[tokio::test]
async fn every_operation_documents_its_security_and_the_error_shape() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    let error = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], json!(["error"]));
    let public = [
        "/api/auth/register",
        "/api/auth/login",
        "/api/auth/refresh",
        "/api/auth/logout",
        "/api/auth/verify-email",
        "/api/auth/forgot-password",
        "/api/auth/reset-password",
    ];
    for (path, method, op) in operations(&doc) {
        let bearer = op["security"]
            .as_array()
            .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
        // The admin console's files are public; what they call is not.
        let console = path.starts_with("/admin/ui");
        let needs_token = (path.starts_with("/api/") && !public.contains(&path.as_str()))
            || (path.starts_with("/admin/") && !console);
        assert_eq!(bearer, needs_token, "security of {method} {path}");
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path} documents no success"
        );
        assert_eq!(
            responses["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{method} {path}"
        );
        if needs_token {
            assert!(responses.contains_key("401"), "{method} {path}");
        }
        // The answers to a token of the wrong role, as the routes give them.
        if path.starts_with("/admin/") && !console {
            assert!(responses.contains_key("403"), "{method} {path}");
        }
    }
}

#[tokio::test]
async fn documented_responses_are_what_the_service_sends() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let schemas = &doc["components"]["schemas"];
    let response = app.register("olga").await;
    assert_eq!(response.status(), 201);
    let body = json(response).await;
    // Exactly the documented fields, every required one present.
    let registered = &schemas["Registered"];
    let documented: Vec<&String> = registered["properties"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    let sent: Vec<&String> = body.as_object().unwrap().keys().collect();
    let mut a = documented.clone();
    let mut b = sent.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for field in registered["required"].as_array().unwrap() {
        assert!(!body[field.as_str().unwrap()].is_null(), "{field}");
    }
    let token = body["access_token"].as_str().unwrap();
    let me = json(
        app.call(Method::GET, "/api/me", token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let profile = schemas["Profile"]["properties"].as_object().unwrap();
    for key in me.as_object().unwrap().keys() {
        assert!(
            profile.contains_key(key),
            "/api/me sends undocumented {key}"
        );
    }
}

#[tokio::test]
async fn a_json_array_is_not_an_object_even_when_every_field_is_optional() {
    let app = spawn_app().await;
    let t = app.token("arturo").await;
    for body in ["[null, null]", "[]", "0", "\"title\"", "null"] {
        let response = app
            .call(Method::POST, "/api/conversations", &t)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(json(response).await["error"]["code"], "invalid_json");
    }
    let listed = json(
        app.call(Method::GET, "/api/conversations", &t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["items"], json!([]), "nothing was created");
    // An object still works.
    let response = app
        .call(Method::POST, "/api/conversations", &t)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test]
async fn stored_json_numbers_come_back_as_sent_and_unreadable_ones_are_refused() {
    let app = spawn_app().await;
    let t = app.token("nadia").await;
    // PostgreSQL keeps jsonb numbers as exact decimals and writes them out
    // in full: within ±1e15 (and no nearer 0 than 1e-15) that is at most 34
    // characters, and they come back as sent.
    let body = r#"{"content": "x", "details": {"edge": -1e15, "tiny": -2.7724099487452302e-15, "big": 123456789012345.5, "nested": [{"n": 0.1}]}}"#;
    let response = app
        .call(Method::PUT, "/api/summaries/quick", &t)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = json(
        app.call(Method::GET, "/api/summaries/quick", &t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let details = &got["details"];
    assert_eq!(details["edge"].as_f64(), Some(-1e15));
    assert_eq!(details["tiny"].as_f64(), Some(-2.7724099487452302e-15));
    assert_eq!(details["big"].as_f64(), Some(123456789012345.5));
    assert_eq!(details["nested"][0]["n"].as_f64(), Some(0.1));

    // Beyond, PostgreSQL would write out up to 309 digits on every read
    // (more than common parsers, serde_json among them, read back near the
    // largest double): refused up front, nothing stored.
    for (path, body) in [
        (
            "/api/summaries/quick".to_string(),
            r#"{"content": "y", "details": {"max": -1.7976931348623157e308}}"#,
        ),
        (
            "/api/summaries/quick".to_string(),
            r#"{"content": "y", "details": {"edge": -1e300, "tiny": -2.7724099487452302e-270}}"#,
        ),
        (
            "/api/summaries/profile".to_string(),
            r#"{"content": "y", "details": {"deep": [[{"max": 1e301}]]}}"#,
        ),
    ] {
        let response = app
            .call(Method::PUT, &path, &t)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        assert_eq!(json(response).await["error"]["code"], "invalid_details");
    }
    let after = json(
        app.call(Method::GET, "/api/summaries/quick", &t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(after["content"], "x");
    assert_eq!(
        app.call(Method::GET, "/api/summaries/profile", &t)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let conversation = json(
        app.call(Method::POST, "/api/conversations", &t)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let path = format!("/api/conversations/{}/messages", conversation["id"]);
    for (n, status) in [
        ("1e15", 201),
        ("1e300", 400),
        ("1.7976931348623157e308", 400),
    ] {
        let response = app
            .call(Method::POST, &path, &t)
            .header("content-type", "application/json")
            .body(format!(r#"{{"content": "hi", "metadata": {{"n": {n}}}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{n}");
    }
    let messages = json(app.call(Method::GET, &path, &t).send().await.unwrap()).await;
    assert_eq!(messages["items"].as_array().unwrap().len(), 1);
    assert_eq!(messages["items"][0]["metadata"]["n"].as_f64(), Some(1e15));
}

#[tokio::test]
async fn an_empty_cursor_is_the_first_page() {
    let app = spawn_app().await;
    let t = app.token("petra").await;
    for title in ["one", "two"] {
        let response = app
            .call(Method::POST, "/api/conversations", &t)
            .json(&json!({ "title": title }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let first = json(
        app.call(Method::GET, "/api/conversations?limit=1", &t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let empty = json(
        app.call(Method::GET, "/api/conversations?limit=1&cursor=", &t)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first, empty);
    assert_eq!(first["items"][0]["title"], "two");
    // Search on a list that has none is refused, not ignored.
    let response = app
        .call(Method::GET, "/api/conversations?q=two", &t)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}
