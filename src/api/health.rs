use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

/// 200 when the database answers, 503 when it does not.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    if crate::db::ping(&state.pool).await {
        HttpResponse::Ok().json(json!({
            "status": "healthy",
            "database": "up",
            "version": env!("CARGO_PKG_VERSION"),
            "template_version": state.templates.latest().get(),
        }))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(json!({
                "status": "unhealthy",
                "database": "unreachable",
                "error": { "code": "unavailable", "message": "the database is unreachable" },
            }))
    }
}
