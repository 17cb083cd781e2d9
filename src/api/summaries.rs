//! `/api/summaries/quick` and `/api/summaries/profile`: one current text
//! each, every change kept as a revision.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::api::paging::{object, opt_text, text};
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, TenantTx};
use crate::startup::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryKind {
    Quick,
    Profile,
}

impl SummaryKind {
    fn as_str(self) -> &'static str {
        match self {
            SummaryKind::Quick => "quick",
            SummaryKind::Profile => "profile",
        }
    }

    fn max_content(self) -> usize {
        match self {
            SummaryKind::Quick => 2_000,
            SummaryKind::Profile => 50_000,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub kind: SummaryKind,
    pub headline: Option<String>,
    pub content: String,
    pub details: serde_json::Value,
    pub revision: i32,
    pub updated_at: DateTime<Utc>,
}

impl Summary {
    fn from_row(kind: SummaryKind, row: &Row) -> Summary {
        Summary {
            kind,
            headline: row.get("headline"),
            content: row.get("content"),
            details: row.get("details"),
            revision: row.get("revision"),
            updated_at: row.get("updated_at"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryInput {
    pub headline: Option<String>,
    pub content: String,
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

const COLUMNS: &str = "headline, content, details, revision, updated_at";

/// `GET /api/summaries/{kind}`: 404 until the first PUT.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn get(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    kind: web::Path<SummaryKind>,
) -> Result<HttpResponse, ApiError> {
    let kind = kind.into_inner();
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        "SELECT headline, content, details, revision, updated_at FROM summaries WHERE kind = $1",
        &[&kind.as_str()],
    )
    .await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::NotFound(format!("no {} summary yet", kind.as_str())))?;
    Ok(HttpResponse::Ok().json(Summary::from_row(kind, row)))
}

/// `PUT /api/summaries/{kind}`: replaces the text, bumps the revision and
/// keeps the new text as a revision, in one statement.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn put(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    kind: web::Path<SummaryKind>,
    body: web::Json<SummaryInput>,
) -> Result<HttpResponse, ApiError> {
    let kind = kind.into_inner();
    let input = body.into_inner();
    opt_text("headline", input.headline.as_deref(), 0, 300)?;
    text("content", &input.content, 0, kind.max_content())?;
    object("details", &input.details)?;
    let details = serde_json::Value::Object(input.details);
    let sql = format!(
        "WITH s AS (
             INSERT INTO summaries AS cur (kind, headline, content, details)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (kind) DO UPDATE
                 SET headline = EXCLUDED.headline, content = EXCLUDED.content,
                     details = EXCLUDED.details, revision = cur.revision + 1, updated_at = now()
             RETURNING kind, {COLUMNS}
         ), r AS (
             INSERT INTO summary_revisions (kind, revision, headline, content)
             SELECT kind, revision, headline, content FROM s
         )
         SELECT {COLUMNS} FROM s"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadWrite,
        &sql,
        &[&kind.as_str(), &input.headline, &input.content, &details],
    )
    .await?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::internal(std::io::Error::other("upsert returned no row")))?;
    Ok(HttpResponse::Ok().json(Summary::from_row(kind, row)))
}
