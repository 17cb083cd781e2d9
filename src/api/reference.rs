//! `GET /api/reference/{table}[?q=…]`: the shared reference data, read as
//! the caller's tenant role (which the group role lets read `reference`,
//! and nothing lets write). Only the tables listed here are served, each
//! with a fixed, schema-qualified query: the tenant has a `skills` table of
//! its own, and the path never reaches SQL.

use actix_web::{get, web, HttpResponse};
use serde::Serialize;

use crate::api::paging::{cursor_part, make_cursor, ListQuery, Page};
use crate::api::AppState;
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, TenantTx};

/// One allowed table: its query returns `key` (int8), and `item` (jsonb),
/// filtered by `$1` (search text or NULL), after key `$2`, limit `$3`.
struct Table {
    name: &'static str,
    sql: &'static str,
}

const TABLES: &[Table] = &[
    Table {
        name: "skills",
        sql: "SELECT s.id::int8 AS key,
                     jsonb_build_object('id', s.id, 'name', s.name, 'category_id', s.category_id,
                                        'category', c.name, 'kind', c.kind) AS item
              FROM reference.skills s JOIN reference.skill_categories c ON c.id = s.category_id
              WHERE ($1::text IS NULL OR s.name ILIKE '%' || $1::text || '%' OR c.name ILIKE '%' || $1::text || '%')
                AND ($2::int8 IS NULL OR s.id > $2::int8)
              ORDER BY s.id LIMIT $3",
    },
    Table {
        name: "skill_categories",
        sql: "SELECT c.id::int8 AS key, to_jsonb(c) AS item FROM reference.skill_categories c
              WHERE ($1::text IS NULL OR c.name ILIKE '%' || $1::text || '%')
                AND ($2::int8 IS NULL OR c.id > $2::int8)
              ORDER BY c.id LIMIT $3",
    },
    Table {
        name: "industries",
        sql: "SELECT row_number() OVER (ORDER BY i.code)::int8 AS key, to_jsonb(i) AS item
              FROM reference.industries i
              WHERE ($1::text IS NULL OR i.name ILIKE '%' || $1::text || '%' OR i.code = $1::text)
              ORDER BY i.code OFFSET COALESCE($2::int8, 0) LIMIT $3",
    },
    Table {
        name: "career_paths",
        sql: "SELECT p.id::int8 AS key, to_jsonb(p) AS item FROM reference.career_paths p
              WHERE ($1::text IS NULL OR p.name ILIKE '%' || $1::text || '%' OR p.description ILIKE '%' || $1::text || '%')
                AND ($2::int8 IS NULL OR p.id > $2::int8)
              ORDER BY p.id LIMIT $3",
    },
    Table {
        name: "role_templates",
        sql: "SELECT r.id::int8 AS key, to_jsonb(r) AS item FROM reference.role_templates r
              WHERE ($1::text IS NULL OR r.title ILIKE '%' || $1::text || '%' OR r.summary ILIKE '%' || $1::text || '%')
                AND ($2::int8 IS NULL OR r.id > $2::int8)
              ORDER BY r.id LIMIT $3",
    },
    Table {
        name: "competencies",
        sql: "SELECT c.id::int8 AS key, to_jsonb(c) AS item FROM reference.competencies c
              WHERE ($1::text IS NULL OR c.name ILIKE '%' || $1::text || '%' OR c.description ILIKE '%' || $1::text || '%')
                AND ($2::int8 IS NULL OR c.id > $2::int8)
              ORDER BY c.id LIMIT $3",
    },
];

/// The names `GET /api/reference/{table}` accepts.
pub fn table_names() -> Vec<&'static str> {
    TABLES.iter().map(|t| t.name).collect()
}

/// One row of a reference table, as a JSON object (its columns).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(value_type = Object)]
pub struct ReferenceItem(serde_json::Value);

/// `GET /api/reference/{table}`: 404 for a table not on the list.
#[utoipa::path(
    tag = "reference",
    security(("bearer" = [])),
    params(
        ("table" = String, Path, description = "`skills`, `skill_categories`, `industries`, `career_paths`, `role_templates` or `competencies`"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "A page of the table (`q` filters by name)", body = Page<ReferenceItem>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No reference table by that name", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/reference/{table}")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn list(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    table: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let table = TABLES
        .iter()
        .find(|t| t.name == table.as_str())
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no reference table by that name; known: {}",
                table_names().join(", ")
            ))
        })?;
    let limit = query.limit()?;
    // LIKE's own wildcards in the search text match themselves.
    let search = query.search()?.map(|q| {
        q.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    });
    let after: Option<i64> = match query.cursor(table.name, 1)? {
        Some(parts) => Some(cursor_part(&parts[0])?),
        None => None,
    };
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        table.sql,
        &[&search, &after, &(limit + 1)],
    )
    .await?;
    // industries pages by position (its key, the row number, is what the
    // next page skips); the others by id.
    let items: Vec<(i64, ReferenceItem)> = rows
        .iter()
        .map(|row| (row.get("key"), ReferenceItem(row.get("item"))))
        .collect();
    let page = Page::from_rows(items, limit, |(key, _)| {
        make_cursor(table.name, &[key.to_string()])
    });
    Ok(HttpResponse::Ok().json(Page {
        items: page.items.into_iter().map(|(_, item)| item).collect(),
        next_cursor: page.next_cursor,
    }))
}
