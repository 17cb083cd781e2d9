//! `/api/summaries/quick` and `/api/summaries/profile`: one current text
//! each, every change kept as a revision.

use actix_web::{get, put, web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::api::extract::JsonBody;
use crate::api::paging::{object, opt_text, text};
use crate::api::AppState;
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, TenantTx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
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

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub kind: SummaryKind,
    pub headline: Option<String>,
    pub content: String,
    /// As stored (numbers exactly as PostgreSQL keeps them).
    #[schema(value_type = Object)]
    pub details: Box<serde_json::value::RawValue>,
    pub revision: i32,
    pub updated_at: DateTime<Utc>,
}

impl Summary {
    fn from_row(kind: SummaryKind, row: &Row) -> Summary {
        Summary {
            kind,
            headline: row.get("headline"),
            content: row.get("content"),
            details: row
                .get::<_, tokio_postgres::types::Json<Box<serde_json::value::RawValue>>>("details")
                .0,
            revision: row.get("revision"),
            updated_at: row.get("updated_at"),
        }
    }
}

/// The quick summary's new text.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuickSummaryInput {
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    pub headline: Option<String>,
    #[schema(max_length = 2000, pattern = "^[^\\u0000]*$")]
    pub content: String,
    /// Up to 16 kB of JSON, no NUL characters; every number 0 or between
    /// 1e-15 and 1e15 in magnitude.
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The profile summary's new text.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileSummaryInput {
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    pub headline: Option<String>,
    #[schema(max_length = 50000, pattern = "^[^\\u0000]*$")]
    pub content: String,
    /// Up to 16 kB of JSON, no NUL characters; every number 0 or between
    /// 1e-15 and 1e15 in magnitude.
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A summary's new text, of either kind.
pub(crate) struct SummaryInput {
    pub headline: Option<String>,
    pub content: String,
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl SummaryInput {
    /// Also what an import holds each summary (and revision) row to.
    pub(crate) fn validate(&self, kind: SummaryKind) -> Result<(), ApiError> {
        opt_text("headline", self.headline.as_deref(), 0, 300)?;
        text("content", &self.content, 0, kind.max_content())?;
        object("details", &self.details)
    }
}

impl From<QuickSummaryInput> for SummaryInput {
    fn from(i: QuickSummaryInput) -> SummaryInput {
        SummaryInput {
            headline: i.headline,
            content: i.content,
            details: i.details,
        }
    }
}

impl From<ProfileSummaryInput> for SummaryInput {
    fn from(i: ProfileSummaryInput) -> SummaryInput {
        SummaryInput {
            headline: i.headline,
            content: i.content,
            details: i.details,
        }
    }
}

const COLUMNS: &str = "headline, content, details, revision, updated_at";

/// `GET /api/summaries/quick`: 404 until the first PUT.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The quick summary", body = Summary),
        (status = 404, description = "None yet", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/summaries/quick")]
pub async fn get_quick(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    read(&state, user, SummaryKind::Quick).await
}

/// `GET /api/summaries/profile`: 404 until the first PUT.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile summary", body = Summary),
        (status = 404, description = "None yet", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/summaries/profile")]
pub async fn get_profile(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
) -> Result<HttpResponse, ApiError> {
    read(&state, user, SummaryKind::Profile).await
}

/// `PUT /api/summaries/quick` (content at most 2,000 characters).
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    request_body = QuickSummaryInput,
    responses(
        (status = 200, description = "The new revision", body = Summary),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
    )
)]
#[put("/api/summaries/quick")]
pub async fn put_quick(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    body: JsonBody<QuickSummaryInput>,
) -> Result<HttpResponse, ApiError> {
    write(&state, user, SummaryKind::Quick, body.into_inner().into()).await
}

/// `PUT /api/summaries/profile` (content at most 50,000 characters).
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    request_body = ProfileSummaryInput,
    responses(
        (status = 200, description = "The new revision", body = Summary),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
    )
)]
#[put("/api/summaries/profile")]
pub async fn put_profile(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    body: JsonBody<ProfileSummaryInput>,
) -> Result<HttpResponse, ApiError> {
    write(&state, user, SummaryKind::Profile, body.into_inner().into()).await
}

/// A summary: 404 until the first PUT.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
async fn read(
    state: &AppState,
    user: AuthenticatedUser,
    kind: SummaryKind,
) -> Result<HttpResponse, ApiError> {
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

/// Replace a summary's text, bump its revision and keep the new text as a
/// revision, in one statement.
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
async fn write(
    state: &AppState,
    user: AuthenticatedUser,
    kind: SummaryKind,
    input: SummaryInput,
) -> Result<HttpResponse, ApiError> {
    input.validate(kind)?;
    let details = serde_json::Value::Object(input.details);
    let sql = format!(
        "WITH s AS (
             INSERT INTO summaries AS cur (kind, headline, content, details, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (kind) DO UPDATE
                 SET headline = EXCLUDED.headline, content = EXCLUDED.content,
                     details = EXCLUDED.details, revision = cur.revision + 1,
                     -- Not now(): Citus allows only immutable functions here.
                     updated_at = EXCLUDED.updated_at
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
