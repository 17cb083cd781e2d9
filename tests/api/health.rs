use crate::helpers::*;

/// Break the database on purpose: refuse new connections and cut the
/// pool's existing ones. Returns the superuser connection that undoes it.
async fn cut_off(app: &TestApp) -> tokio_postgres::Client {
    let admin = connect("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            app.db_name
        ))
        .await
        .unwrap();
    // A session that was being opened as the database closed (the service
    // connects in the background too) is ended by a later pass.
    until("every session of the database ended", || async {
        admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
                &[&app.db_name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    admin
}

async fn reconnect(admin: &tokio_postgres::Client, app: &TestApp) {
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            app.db_name
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn health_is_200_when_the_database_answers() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["template_version"], latest_version());
}

#[tokio::test]
async fn health_is_503_when_the_database_is_unreachable() {
    let app = spawn_app().await;
    // Break the database on purpose: refuse new connections and cut the
    // pool's existing ones.
    let admin = cut_off(&app).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["error"]["code"], "unavailable");

    // And it recovers when the database comes back.
    reconnect(&admin, &app).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn an_unknown_route_gets_a_json_404() {
    let app = spawn_app().await;
    let response = app.get("/nope").await;
    assert_eq!(response.status(), 404);
    assert_eq!(json(response).await["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_wrong_method_gets_a_json_405() {
    let app = spawn_app().await;
    let response = app
        .api
        .delete(format!("{}/api/auth/register", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.headers().get("allow").unwrap().to_str().unwrap(),
        "POST"
    );
    assert_eq!(json(response).await["error"]["code"], "method_not_allowed");
    let response = app
        .api
        .put(format!("{}/api/experiences/1", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("allow").unwrap().to_str().unwrap(),
        "GET, HEAD, PATCH, DELETE"
    );
}

#[tokio::test]
async fn liveness_needs_no_database() {
    let app = spawn_app().await;
    let admin = cut_off(&app).await;
    let live = app.get("/health/live").await;
    assert_eq!(live.status(), 200);
    assert_eq!(json(live).await["status"], "alive");
    let head = app
        .api
        .head(format!("{}/health/live", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(app.get("/health").await.status(), 503);
    reconnect(&admin, &app).await;
}

#[tokio::test]
async fn health_is_degraded_with_its_reasons() {
    let app = spawn_app().await;
    assert_eq!(app.register("hanna").await.status(), 201);
    let body = json(app.get("/health").await).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["reasons"].as_array().unwrap().len(), 0);

    let db = app.db().await;
    db.batch_execute(
        "UPDATE tenantry.tenants SET template_version = 3;
         INSERT INTO tenantry.fleet_runs (started_by, target_version, concurrency, canary, planned, status, failed)
         VALUES ('test', 4, 1, 0, 1, 'failed', 1);",
    )
    .await
    .unwrap();
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200, "degraded still serves");
    let body = json(response).await;
    assert_eq!(body["status"], "degraded");
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains(&format!(
            "1 tenant(s) behind template version {}",
            latest_version()
        )),
        "{reasons}"
    );
    assert!(
        reasons.contains("the last fleet run ended failed"),
        "{reasons}"
    );
    assert_eq!(body["tenants_pending_migration"], 1);
}

#[tokio::test]
async fn health_reports_a_saturated_pool() {
    let app = spawn_app_with(|s| s.pool_size = 2).await;
    let signup = json(app.register("sven").await).await;
    let token = signup["access_token"].as_str().unwrap().to_owned();
    // Hold the tenant's lock from the test: its requests queue on it, each
    // holding a pooled connection, and one more waits for a connection.
    let db = app.db().await;
    db.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock(1953395828, hashtext('{}'))",
        signup["user_id"].as_str().unwrap()
    ))
    .await
    .unwrap();
    let blocked = futures::future::join_all((0..3).map(|_| {
        app.call(reqwest::Method::GET, "/api/experiences", &token)
            .send()
    }));
    let probe = async {
        let mut body = serde_json::Value::Null;
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            body = json(app.get("/health").await).await;
            if body["status"] == "degraded" {
                break;
            }
        }
        db.batch_execute("COMMIT").await.unwrap();
        body
    };
    let (responses, body) = futures::join!(blocked, probe);
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(body["reasons"].to_string().contains("saturated"), "{body}");
    assert!(responses.into_iter().all(|r| r.unwrap().status() == 200));
}

#[tokio::test]
async fn json_errors_do_not_name_internal_types() {
    let app = spawn_app().await;
    let response = app
        .post_json("/api/auth/register", &serde_json::json!("a string"))
        .await;
    assert_eq!(response.status(), 400);
    let message = json(response).await["error"]["message"].to_string();
    assert!(!message.contains("RegisterRequest"), "{message}");
    assert!(message.contains("a JSON object"), "{message}");
}
