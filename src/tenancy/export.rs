//! Export (GDPR art. 15, 20) of a tenant; [`super::import`] reads it back.
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
//! of every byte before `,"integrity":`; an import refuses a file that is
//! not exactly this document with a matching MAC (see [`super::import`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use postgres_protocol::escape::escape_identifier;
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

    pub(super) fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("any key length")
    }
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
    #[error("the export took longer than it may")]
    TooLong,
    #[error("the tenant is being erased or migrated; export it again shortly")]
    Busy,
}

/// Bytes on their way out: sent on in chunks, MAC'd as they go.
struct Buffer {
    buf: Vec<u8>,
    mac: HmacSha256,
    tx: mpsc::Sender<Vec<u8>>,
    /// How long the reader may take (`None`: as long as it likes).
    pace: Option<(Duration, Instant)>,
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
            let sent = match self.pace {
                Some((stall, deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ExportError::TooLong);
                    }
                    tokio::time::timeout(stall.min(left), self.tx.send(chunk))
                        .await
                        .map_err(|_| {
                            if Instant::now() >= deadline {
                                ExportError::TooLong
                            } else {
                                ExportError::Stalled
                            }
                        })?
                }
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

/// Enter the tenant as an export: named (so that `tenantry.lock_tenant`
/// finds it), admitted (no one waits for the tenant exclusively, else
/// [`ExportError::Busy`]), then the tenant's lock, shared, held to the end:
/// an erasure or a migration does not change tables under the export; it
/// ends the export instead of waiting for it.
async fn admit(tx: &tokio_postgres::Transaction<'_>, user_id: Uuid) -> Result<(), ExportError> {
    let key = user_id.to_string();
    let admitted: bool = tx
        .query_one(
            "SELECT pg_catalog.set_config('application_name', $2 || $1::text, true),
                    pg_catalog.pg_try_advisory_lock_shared($3, pg_catalog.hashtext($1::text))",
            &[&key, &APPLICATION_NAME, &crate::db::EXPORT_ADMISSION_CLASS],
        )
        .await?
        .get(1);
    if !admitted {
        return Err(ExportError::Busy);
    }
    tx.execute(
        "SELECT pg_catalog.pg_advisory_unlock_shared($3, pg_catalog.hashtext($1::text)),
                pg_catalog.pg_advisory_xact_lock_shared($2, pg_catalog.hashtext($1::text))",
        &[
            &key,
            &crate::db::TENANT_LOCK_CLASS,
            &crate::db::EXPORT_ADMISSION_CLASS,
        ],
    )
    .await?;
    Ok(())
}

/// What an export's session calls itself (`application_name`), with the
/// user id after it: `tenantry.lock_tenant` ends the exports of a tenant
/// that an erasure or a fleet migration waits for.
pub const APPLICATION_NAME: &str = "tenantry export ";

/// How long an export's reader may take: a chunk it has not taken within
/// `stall` ends the export ([`ExportError::Stalled`]), and so does the
/// export's running past `within` ([`ExportError::TooLong`]), with its
/// transaction (which holds a snapshot, and so vacuum back).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub stall: Duration,
    pub within: Duration,
}

/// Stream the export of `user_id`'s tenant into `out`, in chunks. `client`
/// is a dedicated connection; `pace` bounds how long the reader may take.
pub async fn export(
    client: &mut Client,
    user_id: Uuid,
    key: &ExportKey,
    out: mpsc::Sender<Vec<u8>>,
    pace: Option<Pace>,
) -> Result<(), ExportError> {
    let pace = pace.map(|p| (p.stall, Instant::now() + p.within));
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    admit(&tx, user_id).await?;
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
        pace,
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
                    .map(|c| format!("t.{}", escape_identifier(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let columns = columns
            .iter()
            .map(|c| format!("t.{}", escape_identifier(c)))
            .collect::<Vec<_>>()
            .join(", ");
        // Names from the catalog, quoted as identifiers.
        let statement = tx
            .prepare(&format!(
                "SELECT row_to_json(r)::text FROM {}.{} t, LATERAL (SELECT {columns}) r{order}",
                schema.quoted(),
                escape_identifier(&table)
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
