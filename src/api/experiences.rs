//! `/api/experiences`: a tenant's work and education history, with ranked
//! full-text search and cursor paging. Every statement runs through the
//! tenant guard, so unqualified names are the caller's own tables.

use actix_web::{delete, get, patch, post, web, HttpResponse};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use utoipa::ToSchema;

use crate::api::extract::JsonBody;
use crate::api::paging::{
    cursor_part, from_wire, invalid, make_cursor, nullable, opt_text, text, wire_name, ListQuery,
    Page,
};
use crate::api::AppState;
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, RoutingError, TenantTx};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Work,
    Education,
    Volunteer,
    Project,
    Certification,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EmploymentType {
    FullTime,
    PartTime,
    Contract,
    Freelance,
    Internship,
    Apprenticeship,
    SelfEmployed,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Experience {
    pub id: i64,
    pub kind: Kind,
    pub title: String,
    pub organization: Option<String>,
    pub employment_type: Option<EmploymentType>,
    pub location: Option<String>,
    pub is_remote: bool,
    pub industry_code: Option<String>,
    pub started_on: NaiveDate,
    pub ended_on: Option<NaiveDate>,
    pub description: Option<String>,
    pub skills: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Present on search results: how well the item matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<f32>,
}

/// Explicit columns, never `*`: cached statements must keep their shape
/// when a template version adds a column.
macro_rules! columns {
    () => {
        "id, kind, title, organization, employment_type, location, is_remote, \
         industry_code, started_on, ended_on, description, \
         COALESCE(details -> 'skills', '[]'::jsonb) AS skills, created_at, updated_at"
    };
}
const COLUMNS: &str = columns!();

/// Ranked search: `$1` the terms (a [`crate::api::paging::WebSearch`]), after rank `$2` and id
/// `$3`, limit `$4`. The match is served by the index on `search_doc`, and
/// only the matching rows are ranked.
pub const SEARCH_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    ", ts_rank(search_doc, query) AS rank
     FROM experiences, websearch_to_tsquery('english', $1) AS query
     WHERE search_doc @@ query
       AND ($2::real IS NULL OR (ts_rank(search_doc, query), id) < ($2::real, $3::int8))
     ORDER BY rank DESC, id DESC
     LIMIT $4"
);

/// [`SEARCH_SQL`] for a tenant without `search_doc` (a template version
/// before the one that adds it, until the fleet brings it there): the same
/// document, computed from every row. Tried only when [`SEARCH_SQL`] finds
/// no such column, so a search costs one round trip.
const SEARCH_UNINDEXED_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    ", ts_rank(doc, query) AS rank
     FROM experiences,
          websearch_to_tsquery('english', $1) AS query,
          LATERAL (SELECT setweight(to_tsvector('english', title), 'A')
                       || setweight(to_tsvector('english', coalesce(organization, '')), 'B')
                       || setweight(to_tsvector('english', coalesce(details ->> 'skills', '')), 'B')
                       || setweight(to_tsvector('english', coalesce(description, '')), 'C') AS doc) AS d
     WHERE doc @@ query
       AND ($2::real IS NULL OR (ts_rank(doc, query), id) < ($2::real, $3::int8))
     ORDER BY rank DESC, id DESC
     LIMIT $4"
);

impl Experience {
    fn from_row(row: &Row) -> Result<Experience, ApiError> {
        let employment: Option<String> = row.get("employment_type");
        let skills: serde_json::Value = row.get("skills");
        Ok(Experience {
            id: row.get("id"),
            kind: from_wire(row.get("kind"))?,
            title: row.get("title"),
            organization: row.get("organization"),
            employment_type: employment.as_deref().map(from_wire).transpose()?,
            location: row.get("location"),
            is_remote: row.get("is_remote"),
            industry_code: row.get("industry_code"),
            started_on: row.get("started_on"),
            ended_on: row.get("ended_on"),
            description: row.get("description"),
            skills: serde_json::from_value(skills).unwrap_or_default(),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            rank: None,
        })
    }
}

/// A new experience (POST), or one with a PATCH applied. Text is at most
/// the given length in characters, never contains NUL; dates are between
/// 1900-01-01 and 2199-12-31, and `ended_on` is not before `started_on`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperienceInput {
    #[serde(default)]
    pub kind: Kind,
    #[schema(max_length = 300, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    pub title: String,
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    pub organization: Option<String>,
    pub employment_type: Option<EmploymentType>,
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    pub location: Option<String>,
    #[serde(default)]
    pub is_remote: bool,
    /// A NAICS code: `51`, `518` or `31-33`.
    #[schema(pattern = r"^[0-9]{2}(-[0-9]{2})?$|^[0-9]{3}$")]
    pub industry_code: Option<String>,
    #[schema(pattern = "^(19[0-9]{2}|2[01][0-9]{2})-[0-9]{2}-[0-9]{2}$")]
    pub started_on: NaiveDate,
    #[schema(pattern = "^(19[0-9]{2}|2[01][0-9]{2})-[0-9]{2}-[0-9]{2}$")]
    pub ended_on: Option<NaiveDate>,
    #[schema(max_length = 20000, pattern = "^[^\\u0000]*$")]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(max_items = 50, inline)]
    pub skills: Vec<SkillName>,
}

/// A skill named on an experience: 1 to 100 characters.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(max_length = 100, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
pub struct SkillName(pub String);

impl ExperienceInput {
    /// Also what an import holds each experience row to.
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        text("title", &self.title, 1, 300)?;
        opt_text("organization", self.organization.as_deref(), 0, 300)?;
        opt_text("location", self.location.as_deref(), 0, 300)?;
        opt_text("description", self.description.as_deref(), 0, 20_000)?;
        if let Some(code) = &self.industry_code {
            if !INDUSTRY_CODE.is_match(code) {
                return Err(invalid(
                    "industry_code",
                    "must be a NAICS code such as 51, 518 or 31-33",
                ));
            }
        }
        if let Some(ended) = self.ended_on {
            if ended < self.started_on {
                return Err(invalid("ended_on", "must not be before started_on"));
            }
        }
        let earliest = NaiveDate::from_ymd_opt(1900, 1, 1).expect("a valid date");
        let latest = NaiveDate::from_ymd_opt(2199, 12, 31).expect("a valid date");
        for (field, date) in [
            ("started_on", Some(self.started_on)),
            ("ended_on", self.ended_on),
        ] {
            if date.is_some_and(|d| d < earliest || d > latest) {
                return Err(invalid(field, "must be between 1900-01-01 and 2199-12-31"));
            }
        }
        if self.skills.len() > 50 {
            return Err(invalid("skills", "must list at most 50 skills"));
        }
        for skill in &self.skills {
            text("skills", &skill.0, 1, 100)?;
        }
        Ok(())
    }

    fn details_skills(&self) -> serde_json::Value {
        serde_json::to_value(&self.skills).expect("strings serialise")
    }
}

/// PATCH: only the fields present change; `null` clears an optional one.
/// The result must be a valid experience.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperiencePatch {
    kind: Option<Kind>,
    #[schema(max_length = 300, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    title: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    organization: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    employment_type: Option<Option<EmploymentType>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(max_length = 300, pattern = "^[^\\u0000]*$")]
    location: Option<Option<String>>,
    is_remote: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(pattern = r"^[0-9]{2}(-[0-9]{2})?$|^[0-9]{3}$")]
    industry_code: Option<Option<String>>,
    #[schema(pattern = "^(19[0-9]{2}|2[01][0-9]{2})-[0-9]{2}-[0-9]{2}$")]
    started_on: Option<NaiveDate>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(pattern = "^(19[0-9]{2}|2[01][0-9]{2})-[0-9]{2}-[0-9]{2}$")]
    ended_on: Option<Option<NaiveDate>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(max_length = 20000, pattern = "^[^\\u0000]*$")]
    description: Option<Option<String>>,
    #[schema(max_items = 50, inline)]
    skills: Option<Vec<SkillName>>,
}

impl ExperiencePatch {
    fn apply(self, current: Experience) -> ExperienceInput {
        ExperienceInput {
            kind: self.kind.unwrap_or(current.kind),
            title: self.title.unwrap_or(current.title),
            organization: self.organization.unwrap_or(current.organization),
            employment_type: self.employment_type.unwrap_or(current.employment_type),
            location: self.location.unwrap_or(current.location),
            is_remote: self.is_remote.unwrap_or(current.is_remote),
            industry_code: self.industry_code.unwrap_or(current.industry_code),
            started_on: self.started_on.unwrap_or(current.started_on),
            ended_on: self.ended_on.unwrap_or(current.ended_on),
            description: self.description.unwrap_or(current.description),
            skills: self
                .skills
                .unwrap_or_else(|| current.skills.into_iter().map(SkillName).collect()),
        }
    }
}

/// `reference.industries.code`'s own rule.
static INDUSTRY_CODE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"^[0-9]{2}(-[0-9]{2})?$|^[0-9]{3}$").expect("a valid regex")
});

fn not_found() -> ApiError {
    ApiError::NotFound("no such experience".into())
}

/// `GET /api/experiences[?q=…][&limit=…][&cursor=…]`: newest first, or by
/// search rank with `q` (title, organization, skills and description).
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of experiences (with `rank` when searching)", body = Page<Experience>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/experiences")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn list(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit()?;
    let fetch = limit + 1;
    if let Some(q) = query.web_search()? {
        let (rank, id): (Option<f32>, Option<i64>) = match query.cursor("r", 2)? {
            Some(parts) => (Some(cursor_part(&parts[0])?), Some(cursor_part(&parts[1])?)),
            None => (None, None),
        };
        let params: [&(dyn ToSql + Sync); 4] = [&q.as_str(), &rank, &id, &fetch];
        let caller = user.caller();
        let rows = match TenantTx::once(&state.pool, caller, Access::ReadOnly, SEARCH_SQL, &params)
            .await
        {
            // A tenant the fleet has not brought to the search document yet.
            Err(RoutingError::Postgres(e)) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
                let sql = SEARCH_UNINDEXED_SQL;
                TenantTx::once(&state.pool, caller, Access::ReadOnly, sql, &params).await?
            }
            rows => rows?,
        };
        let items = rows
            .iter()
            .map(|row| {
                let mut e = Experience::from_row(row)?;
                e.rank = Some(row.get("rank"));
                Ok(e)
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let page = Page::from_rows(items, limit, |e| {
            make_cursor("r", &[e.rank.unwrap_or(0.0).to_string(), e.id.to_string()])
        });
        return Ok(HttpResponse::Ok().json(page));
    }
    let after = query.cursor("d", 2)?;
    let (date, id): (Option<NaiveDate>, Option<i64>) = match &after {
        Some(parts) => (Some(cursor_part(&parts[0])?), Some(cursor_part(&parts[1])?)),
        None => (None, None),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM experiences
         WHERE $1::date IS NULL OR (started_on, id) < ($1::date, $2::int8)
         ORDER BY started_on DESC, id DESC
         LIMIT $3"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        &sql,
        &[&date, &id, &fetch],
    )
    .await?;
    let items = rows
        .iter()
        .map(Experience::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page::from_rows(items, limit, |e| {
        make_cursor("d", &[e.started_on.to_string(), e.id.to_string()])
    });
    Ok(HttpResponse::Ok().json(page))
}

/// `POST /api/experiences` → 201 with the stored experience.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    request_body = ExperienceInput,
    responses(
        (status = 201, description = "Stored", body = Experience,
         headers(("Location" = String, description = "The experience's URL"))),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/experiences")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn create(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    body: JsonBody<ExperienceInput>,
) -> Result<HttpResponse, ApiError> {
    let input = body.into_inner();
    input.validate()?;
    let sql = format!(
        "INSERT INTO experiences (kind, title, organization, employment_type, location, is_remote,
                                  industry_code, started_on, ended_on, description, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, jsonb_build_object('skills', $11::jsonb))
         RETURNING {COLUMNS}"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadWrite,
        &sql,
        &[
            &wire_name(&input.kind),
            &input.title,
            &input.organization,
            &input.employment_type.as_ref().map(wire_name),
            &input.location,
            &input.is_remote,
            &input.industry_code,
            &input.started_on,
            &input.ended_on,
            &input.description,
            &input.details_skills(),
        ],
    )
    .await?;
    let row = rows.first().ok_or_else(not_found)?;
    let experience = Experience::from_row(row)?;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/experiences/{}", experience.id)))
        .json(experience))
}

/// `GET /api/experiences/{id}`; another tenant's id is simply not found.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The experience's id")),
    responses(
        (status = 200, description = "The experience", body = Experience),
        (status = 404, description = "No such experience of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/experiences/{id}")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn get(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM experiences WHERE id = $1");
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        &sql,
        &[&id.into_inner()],
    )
    .await?;
    let row = rows.first().ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(Experience::from_row(row)?))
}

/// `PATCH /api/experiences/{id}`: the merged result is validated whole.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The experience's id")),
    request_body = ExperiencePatch,
    responses(
        (status = 200, description = "The updated experience", body = Experience),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such experience of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[patch("/api/experiences/{id}")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn update(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<i64>,
    body: JsonBody<ExperiencePatch>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let tx = TenantTx::begin(&state.pool, user.caller(), Access::ReadWrite).await?;
    let select = format!("SELECT {COLUMNS} FROM experiences WHERE id = $1 FOR UPDATE");
    let Some(row) = tx.query_opt(&select, &[&id]).await? else {
        tx.rollback().await?;
        return Err(not_found());
    };
    let merged = body.into_inner().apply(Experience::from_row(&row)?);
    if let Err(e) = merged.validate() {
        tx.rollback().await?;
        return Err(e);
    }
    let update = format!(
        "UPDATE experiences SET kind = $2, title = $3, organization = $4, employment_type = $5,
                location = $6, is_remote = $7, industry_code = $8, started_on = $9, ended_on = $10,
                description = $11, details = details || jsonb_build_object('skills', $12::jsonb),
                updated_at = now()
         WHERE id = $1
         RETURNING {COLUMNS}"
    );
    let row = tx
        .query_opt(
            &update,
            &[
                &id,
                &wire_name(&merged.kind),
                &merged.title,
                &merged.organization,
                &merged.employment_type.as_ref().map(wire_name),
                &merged.location,
                &merged.is_remote,
                &merged.industry_code,
                &merged.started_on,
                &merged.ended_on,
                &merged.description,
                &merged.details_skills(),
            ],
        )
        .await?
        .ok_or_else(not_found)?;
    let experience = Experience::from_row(&row)?;
    tx.commit().await?;
    Ok(HttpResponse::Ok().json(experience))
}

/// `DELETE /api/experiences/{id}` → 204.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The experience's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such experience of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[delete("/api/experiences/{id}")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn delete(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::Delete,
        "DELETE FROM experiences WHERE id = $1 RETURNING id",
        &[&id.into_inner()],
    )
    .await?;
    if rows.is_empty() {
        return Err(not_found());
    }
    Ok(HttpResponse::NoContent().finish())
}
