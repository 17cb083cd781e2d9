//! The API's own checks applied to a tenant's rows as an export holds them
//! (one JSON object per row, columns by name), so that an import admits
//! only what the API would have stored. A row of a table the API writes is
//! read into the request type that writes it and checked by that type's
//! `validate`; its other columns (ids, times) must have their types. Every
//! column of every row, also of a table no route writes or a column a later
//! template added, gets the checks every stored value gets: JSON within the
//! bounds of [`object`], text without NUL. (Keys that are not columns of the
//! table are not imported: `jsonb_populate_recordset` reads columns only.)
//!
//! Architecture Invariant: no rule is restated here; each is called where
//! the API keeps it.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::conversations::{Author, NewConversation, NewMessage, Topic};
use super::experiences::{EmploymentType, ExperienceInput, Kind, SkillName};
use super::paging::{invalid, object};
use super::skills::SkillInput;
use super::summaries::{SummaryInput, SummaryKind};
use super::ApiError;

/// Why a row would not have been stored by the API.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("{0}")]
    Invalid(crate::domain::ValidationError),
    #[error("{0}")]
    Shape(String),
    #[error("column {column}: {source}")]
    Column {
        column: String,
        source: crate::domain::ValidationError,
    },
}

impl From<ApiError> for RowError {
    fn from(e: ApiError) -> RowError {
        match e {
            ApiError::Validation(v) => RowError::Invalid(v),
            other => RowError::Shape(other.to_string()),
        }
    }
}

/// `row` (of `table`) passes the API's checks for that table.
pub fn check(table: &str, row: &Value) -> Result<(), RowError> {
    if !row.is_object() {
        return Err(RowError::Shape("a row is not a JSON object".into()));
    }
    match table {
        "experiences" => read::<ExperienceRow>(row)?.check()?,
        "conversations" => read::<ConversationRow>(row)?.check()?,
        "messages" => read::<MessageRow>(row)?.check()?,
        "summaries" => read::<SummaryRow>(row)?.check()?,
        "summary_revisions" => read::<SummaryRevisionRow>(row)?.check()?,
        "skills" => read::<SkillRow>(row)?.check()?,
        "skill_progress" => read::<SkillProgressRow>(row)?.check()?,
        _ => {}
    }
    unwritten(row)
}

fn read<'a, T: Deserialize<'a>>(row: &'a Value) -> Result<T, RowError> {
    T::deserialize(row).map_err(|e| RowError::Shape(e.to_string()))
}

/// The checks of every stored value, on each column of `row`.
fn unwritten(row: &Value) -> Result<(), RowError> {
    let columns = row.as_object().into_iter().flatten();
    for (column, value) in columns {
        let checked = match value {
            Value::String(s) if s.contains('\0') => {
                Err(invalid("value", "must not contain NUL characters"))
            }
            Value::Object(map) => object("value", map),
            Value::Array(_) => {
                let wrapped = serde_json::Map::from_iter([("items".to_owned(), value.clone())]);
                object("value", &wrapped)
            }
            _ => Ok(()),
        };
        checked.map_err(|e| match RowError::from(e) {
            RowError::Invalid(source) => RowError::Column {
                column: column.clone(),
                source,
            },
            other => other,
        })?;
    }
    Ok(())
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct ExperienceRow {
    #[serde(rename = "id")]
    _id: i64,
    kind: Kind,
    title: String,
    organization: Option<String>,
    employment_type: Option<EmploymentType>,
    location: Option<String>,
    is_remote: bool,
    industry_code: Option<String>,
    started_on: NaiveDate,
    ended_on: Option<NaiveDate>,
    description: Option<String>,
    details: ExperienceDetails,
    #[serde(rename = "created_at")]
    _created_at: DateTime<Utc>,
    #[serde(rename = "updated_at")]
    _updated_at: DateTime<Utc>,
}

/// What the API keeps in an experience's `details`: its skills, only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperienceDetails {
    #[serde(default)]
    skills: Vec<SkillName>,
}

impl ExperienceRow {
    fn check(self) -> Result<(), RowError> {
        Ok(ExperienceInput {
            kind: self.kind,
            title: self.title,
            organization: self.organization,
            employment_type: self.employment_type,
            location: self.location,
            is_remote: self.is_remote,
            industry_code: self.industry_code,
            started_on: self.started_on,
            ended_on: self.ended_on,
            description: self.description,
            skills: self.details.skills,
        }
        .validate()?)
    }
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct ConversationRow {
    #[serde(rename = "id")]
    _id: i64,
    title: String,
    topic: Option<Topic>,
    /// The table's CHECK keeps it to the two states.
    #[serde(rename = "status")]
    _status: String,
    #[serde(rename = "created_at")]
    _created_at: DateTime<Utc>,
    #[serde(rename = "updated_at")]
    _updated_at: DateTime<Utc>,
}

impl ConversationRow {
    fn check(self) -> Result<(), RowError> {
        Ok(NewConversation {
            title: Some(self.title),
            topic: self.topic,
        }
        .validate()?)
    }
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct MessageRow {
    #[serde(rename = "id")]
    _id: i64,
    #[serde(rename = "conversation_id")]
    _conversation_id: i64,
    author: Author,
    content: String,
    metadata: serde_json::Map<String, Value>,
    #[serde(rename = "created_at")]
    _created_at: DateTime<Utc>,
}

impl MessageRow {
    fn check(self) -> Result<(), RowError> {
        Ok(NewMessage {
            author: self.author,
            content: self.content,
            metadata: self.metadata,
        }
        .validate()?)
    }
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct SummaryRow {
    kind: SummaryKind,
    headline: Option<String>,
    content: String,
    details: serde_json::Map<String, Value>,
    #[serde(rename = "revision")]
    _revision: i32,
    #[serde(rename = "updated_at")]
    _updated_at: DateTime<Utc>,
}

impl SummaryRow {
    fn check(self) -> Result<(), RowError> {
        Ok(SummaryInput {
            headline: self.headline,
            content: self.content,
            details: self.details,
        }
        .validate(self.kind)?)
    }
}

/// A summary's text as it was at one revision: the rules of its kind.
/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct SummaryRevisionRow {
    #[serde(rename = "id")]
    _id: i64,
    kind: SummaryKind,
    #[serde(rename = "revision")]
    _revision: i32,
    headline: Option<String>,
    content: String,
    #[serde(rename = "created_at")]
    _created_at: DateTime<Utc>,
}

impl SummaryRevisionRow {
    fn check(self) -> Result<(), RowError> {
        Ok(SummaryInput {
            headline: self.headline,
            content: self.content,
            details: serde_json::Map::new(),
        }
        .validate(self.kind)?)
    }
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct SkillRow {
    #[serde(rename = "id")]
    _id: i64,
    name: String,
    catalog_skill_id: Option<i32>,
    category: Option<String>,
    level: i16,
    years_experience: Option<f64>,
    last_used_on: Option<NaiveDate>,
    #[serde(rename = "created_at")]
    _created_at: DateTime<Utc>,
    #[serde(rename = "updated_at")]
    _updated_at: DateTime<Utc>,
}

impl SkillRow {
    fn check(self) -> Result<(), RowError> {
        Ok(SkillInput {
            name: self.name,
            catalog_skill_id: self.catalog_skill_id,
            category: self.category,
            level: self.level,
            years_experience: self.years_experience,
            last_used_on: self.last_used_on,
            note: None,
        }
        .validate()?)
    }
}

/// Columns a later template version adds are checked by [`unwritten`].
#[derive(Deserialize)]
struct SkillProgressRow {
    #[serde(rename = "id")]
    _id: i64,
    #[serde(rename = "skill_id")]
    _skill_id: i64,
    level: i16,
    note: Option<String>,
    #[serde(rename = "recorded_at")]
    _recorded_at: DateTime<Utc>,
}

impl SkillProgressRow {
    fn check(self) -> Result<(), RowError> {
        super::skills::level(self.level)?;
        Ok(super::skills::note(self.note.as_deref())?)
    }
}
