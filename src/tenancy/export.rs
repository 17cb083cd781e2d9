//! Export (GDPR art. 15, 20) and import of a tenant.
//!
//! An export is ONE JSON document (format `tenantry-export`, version 1):
//!
//! ```text
//! {"format":"tenantry-export","format_version":1,"exported_at":"…",
//!  "template_version":4,
//!  "account":{"user_id":…,"username":…,"email":…,"role":…,"created_at":…,"last_login_at":…},
//!  "sessions":[{"id":…,"user_agent":…,"created_at":…,"last_used_at":…,"expires_at":…,"revoked":…}],
//!  "tables":[{"name":"experiences","rows":[{…one object per row, columns by name…}]}, …],
//!  "integrity":{"algorithm":"HMAC-SHA256","tables":N,"rows":N,"mac":"<hex>"}}
//! ```
//!
//! Tables are every table of the tenant's schema (but its migration
//! history), found in the catalog, parents before the tables that reference
//! them; rows are `row_to_json` of each row's columns (generated ones
//! aside: they are derived), in primary-key order. Everything
//! is read in one REPEATABLE READ, READ ONLY transaction (one snapshot) and
//! streamed in chunks through a bounded channel: memory stays flat whatever
//! the tenant's size. `mac` is an HMAC-SHA256, keyed from the service secret,
//! of every byte before `,"integrity":`; an import refuses a file whose MAC
//! does not match (tampered) or that has no trailer (truncated).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::domain::SchemaName;

pub const FORMAT: &str = "tenantry-export";
pub const FORMAT_VERSION: i64 = 1;
/// What separates the signed body from its trailer.
pub const TRAILER: &[u8] = b",\"integrity\":";
/// Rows fetched per round trip.
const FETCH: i32 = 1_000;
/// Bytes sent per chunk.
const CHUNK: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// The key that signs exports, derived from the service secret.
#[derive(Clone)]
pub struct ExportKey([u8; 32]);

impl std::fmt::Debug for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportKey(<redacted>)")
    }
}

impl ExportKey {
    pub fn from_secret(secret: &[u8]) -> ExportKey {
        let mut mac = HmacSha256::new_from_slice(secret).expect("any key length");
        mac.update(b"tenantry export v1");
        ExportKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("any key length")
    }

    /// Check a whole export file: the MAC over everything before the
    /// trailer. Returns the parsed document.
    pub fn open(&self, bytes: &[u8]) -> Result<serde_json::Value, ImportError> {
        let at = find_last(bytes, TRAILER).ok_or(ImportError::Truncated)?;
        let document: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|_| ImportError::Truncated)?;
        let claimed = document["integrity"]["mac"]
            .as_str()
            .and_then(|h| hex::decode(h).ok())
            .ok_or(ImportError::Tampered)?;
        let mut mac = self.mac();
        mac.update(&bytes[..at]);
        mac.verify_slice(&claimed)
            .map_err(|_| ImportError::Tampered)?;
        Ok(document)
    }
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no tenant for this account")]
    NoTenant,
    #[error("export failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the reader went away")]
    Closed,
    #[error("the reader stopped reading")]
    Stalled,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the file is truncated or not an export (no integrity trailer, or not JSON)")]
    Truncated,
    #[error("the file was altered after export (its MAC does not match), or exported by another installation")]
    Tampered,
    #[error("not a tenantry export of a format this version reads ({0})")]
    Format(String),
}

/// Bytes on their way out: sent on in chunks, MAC'd as they go.
struct Buffer {
    buf: Vec<u8>,
    mac: HmacSha256,
    tx: mpsc::Sender<Vec<u8>>,
    /// How long a chunk may wait for the reader (`None`: as long as it takes).
    stall: Option<Duration>,
}

impl Buffer {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), ExportError> {
        self.mac.update(bytes);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    /// Bytes outside the signed body (the trailer).
    fn put_unsigned(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> Result<(), ExportError> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            let sent = match self.stall {
                Some(stall) => tokio::time::timeout(stall, self.tx.send(chunk))
                    .await
                    .map_err(|_| ExportError::Stalled)?,
                None => self.tx.send(chunk).await,
            };
            sent.map_err(|_| ExportError::Closed)?;
        }
        Ok(())
    }
}

/// Tables of `schema` to export, parents first (by foreign keys), then by
/// name; with the columns of their primary key (for a stable order) and the
/// columns exported: all but generated ones, which are derived (a search
/// document, say) and which an import recomputes.
async fn tables(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &SchemaName,
) -> Result<Vec<(String, Keyed)>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT c.relname,
                    coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                              FROM pg_catalog.pg_index i
                              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                              JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                              WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS pk,
                    coalesce((SELECT array_agg(DISTINCT p.relname)
                              FROM pg_catalog.pg_constraint f
                              JOIN pg_catalog.pg_class p ON p.oid = f.confrelid
                              WHERE f.conrelid = c.oid AND f.contype = 'f' AND p.oid <> c.oid
                                AND p.relnamespace = c.relnamespace), '{}') AS parents,
                    (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attgenerated = '') AS columns
             FROM pg_catalog.pg_class c
             WHERE c.relnamespace = to_regnamespace($1) AND c.relkind IN ('r', 'p')
               AND NOT c.relispartition AND c.relname <> 'refinery_schema_history'
             ORDER BY c.relname",
            &[&schema.as_str()],
        )
        .await?;
    let mut pending: BTreeMap<String, (Keyed, BTreeSet<String>)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (
                    Keyed {
                        pk: r.get(1),
                        columns: r.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
                    },
                    r.get::<_, Vec<String>>(2).into_iter().collect(),
                ),
            )
        })
        .collect();
    let mut ordered = Vec::new();
    while !pending.is_empty() {
        let ready: Vec<String> = pending
            .iter()
            .filter(|(_, (_, parents))| parents.iter().all(|p| !pending.contains_key(p)))
            .map(|(name, _)| name.clone())
            .collect();
        // A cycle of foreign keys: take the rest by name.
        let ready = if ready.is_empty() {
            pending.keys().cloned().collect()
        } else {
            ready
        };
        for name in ready {
            if let Some((pk, _)) = pending.remove(&name) {
                ordered.push((name, pk));
            }
        }
    }
    Ok(ordered)
}

/// A table's primary key and exported columns.
struct Keyed {
    pk: Vec<String>,
    columns: Vec<String>,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What an export's session calls itself (`application_name`), with the
/// user id after it: `tenantry.lock_tenant` ends the exports of a tenant
/// that an erasure or a fleet migration waits for.
pub const APPLICATION_NAME: &str = "tenantry export ";

/// Stream the export of `user_id`'s tenant into `out`, in chunks. `client`
/// is a dedicated connection. A chunk the reader has not taken within
/// `stall` ends the export ([`ExportError::Stalled`]) and its transaction.
pub async fn export(
    client: &mut Client,
    user_id: Uuid,
    key: &ExportKey,
    out: mpsc::Sender<Vec<u8>>,
    stall: Option<Duration>,
) -> Result<(), ExportError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // The lock is held to the end: an erasure (which takes it exclusively)
    // does not drop tables under the export; it ends the export instead of
    // waiting for it (`tenantry.lock_tenant`, found by the session's name).
    tx.execute(
        "SELECT pg_catalog.set_config('application_name', $2 || $1::text, true),
                pg_catalog.pg_advisory_xact_lock_shared(1953395828, pg_catalog.hashtext($1::text))",
        &[&user_id.to_string(), &APPLICATION_NAME],
    )
    .await?;
    let header = tx
        .query_opt(
            "SELECT json_build_object(
                 'format', $2::text, 'format_version', $3::int8,
                 'exported_at', now(), 'template_version', t.template_version,
                 'account', json_build_object('user_id', u.id, 'username', u.username,
                     'email', u.email, 'role', u.role, 'created_at', u.created_at,
                     'last_login_at', u.last_login_at, 'password_changed_at', u.password_changed_at),
                 'sessions', coalesce((
                     SELECT json_agg(s ORDER BY s.created_at) FROM (
                         SELECT family_id AS id,
                                (array_agg(user_agent ORDER BY id DESC))[1] AS user_agent,
                                min(created_at) AS created_at, max(created_at) AS last_used_at,
                                max(expires_at) AS expires_at, bool_or(revoked_at IS NOT NULL) AS revoked
                         FROM tenantry.refresh_tokens WHERE user_id = u.id GROUP BY family_id) s),
                     '[]'::json))::text,
                    t.schema_name
             FROM tenantry.users u JOIN tenantry.tenants t ON t.user_id = u.id
             WHERE u.id = $1 AND t.status = 'active'",
            &[&user_id, &FORMAT, &FORMAT_VERSION],
        )
        .await?
        .ok_or(ExportError::NoTenant)?;
    let header_json: String = header.get(0);
    let schema = SchemaName::parse(header.get::<_, &str>(1)).map_err(|_| ExportError::NoTenant)?;
    let mut buf = Buffer {
        buf: Vec::with_capacity(CHUNK),
        mac: key.mac(),
        tx: out,
        stall,
    };
    // The header object, without its closing brace, then the tables.
    let open = header_json.trim_end().trim_end_matches('}');
    buf.put(open.as_bytes()).await?;
    buf.put(b",\"tables\":[").await?;
    let (mut total_rows, mut total_tables) = (0i64, 0i64);
    for (i, (table, Keyed { pk, columns })) in tables(&tx, &schema).await?.into_iter().enumerate() {
        if i > 0 {
            buf.put(b",").await?;
        }
        let name = serde_json::to_string(&table).expect("a string serializes");
        buf.put(format!("{{\"name\":{name},\"rows\":[").as_bytes())
            .await?;
        let order = if pk.is_empty() {
            String::new()
        } else {
            format!(
                " ORDER BY {}",
                pk.iter()
                    .map(|c| format!("t.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let columns = columns
            .iter()
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        // Names from the catalog, quoted as identifiers.
        let statement = tx
            .prepare(&format!(
                "SELECT row_to_json(r)::text FROM {}.{} t, LATERAL (SELECT {columns}) r{order}",
                schema.quoted(),
                quote_ident(&table)
            ))
            .await?;
        let portal = tx.bind(&statement, &[]).await?;
        let mut first = true;
        loop {
            let rows = tx.query_portal(&portal, FETCH).await?;
            let n = rows.len();
            for row in rows {
                if !first {
                    buf.put(b",").await?;
                }
                first = false;
                buf.put(row.get::<_, &str>(0).as_bytes()).await?;
                total_rows += 1;
            }
            if n < FETCH as usize {
                break;
            }
        }
        buf.put(b"]}").await?;
        total_tables += 1;
    }
    buf.put(b"]").await?;
    tx.commit().await?;
    let mac = hex::encode(buf.mac.clone().finalize().into_bytes());
    let trailer = format!(
        "{{\"algorithm\":\"HMAC-SHA256\",\"tables\":{total_tables},\"rows\":{total_rows},\"mac\":\"{mac}\"}}}}\n"
    );
    buf.put_unsigned(TRAILER);
    buf.put_unsigned(trailer.as_bytes());
    buf.flush().await?;
    Ok(())
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
    #[error(transparent)]
    Provision(#[from] crate::provisioning::ProvisionError),
    #[error("import failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
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

/// Recreate a tenant from an opened export (see [`ExportKey::open`]) in ONE
/// transaction: provisioned at the export's template version, its rows
/// loaded with their ids (sequences set past them), then migrated forward
/// to the latest version, and an audit entry. `account` carries the new
/// account's name, email and password hash.
pub async fn import(
    client: &mut deadpool_postgres::Client,
    installation: &crate::db::Installation,
    templates: &crate::tenancy::templates::TemplateSet,
    document: &serde_json::Value,
    account: &crate::provisioning::NewAccount,
    pseudonyms: &crate::audit::Pseudonyms,
) -> Result<Restored, RestoreError> {
    if document["format"] != FORMAT || document["format_version"] != FORMAT_VERSION {
        return Err(ImportError::Format(format!(
            "format {} version {}",
            document["format"], document["format_version"]
        ))
        .into());
    }
    let version = document["template_version"]
        .as_i64()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ImportError::Format("no template_version".into()))?;
    let latest = templates.latest();
    if version > i64::from(latest.get()) {
        return Err(RestoreError::NewerVersion(version, latest.get()));
    }
    let tables = document["tables"]
        .as_array()
        .ok_or_else(|| ImportError::Format("no tables".into()))?;

    let at_export = templates.between(
        0,
        crate::domain::TemplateVersion::parse(version)
            .map_err(|_| ImportError::Format("bad template_version".into()))?,
    );
    let reservation =
        crate::provisioning::Reservation::take(client, installation, &account.username).await?;
    let restored = import_in(
        client,
        installation,
        templates,
        account,
        pseudonyms,
        (at_export, version),
        tables,
    )
    .await;
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
    templates: &crate::tenancy::templates::TemplateSet,
    account: &crate::provisioning::NewAccount,
    pseudonyms: &crate::audit::Pseudonyms,
    (at_export, version): (&[crate::tenancy::templates::Template], i64),
    tables: &[serde_json::Value],
) -> Result<Restored, RestoreError> {
    use crate::audit::{Action, Entry};
    use crate::tenancy::apply::TemplateApplication;

    let tx = client.transaction().await?;
    let latest = templates.latest();
    let made = crate::provisioning::provision_in(
        &tx,
        installation,
        at_export,
        account,
        crate::provisioning::Distribute::Later,
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
        let name = table["name"]
            .as_str()
            .ok_or_else(|| ImportError::Format("a table without a name".into()))?;
        if !known.contains(name) || name == "refinery_schema_history" {
            return Err(RestoreError::UnknownTable(name.to_owned(), version));
        }
        let rows = table["rows"]
            .as_array()
            .ok_or_else(|| ImportError::Format(format!("table {name} without rows")))?;
        if rows.is_empty() {
            continue;
        }
        let qualified = format!("{}.{}", schema.quoted(), quote_ident(name));
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
            .map(|r| quote_ident(r.get::<_, &str>(0)))
            .collect();
        let list = columns.join(", ");
        let json = serde_json::Value::Array(rows.clone());
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
            let column = quote_ident(seq.get::<_, &str>(0));
            let sequence: String = seq.get(1);
            let loaded: Option<i64> = tx
                .query_one(&format!("SELECT max({column})::int8 FROM {qualified}"), &[])
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
    Ok(Restored {
        username: made.username.to_string(),
        schema: schema.to_string(),
        from_version: version,
        template_version: latest.get(),
        tables: tables.len(),
        rows: rows_loaded,
    })
}
