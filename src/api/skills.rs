//! `/api/skills`: the tenant's skills, each with its progression (every
//! level it was recorded at, oldest first).

use actix_web::{get, post, web, HttpResponse};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::api::extract::JsonBody;
use crate::api::paging::{cursor_part, invalid, make_cursor, opt_text, text, ListQuery, Page};
use crate::api::AppState;
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, TenantTx};

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub level: i16,
    pub note: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Skill {
    pub id: i64,
    pub name: String,
    pub catalog_skill_id: Option<i32>,
    pub category: Option<String>,
    pub level: i16,
    pub years_experience: Option<f64>,
    pub last_used_on: Option<NaiveDate>,
    pub progression: Vec<Progress>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// PostgreSQL's `lower(name)`, the list's sort key (Rust's lower-casing
    /// may differ from the database's for some letters).
    #[serde(skip)]
    sort_key: String,
}

impl Skill {
    fn from_row(row: &Row) -> Result<Skill, ApiError> {
        let progression: serde_json::Value = row.get("progression");
        Ok(Skill {
            id: row.get("id"),
            name: row.get("name"),
            catalog_skill_id: row.get("catalog_skill_id"),
            category: row.get("category"),
            level: row.get("level"),
            years_experience: row.get("years_experience"),
            last_used_on: row.get("last_used_on"),
            progression: serde_json::from_value(progression).map_err(ApiError::internal)?,
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            sort_key: row.get("sort_key"),
        })
    }
}

/// The columns of `s` (a skills row) with its progression.
const COLUMNS: &str = "s.id, s.name, s.catalog_skill_id, s.category, s.level,
     s.years_experience::float8 AS years_experience, s.last_used_on, s.created_at, s.updated_at,
     lower(s.name) AS sort_key,
     COALESCE((SELECT jsonb_agg(jsonb_build_object('level', p.level, 'note', p.note,
                                                   'recorded_at', p.recorded_at)
                                ORDER BY p.recorded_at, p.id)
               FROM skill_progress p WHERE p.skill_id = s.id), '[]'::jsonb) AS progression";

/// A skill to record. Posting a name that exists (case-insensitively)
/// records a new level for it: its progression grows by one entry.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkillInput {
    #[schema(max_length = 200, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    pub name: String,
    /// A `reference.skills` id, if the skill is in the catalog.
    pub catalog_skill_id: Option<i32>,
    #[schema(max_length = 200, pattern = "^[^\\u0000]*$")]
    pub category: Option<String>,
    /// 1 (beginner) to 5 (expert).
    #[schema(minimum = 1, maximum = 5)]
    pub level: i16,
    #[schema(minimum = 0, maximum = 80)]
    pub years_experience: Option<f64>,
    pub last_used_on: Option<NaiveDate>,
    /// Kept with this level in the progression.
    #[schema(max_length = 2000, pattern = "^[^\\u0000]*$")]
    pub note: Option<String>,
}

impl SkillInput {
    /// Also what an import holds each skill row to.
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        text("name", &self.name, 1, 200)?;
        opt_text("category", self.category.as_deref(), 0, 200)?;
        note(self.note.as_deref())?;
        level(self.level)?;
        if let Some(years) = self.years_experience {
            if !(0.0..=80.0).contains(&years) || !years.is_finite() {
                return Err(invalid("years_experience", "must be between 0 and 80"));
            }
        }
        Ok(())
    }
}

/// A level as recorded in a skill's progression (an import's
/// `skill_progress` rows too).
pub(crate) fn level(level: i16) -> Result<(), ApiError> {
    if !(1..=5).contains(&level) {
        return Err(invalid("level", "must be between 1 and 5"));
    }
    Ok(())
}

/// A note kept with a level in the progression.
pub(crate) fn note(note: Option<&str>) -> Result<(), ApiError> {
    opt_text("note", note, 0, 2000)
}

/// `GET /api/skills`: by name.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of skills by name (`q` filters by name)", body = Page<Skill>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/skills")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn list(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit()?;
    let search = query.search()?;
    let (name, id): (Option<String>, Option<i64>) = match query.cursor("s", 2)? {
        Some(parts) => (Some(cursor_part(&parts[0])?), Some(cursor_part(&parts[1])?)),
        None => (None, None),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM skills s
         WHERE ($1::text IS NULL OR (lower(s.name), s.id) > ($1::text, $2::int8))
           AND ($3::text IS NULL OR strpos(lower(s.name), lower($3::text)) > 0)
         ORDER BY lower(s.name), s.id LIMIT $4"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        &sql,
        &[&name, &id, &search, &(limit + 1)],
    )
    .await?;
    let items = rows
        .iter()
        .map(Skill::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page::from_rows(items, limit, |s| {
        make_cursor("s", &[s.sort_key.clone(), s.id.to_string()])
    });
    Ok(HttpResponse::Ok().json(page))
}

/// `POST /api/skills` → 201 for a new skill, 200 when a known one got a new
/// level; either way with its whole progression.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    request_body = SkillInput,
    responses(
        (status = 201, description = "A new skill", body = Skill),
        (status = 200, description = "A known skill with a new level", body = Skill),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/skills")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn record(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    body: JsonBody<SkillInput>,
) -> Result<HttpResponse, ApiError> {
    let input = body.into_inner();
    input.validate()?;
    let tx = TenantTx::begin(&state.pool, user.caller(), Access::ReadWrite).await?;
    if let Some(catalog_id) = input.catalog_skill_id {
        // The shared catalog, always schema-qualified: the tenant has a
        // `skills` table of its own.
        let known = tx
            .query_opt(
                "SELECT 1 FROM reference.skills WHERE id = $1",
                &[&catalog_id],
            )
            .await?;
        if known.is_none() {
            tx.rollback().await?;
            return Err(invalid("catalog_skill_id", "is not in the skills catalog"));
        }
    }
    let upsert = tx
        .query_opt(
            "WITH s AS (
                 INSERT INTO skills AS cur (name, catalog_skill_id, category, level, years_experience, last_used_on, updated_at)
                 VALUES ($1, $2, $3, $4, $5::float8, $6, now())
                 ON CONFLICT ((lower(name))) DO UPDATE
                     SET level = EXCLUDED.level,
                         catalog_skill_id = COALESCE(EXCLUDED.catalog_skill_id, cur.catalog_skill_id),
                         category = COALESCE(EXCLUDED.category, cur.category),
                         years_experience = COALESCE(EXCLUDED.years_experience, cur.years_experience),
                         last_used_on = COALESCE(EXCLUDED.last_used_on, cur.last_used_on),
                         -- Not now(): Citus allows only immutable functions here.
                         updated_at = EXCLUDED.updated_at
                 RETURNING id, level, (xmax = 0) AS created
             ), p AS (
                 INSERT INTO skill_progress (skill_id, level, note)
                 SELECT id, level, $7 FROM s
                 RETURNING skill_id
             )
             SELECT p.skill_id, s.created FROM p JOIN s ON s.id = p.skill_id",
            &[
                &input.name.trim(),
                &input.catalog_skill_id,
                &input.category,
                &input.level,
                &input.years_experience,
                &input.last_used_on,
                &input.note,
            ],
        )
        .await?
        .ok_or_else(|| ApiError::internal(std::io::Error::other("upsert returned no row")))?;
    let (skill_id, created): (i64, bool) = (upsert.get(0), upsert.get(1));
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM skills s WHERE s.id = $1"),
            &[&skill_id],
        )
        .await?
        .ok_or_else(|| ApiError::internal(std::io::Error::other("the skill vanished")))?;
    let skill = Skill::from_row(&row)?;
    tx.commit().await?;
    Ok(if created {
        HttpResponse::Created().json(skill)
    } else {
        HttpResponse::Ok().json(skill)
    })
}
