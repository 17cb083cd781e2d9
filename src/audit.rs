//! The tamper-evident audit log.
//!
//! Every security-relevant action appends one entry in the same transaction
//! as the action, with [`APPEND`] as the last statement before `COMMIT`:
//! it advances the one chain-head row (so concurrent appends queue, holding
//! the lock only for the commit, and never fork the chain) and inserts the
//! entry with `hash = sha256(previous hash || int8send(seq) || entry)`.
//! Triggers refuse UPDATE, DELETE and TRUNCATE (V9). An entry is canonical
//! JSON written here and stored verbatim; it names people only by
//! pseudonyms (a keyed hash of the user id, [`Pseudonyms`]), so erasing a
//! user never rewrites the chain, and it never holds a password or token.
//!
//! [`verify`] recomputes the chain and names the first broken entry;
//! anchors (sequence number and hash, appended to a file outside the
//! database by [`write_anchor`]) catch a deleted tail, which the chain alone
//! cannot show.

use std::io::Write;
use std::path::Path;

use chrono::{SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Append one entry (`$1`: its canonical JSON text). Must be the last
/// statement of its transaction: it holds the chain-head lock until COMMIT.
pub const APPEND: &str = "\
WITH head AS (
    UPDATE tenantry.audit_head
    SET seq = seq + 1,
        hash = pg_catalog.sha256(hash || pg_catalog.int8send(seq + 1) || pg_catalog.convert_to($1::text, 'UTF8'))
    RETURNING seq, hash
)
INSERT INTO tenantry.audit_log (seq, entry, hash) SELECT seq, $1::text, hash FROM head";

/// What happened. The names are what `GET /admin/audit?action=` filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Register,
    LoginSucceeded,
    LoginFailed,
    /// An account name reached the failed-login limit and was locked.
    LoginThrottled,
    /// A used refresh token was presented again; its family was revoked.
    RefreshTokenReuse,
    Logout,
    SessionRevoked,
    SessionsRevokedAll,
    PasswordChanged,
    AdminCreated,
    FleetRunStarted,
    FleetRunFinished,
    TenantErased,
    TenantImported,
    EmailVerified,
    /// A password set with a reset token (every session ended).
    PasswordReset,
    /// An email change asked for (the new address gets a token).
    EmailChangeRequested,
    /// The new address verified: the account's address changed.
    EmailChanged,
    TenantSuspended,
    TenantResumed,
    /// A tenant's own storage quota set or removed.
    TenantQuotaSet,
    /// A webhook endpoint registered.
    WebhookAdded,
    /// A webhook endpoint removed, with its deliveries.
    WebhookRemoved,
    /// Dead webhook deliveries made due again.
    WebhookDeliveriesRetried,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Register => "register",
            Action::LoginSucceeded => "login_succeeded",
            Action::LoginFailed => "login_failed",
            Action::LoginThrottled => "login_throttled",
            Action::RefreshTokenReuse => "refresh_token_reuse",
            Action::Logout => "logout",
            Action::SessionRevoked => "session_revoked",
            Action::SessionsRevokedAll => "sessions_revoked_all",
            Action::PasswordChanged => "password_changed",
            Action::AdminCreated => "admin_created",
            Action::FleetRunStarted => "fleet_run_started",
            Action::FleetRunFinished => "fleet_run_finished",
            Action::TenantErased => "tenant_erased",
            Action::TenantImported => "tenant_imported",
            Action::EmailVerified => "email_verified",
            Action::PasswordReset => "password_reset",
            Action::EmailChangeRequested => "email_change_requested",
            Action::EmailChanged => "email_changed",
            Action::TenantSuspended => "tenant_suspended",
            Action::TenantResumed => "tenant_resumed",
            Action::TenantQuotaSet => "tenant_quota_set",
            Action::WebhookAdded => "webhook_added",
            Action::WebhookRemoved => "webhook_removed",
            Action::WebhookDeliveriesRetried => "webhook_deliveries_retried",
        }
    }

    pub fn parse(raw: &str) -> Option<Action> {
        serde_json::from_value(serde_json::Value::String(raw.to_owned())).ok()
    }
}

/// Keyed pseudonyms: the same user always gets the same pseudonym, which
/// nobody without the key can link back to the user.
#[derive(Clone)]
pub struct Pseudonyms {
    key: [u8; 32],
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonyms(<redacted>)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl Pseudonyms {
    /// Derived from the service secret (`JWT_SECRET`) with a label of its
    /// own: rotating the secret starts new pseudonyms.
    pub fn from_secret(secret: &[u8]) -> Pseudonyms {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"tenantry audit pseudonyms v1");
        Pseudonyms {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn keyed(&self, label: &[u8], value: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(value);
        hex::encode(&mac.finalize().into_bytes()[..12])
    }

    /// `u_` + 24 hex digits.
    pub fn user(&self, id: Uuid) -> String {
        format!("u_{}", self.keyed(b"user:", id.as_bytes()))
    }

    /// A client address: `c_` + 24 hex digits.
    pub fn client(&self, ip: std::net::IpAddr) -> String {
        format!("c_{}", self.keyed(b"client:", ip.to_string().as_bytes()))
    }

    /// An account name as typed at a failed login (which may not exist).
    pub fn name(&self, name: &str) -> String {
        format!("n_{}", self.keyed(b"name:", name.as_bytes()))
    }
}

/// One entry, before it is written. Field order is the canonical order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Entry {
    /// RFC 3339, UTC, microseconds: sorts as text.
    pub at: String,
    pub action: Action,
    /// Who did it: a user pseudonym, `cli`, or `system`.
    pub actor: Option<String>,
    /// Whom it concerned (a user pseudonym), when not the actor.
    pub subject: Option<String>,
    /// The client's address, pseudonymised.
    pub client: Option<String>,
    /// Action-specific facts; never a password, token or clear personal data.
    pub details: serde_json::Value,
}

impl Entry {
    pub fn new(action: Action) -> Entry {
        Entry {
            at: timestamp(Utc::now()),
            action,
            actor: None,
            subject: None,
            client: None,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Entry {
        self.actor = Some(actor.into());
        self
    }

    pub fn subject(mut self, subject: impl Into<String>) -> Entry {
        self.subject = Some(subject.into());
        self
    }

    pub fn client(mut self, client: Option<String>) -> Entry {
        self.client = client;
        self
    }

    pub fn detail(mut self, key: &str, value: impl Serialize) -> Entry {
        if let serde_json::Value::Object(map) = &mut self.details {
            map.insert(
                key.to_owned(),
                serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
            );
        }
        self
    }

    /// The canonical text that is stored and hashed.
    pub fn text(&self) -> String {
        serde_json::to_string(self).expect("an entry serializes")
    }
}

/// The format of [`Entry::at`] (and of the `since`/`until` filters).
pub fn timestamp(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Append `entry` on its own (a transaction of one statement).
pub async fn append(
    client: &impl GenericClient,
    entry: &Entry,
) -> Result<(), tokio_postgres::Error> {
    client.execute(APPEND, &[&entry.text()]).await.map(drop)
}

/// The hash of entry `seq` after `previous`, as [`APPEND`] computes it.
pub fn chain_hash(previous: &[u8], seq: i64, entry: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(previous);
    h.update(seq.to_be_bytes());
    h.update(entry.as_bytes());
    h.finalize().into()
}

/// An anchor: the chain's head at some moment, kept outside the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    pub hash: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("audit anchor file {path}: {source}")]
    AnchorFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit anchor file {path}, line {line}: not `<installation> <seq> <hash> <time>`")]
    BadAnchor { path: String, line: usize },
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        entries: i64,
        anchors: usize,
    },
    /// The first entry (by sequence number) that does not check out.
    Broken {
        seq: i64,
        reason: String,
    },
}

/// Recompute the whole chain, then compare its head with the head row and
/// with every anchor. Reads in batches, so memory stays flat.
pub async fn verify(
    client: &impl GenericClient,
    anchors: &[Anchor],
) -> Result<Verdict, AuditError> {
    const BATCH: i64 = 5_000;
    let mut previous = [0u8; 32];
    let mut expected_seq = 1i64;
    let mut anchor_hashes = std::collections::HashMap::new();
    for a in anchors {
        anchor_hashes.insert(a.seq, a.hash);
    }
    loop {
        let rows = client
            .query(
                "SELECT seq, entry, hash FROM tenantry.audit_log
                 WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&expected_seq, &BATCH],
            )
            .await?;
        let n = rows.len() as i64;
        for row in rows {
            let seq: i64 = row.get(0);
            let entry: String = row.get(1);
            let hash: Vec<u8> = row.get(2);
            if seq != expected_seq {
                return Ok(Verdict::Broken {
                    seq: expected_seq,
                    reason: format!("entry {expected_seq} is missing (the next one is {seq})"),
                });
            }
            let computed = chain_hash(&previous, seq, &entry);
            if hash != computed {
                return Ok(Verdict::Broken {
                    seq,
                    reason: "its hash does not match its content and the previous entry".into(),
                });
            }
            if serde_json::from_str::<Entry>(&entry).is_err() {
                return Ok(Verdict::Broken {
                    seq,
                    reason: "its content is not an audit entry".into(),
                });
            }
            if let Some(anchored) = anchor_hashes.get(&seq) {
                if anchored != &computed {
                    return Ok(Verdict::Broken {
                        seq,
                        reason: "it differs from the anchor recorded for it".into(),
                    });
                }
            }
            previous = computed;
            expected_seq += 1;
        }
        if n < BATCH {
            break;
        }
    }
    let last = expected_seq - 1;
    let head = client
        .query_one("SELECT seq, hash FROM tenantry.audit_head", &[])
        .await?;
    let (head_seq, head_hash): (i64, Vec<u8>) = (head.get(0), head.get(1));
    if head_seq != last || head_hash != previous {
        return Ok(Verdict::Broken {
            seq: last + 1,
            reason: format!(
                "the chain head says {head_seq} entries but the log holds {last}: entries after {last} were removed"
            ),
        });
    }
    if let Some(beyond) = anchors.iter().map(|a| a.seq).filter(|s| *s > last).min() {
        return Ok(Verdict::Broken {
            seq: last + 1,
            reason: format!(
                "an anchor records entry {beyond} but the log ends at {last}: its tail was removed"
            ),
        });
    }
    Ok(Verdict::Intact {
        entries: last,
        anchors: anchors.len(),
    })
}

/// The anchors of `installation` in `path` (none when the file is absent).
pub fn read_anchors(path: &Path, installation: &str) -> Result<Vec<Anchor>, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::AnchorFile {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let mut anchors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || AuditError::BadAnchor {
            path: path.display().to_string(),
            line: i + 1,
        };
        let mut parts = line.split_whitespace();
        let (Some(inst), Some(seq), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        if inst != installation {
            continue;
        }
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let hash: [u8; 32] = hex::decode(hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(bad)?;
        anchors.push(Anchor { seq, hash });
    }
    Ok(anchors)
}

/// Append the chain's current head to the anchor file, unless it is empty
/// or already the last anchor there. Returns the anchor written.
pub async fn write_anchor(
    client: &impl GenericClient,
    path: &Path,
    installation: &str,
) -> Result<Option<Anchor>, AuditError> {
    let head = client
        .query_one("SELECT seq, hash FROM tenantry.audit_head", &[])
        .await?;
    let seq: i64 = head.get(0);
    let hash: Vec<u8> = head.get(1);
    if seq == 0 {
        return Ok(None);
    }
    let existing = read_anchors(path, installation)?;
    if existing.last().map(|a| a.seq) == Some(seq) {
        return Ok(None);
    }
    let io = |source| AuditError::AnchorFile {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    // One write per line: appends from several processes never interleave.
    let line = format!(
        "{installation} {seq} {} {}\n",
        hex::encode(&hash),
        timestamp(Utc::now())
    );
    file.write_all(line.as_bytes()).map_err(io)?;
    file.sync_data().map_err(io)?;
    Ok(Some(Anchor {
        seq,
        hash: hash.try_into().expect("the head's hash is 32 bytes"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_keyed_and_opaque() {
        let a = Pseudonyms::from_secret(b"one secret, long enough to be a key");
        let b = Pseudonyms::from_secret(b"another secret, long enough as well");
        let id = Uuid::new_v4();
        assert_eq!(a.user(id), a.user(id));
        assert_ne!(a.user(id), b.user(id));
        assert!(!a.user(id).contains(&id.simple().to_string()[..8]));
        assert_eq!(a.user(id).len(), 2 + 24);
    }

    #[test]
    fn actions_round_trip_their_names() {
        for action in [
            Action::Register,
            Action::RefreshTokenReuse,
            Action::TenantErased,
        ] {
            assert_eq!(Action::parse(action.as_str()), Some(action));
        }
        assert_eq!(Action::parse("nope"), None);
    }

    #[test]
    fn the_chain_hash_covers_previous_seq_and_entry() {
        let h1 = chain_hash(&[0; 32], 1, "{}");
        assert_ne!(h1, chain_hash(&[0; 32], 2, "{}"));
        assert_ne!(h1, chain_hash(&[1; 32], 1, "{}"));
        assert_ne!(h1, chain_hash(&[0; 32], 1, "{ }"));
    }
}
