use crate::helpers::*;

#[tokio::test]
async fn health_is_200_when_the_database_answers() {
    let app = spawn_app().await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), 200);
    let body = json(response).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["template_version"], 4);
}

#[tokio::test]
async fn health_is_503_when_the_database_is_unreachable() {
    let app = spawn_app().await;
    // Break the database on purpose: refuse new connections and cut the
    // pool's existing ones.
    let admin = connect("postgres").await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';",
            db = app.db_name
        ))
        .await
        .unwrap();
    let response = app.get("/health").await;
    assert_eq!(response.status(), 503);
    let body = json(response).await;
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["error"]["code"], "unavailable");

    // And it recovers when the database comes back.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            app.db_name
        ))
        .await
        .unwrap();
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
    assert_eq!(json(response).await["error"]["code"], "method_not_allowed");
}
