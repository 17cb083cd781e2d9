//! Import of a tenant from its export ([`super::export`]). A file is opened
//! only when it is exactly a document an export wrote, and every row passes
//! the API's own checks before anything is created.
//!
//! What [`ExportKey::open`] holds a file to, and why:
//! - one JSON document, nothing after it, no key twice in any object: a
//!   plain parser keeps the last copy of a repeated key, so bytes appended
//!   after the signed part could replace the account, the template version
//!   or the rows while the MAC still matched;
//! - the integrity trailer in the one shape an export writes, and last:
//!   `,"integrity":{"algorithm":"HMAC-SHA256","tables":N,"rows":N,"mac":"<hex>"}}`
//!   and a newline. Everything before it is the signed part, so no byte of
//!   the document is outside the MAC but the trailer itself;
//! - the MAC of the signed part, and the trailer's counts, match.
//!
//! The rows are then checked table by table with the API's validation
//! ([`crate::api::rows`]), so an export holding a row the API would refuse
//! (written under an older rule, say) is refused whole.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::LazyLock;

use hmac::Mac;
use postgres_protocol::escape::escape_identifier;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::export::{ExportKey, FORMAT, FORMAT_VERSION, TRAILER};

/// Why an export file is not opened.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the file is truncated or not an export (no integrity trailer, or not JSON)")]
    Truncated,
    #[error("the file was altered after export (its MAC does not match), or exported by another installation")]
    Tampered,
    #[error("the file was altered after export: {0} (an export never repeats a key)")]
    DuplicateKey(String),
    #[error("the file was altered after export: it has bytes after the end of its document")]
    Trailing,
    #[error("the file was altered after export: its integrity trailer is not the last thing in it, or not in the shape an export writes")]
    Trailer,
    #[error("the file was altered after export: its trailer counts {claimed_tables} tables and {claimed_rows} rows, the document holds {tables} and {rows}")]
    Counts {
        claimed_tables: u64,
        claimed_rows: u64,
        tables: u64,
        rows: u64,
    },
    #[error("not a tenantry export of a format this version reads ({0})")]
    Format(String),
}

/// An opened export: what an import needs of it.
#[derive(Debug, Deserialize)]
pub struct Export {
    format: String,
    format_version: i64,
    pub template_version: i64,
    pub account: ExportedAccount,
    pub tables: Vec<ExportedTable>,
}

#[derive(Debug, Deserialize)]
pub struct ExportedAccount {
    pub username: Option<String>,
    pub email: Option<String>,
}

/// One table: its rows as `row_to_json` wrote them, columns by name.
#[derive(Debug, Deserialize)]
pub struct ExportedTable {
    pub name: String,
    pub rows: Vec<Value>,
}

/// The trailer, exactly as `export` writes it, up to the end of the file.
static TRAILER_SHAPE: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
    regex::bytes::Regex::new(
        r#"\A,"integrity":\{"algorithm":"HMAC-SHA256","tables":(?P<tables>0|[1-9][0-9]{0,17}),"rows":(?P<rows>0|[1-9][0-9]{0,17}),"mac":"(?P<mac>[0-9a-f]{64})"\}\}\n?\z"#,
    )
    .expect("a valid regex")
});

impl ExportKey {
    /// Open a whole export file (see the module's documentation for what it
    /// must be). Returns the document.
    pub fn open(&self, bytes: &[u8]) -> Result<Export, ImportError> {
        let document = parse_strict(bytes)?;
        let at = find_last(bytes, TRAILER).ok_or(ImportError::Truncated)?;
        let trailer = TRAILER_SHAPE
            .captures(&bytes[at..])
            .ok_or(ImportError::Trailer)?;
        let claimed = hex::decode(&trailer["mac"]).map_err(|_| ImportError::Trailer)?;
        let mut mac = self.mac();
        mac.update(&bytes[..at]);
        mac.verify_slice(&claimed)
            .map_err(|_| ImportError::Tampered)?;
        let export: Export =
            serde_json::from_value(document).map_err(|e| ImportError::Format(e.to_string()))?;
        if export.format != FORMAT || export.format_version != FORMAT_VERSION {
            return Err(ImportError::Format(format!(
                "format {:?} version {}",
                export.format, export.format_version
            )));
        }
        export.check_counts(count(&trailer["tables"]), count(&trailer["rows"]))?;
        Ok(export)
    }
}

impl Export {
    fn check_counts(&self, claimed_tables: u64, claimed_rows: u64) -> Result<(), ImportError> {
        let tables = self.tables.len() as u64;
        let rows = self.tables.iter().map(|t| t.rows.len() as u64).sum();
        if (claimed_tables, claimed_rows) != (tables, rows) {
            return Err(ImportError::Counts {
                claimed_tables,
                claimed_rows,
                tables,
                rows,
            });
        }
        Ok(())
    }
}

/// A count the trailer's shape already bounded to 18 digits.
fn count(digits: &[u8]) -> u64 {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// `bytes` as one JSON value: no key twice in an object, nothing after it.
fn parse_strict(bytes: &[u8]) -> Result<Value, ImportError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = deserializer
        .deserialize_any(StrictVisitor)
        .map_err(|e| match e.classify() {
            // The visitor's own: a key twice, or a number no export writes.
            serde_json::error::Category::Data if e.to_string().contains("appears twice") => {
                ImportError::DuplicateKey(e.to_string())
            }
            serde_json::error::Category::Data => ImportError::Format(e.to_string()),
            _ => ImportError::Truncated,
        })?;
    deserializer.end().map_err(|_| ImportError::Trailing)?;
    Ok(value)
}

/// A JSON value, like serde_json's own, but an object with a key twice is
/// an error instead of its last copy.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "key {key:?} appears twice in one object"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Why an import did not happen (nothing was created).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] ImportError),
    #[error("the export is at template version {0}, newer than this binary knows (latest {1})")]
    NewerVersion(i64, i32),
    #[error("the export names table {0:?}, which template version {1} does not have")]
    UnknownTable(String, i64),
    #[error(
        "table {table}, row {row}{id}: {source}; the API would refuse it, so nothing was imported"
    )]
    InvalidRow {
        table: String,
        /// 1-based, in the file's order.
        row: usize,
        /// ` (id N)` when the row has an id.
        id: String,
        source: crate::api::rows::RowError,
    },
    #[error(transparent)]
    Provision(#[from] crate::provisioning::ProvisionError),
    #[error("import failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Citus: the tenant is imported, but a worker's sequences could not be
    /// moved past the loaded ids (`db::citus::advance_worker_sequences`).
    #[error(
        "the tenant was imported, but {0}; erase it and import it again when every worker is up"
    )]
    Sequences(String),
}

/// What an import made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    pub username: String,
    pub schema: String,
    pub from_version: i64,
    pub template_version: i32,
    pub tables: usize,
    pub rows: usize,
}

/// Every row of `tables` passes the API's checks for its table.
fn check_rows(tables: &[ExportedTable]) -> Result<(), RestoreError> {
    for table in tables {
        for (i, row) in table.rows.iter().enumerate() {
            crate::api::rows::check(&table.name, row).map_err(|source| {
                RestoreError::InvalidRow {
                    table: table.name.clone(),
                    row: i + 1,
                    id: row
                        .get("id")
                        .map(|id| format!(" (id {id})"))
                        .unwrap_or_default(),
                    source,
                }
            })?;
        }
    }
    Ok(())
}

/// Recreate a tenant from an opened export (see [`ExportKey::open`]) in ONE
/// transaction: provisioned at the export's template version, its rows
/// loaded with their ids (sequences set past them), then migrated forward
/// to the latest version, and an audit entry. `account` carries the new
/// account's name, email and password hash. Every row is checked before
/// anything is made.
pub async fn import(
    client: &mut deadpool_postgres::Client,
    installation: &crate::db::Installation,
    templates: &crate::tenancy::publication::Templates,
    document: &Export,
    account: &crate::provisioning::NewAccount,
    pseudonyms: &crate::audit::Pseudonyms,
) -> Result<Restored, RestoreError> {
    let version = document.template_version;
    let template_version = crate::domain::TemplateVersion::parse(version)
        .map_err(|_| ImportError::Format(format!("template_version {version}")))?;
    // A version published since this process read the set counts. Not
    // read (the database away): the import itself then fails, saying so.
    let _ = templates.refresh(&***client).await;
    let latest = templates.get().latest();
    if version > i64::from(latest.get()) {
        return Err(RestoreError::NewerVersion(version, latest.get()));
    }
    check_rows(&document.tables)?;
    let reservation =
        crate::provisioning::Reservation::take(client, installation, &account.username).await?;
    let mut attempts = 0;
    let restored = loop {
        // A version published meanwhile: read the set again and redo it.
        let published = templates.published();
        let restored = import_in(
            client,
            installation,
            &published,
            account,
            pseudonyms,
            (template_version, version),
            &document.tables,
        )
        .await;
        match restored {
            Err(RestoreError::Provision(e)) if e.newer_published() => {
                attempts += 1;
                let refreshed = match attempts {
                    1..=3 => templates
                        .refresh(&***client)
                        .await
                        .map_err(|e| e.to_string()),
                    _ => {
                        Err("the published templates changed three times during one import".into())
                    }
                };
                if let Err(why) = refreshed {
                    break Err(crate::provisioning::ProvisionError::Published(why).into());
                }
            }
            other => break other,
        }
    };
    let finished = reservation.finish(client, restored.is_ok()).await;
    let restored = restored?;
    finished?;
    client.batch_execute(crate::db::SESSION_RESET).await?;
    Ok(restored)
}

/// The transaction of [`import`]: the tenant at the export's version
/// (`at_export`, `version`), its rows, then forward to the latest.
async fn import_in(
    client: &mut deadpool_postgres::Client,
    installation: &crate::db::Installation,
    published: &crate::tenancy::publication::Published,
    account: &crate::provisioning::NewAccount,
    pseudonyms: &crate::audit::Pseudonyms,
    (template_version, version): (crate::domain::TemplateVersion, i64),
    tables: &[ExportedTable],
) -> Result<Restored, RestoreError> {
    use crate::audit::{Action, Entry};
    use crate::tenancy::apply::TemplateApplication;

    let templates = published.set();
    let tx = client.transaction().await?;
    let latest = templates.latest();
    let made = crate::provisioning::provision_in(
        &tx,
        installation,
        (templates, template_version),
        published.newest(),
        account,
        (
            crate::provisioning::RoleFrom::Spare,
            crate::provisioning::Distribute::Later,
        ),
        None,
    )
    .await?;
    let schema = made.schema.clone();
    let known: BTreeSet<String> = tx
        .query(
            "SELECT relname FROM pg_catalog.pg_class
             WHERE relnamespace = to_regnamespace($1) AND relkind IN ('r', 'p')",
            &[&schema.as_str()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut rows_loaded = 0;
    for table in tables {
        let (name, rows) = (table.name.as_str(), &table.rows);
        if !known.contains(name) || name == "refinery_schema_history" {
            return Err(RestoreError::UnknownTable(name.to_owned(), version));
        }
        if rows.is_empty() {
            continue;
        }
        let qualified = format!("{}.{}", schema.quoted(), escape_identifier(name));
        let columns: Vec<String> = tx
            .query(
                "SELECT a.attname FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attgenerated = ''
                 ORDER BY a.attnum",
                &[&qualified],
            )
            .await?
            .iter()
            .map(|r| escape_identifier(r.get::<_, &str>(0)))
            .collect();
        let list = columns.join(", ");
        let json = tokio_postgres::types::Json(rows);
        tx.execute(
            &format!(
                "INSERT INTO {qualified} ({list}) OVERRIDING SYSTEM VALUE
                 SELECT {list} FROM jsonb_populate_recordset(NULL::{qualified}, $1::jsonb)"
            ),
            &[&json],
        )
        .await?;
        rows_loaded += rows.len();
        // Sequences past the ids loaded.
        for seq in tx
            .query(
                "SELECT a.attname, pg_get_serial_sequence($1, a.attname)
                 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                   AND pg_get_serial_sequence($1, a.attname) IS NOT NULL",
                &[&qualified],
            )
            .await?
        {
            let column = escape_identifier(seq.get::<_, &str>(0));
            let sequence: String = seq.get(1);
            // On Citus the ids made on a worker are in that worker's range
            // (its group id times 2^48 on; `db::citus::advance_worker_sequences`
            // moves those): the coordinator's sequence follows only the ids
            // of its own range, or its next ids would be a worker's.
            let below = if installation.citus {
                1i64 << 48
            } else {
                i64::MAX
            };
            let loaded: Option<i64> = tx
                .query_one(
                    &format!("SELECT max({column})::int8 FROM {qualified} WHERE {column} < $1"),
                    &[&below],
                )
                .await?
                .get(0);
            // Never below the sequence's minimum: on Citus a distributed
            // table's sequence has a range of its own per node. (No table in
            // this statement: it runs where the sequence is used.)
            tx.execute(
                "SELECT setval(s.seqrelid, greatest(coalesce($2::int8, 0) + 1, s.seqmin), false)
                 FROM pg_catalog.pg_sequence s WHERE s.seqrelid = $1::text::regclass",
                &[&sequence, &loaded],
            )
            .await?;
        }
    }
    // Forward to the latest version, as a fleet run would.
    let newer = templates.between(version as i32, latest);
    if !newer.is_empty() {
        let application = TemplateApplication::new(&schema, &made.role, newer);
        let mut requests: Vec<crate::tenancy::apply::Request<'_>> = application
            .requests(tx.client())
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        requests.push(application.history_request(tx.client()).1);
        for result in crate::db::pipeline(requests).await {
            result?;
        }
        tx.execute(
            "UPDATE tenantry.tenants SET template_version = $2 WHERE user_id = $1",
            &[&made.user_id, &latest.get()],
        )
        .await?;
    }
    if installation.citus {
        tx.batch_execute(&crate::provisioning::distribute_sql(&schema))
            .await?;
    }
    crate::audit::append(
        &*tx,
        &Entry::new(Action::TenantImported)
            .actor("cli")
            .subject(pseudonyms.user(made.user_id))
            .detail("from_version", version)
            .detail("template_version", latest.get())
            .detail("tables", tables.len())
            .detail("rows", rows_loaded),
    )
    .await?;
    tx.commit().await?;
    if installation.citus {
        // Ids made on a worker come from that worker's range of the
        // sequence: past what was loaded there too.
        crate::db::citus::advance_worker_sequences(client, schema.as_str())
            .await
            .map_err(RestoreError::Sequences)?;
    }
    Ok(Restored {
        username: made.username.to_string(),
        schema: schema.to_string(),
        from_version: version,
        template_version: latest.get(),
        tables: tables.len(),
        rows: rows_loaded,
    })
}
