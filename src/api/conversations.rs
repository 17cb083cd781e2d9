//! `/api/conversations` and their messages.

use actix_web::{get, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::api::extract::JsonBody;
use crate::api::paging::{
    cursor_part, from_wire, make_cursor, object, opt_text, text, wire_name, ListQuery, Page,
    PageQuery,
};
use crate::api::AppState;
use crate::api::{ApiError, AuthenticatedUser};
use crate::routing::{Access, TenantTx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    CareerPlanning,
    InterviewPrep,
    Resume,
    Skills,
    General,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Author {
    #[default]
    User,
    Assistant,
    System,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Conversation {
    pub id: i64,
    pub title: String,
    pub topic: Option<Topic>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const CONVERSATION: &str = "id, title, topic, status, created_at, updated_at";

impl Conversation {
    fn from_row(row: &Row) -> Result<Conversation, ApiError> {
        let topic: Option<String> = row.get("topic");
        Ok(Conversation {
            id: row.get("id"),
            title: row.get("title"),
            topic: topic.as_deref().map(from_wire).transpose()?,
            status: row.get("status"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConversation {
    /// 1 to 300 characters ("New conversation" when absent).
    #[schema(max_length = 300, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    pub title: Option<String>,
    pub topic: Option<Topic>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Message {
    pub id: i64,
    pub conversation_id: i64,
    pub author: Author,
    pub content: String,
    /// As stored (numbers exactly as PostgreSQL keeps them).
    #[schema(value_type = Object)]
    pub metadata: Box<serde_json::value::RawValue>,
    pub created_at: DateTime<Utc>,
}

const MESSAGE: &str = "id, conversation_id, author, content, metadata, created_at";

impl Message {
    fn from_row(row: &Row) -> Result<Message, ApiError> {
        Ok(Message {
            id: row.get("id"),
            conversation_id: row.get("conversation_id"),
            author: from_wire(row.get("author"))?,
            content: row.get("content"),
            metadata: row
                .get::<_, tokio_postgres::types::Json<Box<serde_json::value::RawValue>>>("metadata")
                .0,
            created_at: row.get("created_at"),
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    #[serde(default)]
    pub author: Author,
    /// 1 to 100,000 characters.
    #[schema(max_length = 100000, pattern = "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$")]
    pub content: String,
    /// Up to 16 kB of JSON, no NUL characters; every number 0 or between
    /// 1e-15 and 1e15 in magnitude.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl NewConversation {
    /// Also what an import holds each conversation row to.
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        opt_text("title", self.title.as_deref(), 1, 300)
    }
}

impl NewMessage {
    /// Also what an import holds each message row to.
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        text("content", &self.content, 1, 100_000)?;
        object("metadata", &self.metadata)
    }
}

fn no_conversation() -> ApiError {
    ApiError::NotFound("no such conversation".into())
}

/// `GET /api/conversations`: most recently active first.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of conversations", body = Page<Conversation>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/conversations")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn list(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = ListQuery::from(query.into_inner());
    let limit = query.limit()?;
    let (at, id): (Option<DateTime<Utc>>, Option<i64>) = match query.cursor("c", 2)? {
        Some(parts) => (Some(cursor_part(&parts[0])?), Some(cursor_part(&parts[1])?)),
        None => (None, None),
    };
    let sql = format!(
        "SELECT {CONVERSATION} FROM conversations
         WHERE $1::timestamptz IS NULL OR (updated_at, id) < ($1::timestamptz, $2::int8)
         ORDER BY updated_at DESC, id DESC LIMIT $3"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        &sql,
        &[&at, &id, &(limit + 1)],
    )
    .await?;
    let items = rows
        .iter()
        .map(Conversation::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page::from_rows(items, limit, |c| {
        make_cursor(
            "c",
            &[
                c.updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                c.id.to_string(),
            ],
        )
    });
    Ok(HttpResponse::Ok().json(page))
}

/// `POST /api/conversations` → 201.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    request_body = NewConversation,
    responses(
        (status = 201, description = "Started", body = Conversation,
         headers(("Location" = String, description = "Its messages' URL"))),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/conversations")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn create(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    body: JsonBody<NewConversation>,
) -> Result<HttpResponse, ApiError> {
    let input = body.into_inner();
    input.validate()?;
    let sql = format!(
        "INSERT INTO conversations (title, topic) VALUES (COALESCE($1, 'New conversation'), $2)
         RETURNING {CONVERSATION}"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadWrite,
        &sql,
        &[&input.title, &input.topic.as_ref().map(wire_name)],
    )
    .await?;
    let row = rows.first().ok_or_else(no_conversation)?;
    let conversation = Conversation::from_row(row)?;
    Ok(HttpResponse::Created()
        .insert_header((
            "Location",
            format!("/api/conversations/{}/messages", conversation.id),
        ))
        .json(conversation))
}

/// `GET /api/conversations/{id}/messages`: oldest first; 404 for a
/// conversation that is not the caller's.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The conversation's id"), PageQuery),
    responses(
        (status = 200, description = "A page of messages, oldest first", body = Page<Message>),
        (status = 400, description = "Invalid query", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such conversation of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[get("/api/conversations/{id}/messages")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn messages(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<i64>,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = ListQuery::from(query.into_inner());
    let limit = query.limit()?;
    let after: Option<i64> = match query.cursor("m", 1)? {
        Some(parts) => Some(cursor_part(&parts[0])?),
        None => None,
    };
    // One row per message, or one row of NULLs for an empty conversation;
    // no row at all when the conversation does not exist.
    let sql = "SELECT m.id, m.conversation_id, m.author, m.content, m.metadata, m.created_at
               FROM conversations c
               LEFT JOIN LATERAL (
                   SELECT id, conversation_id, author, content, metadata, created_at FROM messages
                   WHERE conversation_id = c.id AND ($2::int8 IS NULL OR id > $2::int8)
                   ORDER BY id LIMIT $3
               ) m ON true
               WHERE c.id = $1";
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadOnly,
        sql,
        &[&id.into_inner(), &after, &(limit + 1)],
    )
    .await?;
    if rows.is_empty() {
        return Err(no_conversation());
    }
    let items = rows
        .iter()
        .filter(|row| row.get::<_, Option<i64>>("id").is_some())
        .map(Message::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let page = Page::from_rows(items, limit, |m| make_cursor("m", &[m.id.to_string()]));
    Ok(HttpResponse::Ok().json(page))
}

/// `POST /api/conversations/{id}/messages` → 201; the conversation becomes
/// the most recently active.
#[utoipa::path(
    tag = "tenant data",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The conversation's id")),
    request_body = NewMessage,
    responses(
        (status = 201, description = "Stored", body = Message),
        (status = 400, description = "Invalid input", body = crate::api::openapi::ErrorBody),
        (status = 404, description = "No such conversation of the caller's", body = crate::api::openapi::ErrorBody),
    )
)]
#[post("/api/conversations/{id}/messages")]
#[tracing::instrument(skip_all, fields(user = %user.0.sub))]
pub async fn post_message(
    state: web::Data<AppState>,
    user: AuthenticatedUser,
    id: web::Path<i64>,
    body: JsonBody<NewMessage>,
) -> Result<HttpResponse, ApiError> {
    let input = body.into_inner();
    input.validate()?;
    let metadata = serde_json::Value::Object(input.metadata);
    let sql = format!(
        "WITH c AS (UPDATE conversations SET updated_at = now() WHERE id = $1 RETURNING id)
         INSERT INTO messages (conversation_id, author, content, metadata)
         SELECT id, $2, $3, $4 FROM c
         RETURNING {MESSAGE}"
    );
    let rows = TenantTx::once(
        &state.pool,
        user.caller(),
        Access::ReadWrite,
        &sql,
        &[
            &id.into_inner(),
            &wire_name(&input.author),
            &input.content,
            &metadata,
        ],
    )
    .await?;
    let row = rows.first().ok_or_else(no_conversation)?;
    Ok(HttpResponse::Created().json(Message::from_row(row)?))
}
