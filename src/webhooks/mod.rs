//! Webhooks: lifecycle events for integrators, in the Standard Webhooks
//! format (<https://www.standardwebhooks.com>).
//!
//! An event is written by [`record`] in the transaction of the change it
//! reports (a signup, an erasure, …): a rolled-back change sends nothing, a
//! committed one always has its row (none at all when no endpoint wants its
//! type). `serve` expands it to one delivery per endpoint and sends them
//! ([`delivery`]) at least once, in order per tenant.
//! Endpoints are added by admins (`tenantry webhooks add`, `POST
//! /admin/webhooks`), each with a secret of its own, shown once.

pub mod delivery;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::audit::{Action, Entry};
use crate::tenancy::suspension::ChangedBy;

/// What happened. The wire names are the contract's (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum EventType {
    #[serde(rename = "tenant.created")]
    TenantCreated,
    #[serde(rename = "tenant.email_verified")]
    TenantEmailVerified,
    #[serde(rename = "tenant.suspended")]
    TenantSuspended,
    #[serde(rename = "tenant.resumed")]
    TenantResumed,
    #[serde(rename = "tenant.migrated")]
    TenantMigrated,
    #[serde(rename = "tenant.erased")]
    TenantErased,
    #[serde(rename = "tenant.quota_exceeded")]
    TenantQuotaExceeded,
    #[serde(rename = "fleet.run_finished")]
    FleetRunFinished,
}

impl EventType {
    pub const ALL: [EventType; 8] = [
        EventType::TenantCreated,
        EventType::TenantEmailVerified,
        EventType::TenantSuspended,
        EventType::TenantResumed,
        EventType::TenantMigrated,
        EventType::TenantErased,
        EventType::TenantQuotaExceeded,
        EventType::FleetRunFinished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::TenantCreated => "tenant.created",
            EventType::TenantEmailVerified => "tenant.email_verified",
            EventType::TenantSuspended => "tenant.suspended",
            EventType::TenantResumed => "tenant.resumed",
            EventType::TenantMigrated => "tenant.migrated",
            EventType::TenantErased => "tenant.erased",
            EventType::TenantQuotaExceeded => "tenant.quota_exceeded",
            EventType::FleetRunFinished => "fleet.run_finished",
        }
    }

    pub fn parse(raw: &str) -> Result<EventType, String> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == raw.trim())
            .ok_or_else(|| {
                let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown event type {raw:?} (known: {})", known.join(", "))
            })
    }
}

/// Write an event (`$1` msg id, `$2` type, `$3` tenant, `$4` data): one
/// row, and none when no endpoint wants the type. No endpoint is locked
/// and no delivery written here: the sender expands the event to the
/// endpoints that want it when it becomes visible ([`delivery`]), so a
/// change pays one insert for its event, however many endpoints there are.
///
/// Per-tenant order: a change that records a tenant's event has locked the
/// tenant's registry rows it changes (a suspension waits for a signup, a
/// resume for the suspension, an erasure for both), so the later of two
/// such events takes the later number, and the sender expands events
/// oldest first as they become visible.
pub const RECORD: &str = "INSERT INTO tenantry.events (msg_id, type, tenant, data)
 SELECT $1, $2, $3, $4
 WHERE EXISTS (SELECT FROM tenantry.webhooks WHERE event_types IS NULL OR $2 = ANY (event_types))";

/// One event, before it is written.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventType,
    /// The tenant's user id (orders its events); `None` for fleet events.
    pub tenant: Option<Uuid>,
    pub data: serde_json::Value,
    msg_id: Uuid,
    /// `kind`'s wire name, held for [`Event::params`].
    type_name: &'static str,
}

impl Event {
    pub fn new(kind: EventType, tenant: Option<Uuid>, data: serde_json::Value) -> Event {
        Event {
            kind,
            tenant,
            data,
            msg_id: Uuid::new_v4(),
            type_name: kind.as_str(),
        }
    }

    /// An event about tenant `user_id` named `username`, with more `data`.
    pub fn tenant(
        kind: EventType,
        user_id: Uuid,
        username: &str,
        mut data: serde_json::Value,
    ) -> Event {
        if let Some(fields) = data.as_object_mut() {
            fields.insert("user_id".into(), user_id.to_string().into());
            fields.insert("username".into(), username.into());
        }
        Event::new(kind, Some(user_id), data)
    }

    /// [`RECORD`]'s parameter types.
    pub const TYPES: [tokio_postgres::types::Type; 4] = [
        tokio_postgres::types::Type::UUID,
        tokio_postgres::types::Type::TEXT,
        tokio_postgres::types::Type::UUID,
        tokio_postgres::types::Type::JSONB,
    ];

    /// [`RECORD`]'s parameters, for a statement prepared with [`Event::TYPES`].
    pub fn values(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 4] {
        [&self.msg_id, &self.type_name, &self.tenant, &self.data]
    }

    /// [`RECORD`]'s parameters, typed (for a pipelined request).
    pub fn params(
        &self,
    ) -> [(
        &(dyn tokio_postgres::types::ToSql + Sync),
        tokio_postgres::types::Type,
    ); 4] {
        use tokio_postgres::types::Type;
        [
            (&self.msg_id, Type::UUID),
            (&self.type_name, Type::TEXT),
            (&self.tenant, Type::UUID),
            (&self.data, Type::JSONB),
        ]
    }
}

/// Write `event` in the caller's transaction.
pub async fn record(
    client: &impl GenericClient,
    event: &Event,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            RECORD,
            &[
                &event.msg_id,
                &event.kind.as_str(),
                &event.tenant,
                &event.data,
            ],
        )
        .await
        .map(drop)
}

type HmacSha256 = Hmac<Sha256>;

/// `webhook-signature` for a message: `v1,` + base64 of HMAC-SHA256 of
/// `id.timestamp.body` keyed with the secret's bytes (after `whsec_`).
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").ok_or("not a whsec_ secret")?)
        .map_err(|e| format!("the secret is not base64: {e}"))?;
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", b64.encode(mac.finalize().into_bytes())))
}

/// A new endpoint secret: `whsec_` + base64 of 32 random bytes.
fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// An endpoint's URL, checked: http(s), a host, no credentials in it.
pub fn parse_url(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{raw:?}: only http:// and https:// endpoints are supported"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{raw:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{raw:?}: put no credentials in the URL; receivers check the signature"
        ));
    }
    if url.as_str().len() > 2000 {
        return Err("the URL is longer than 2,000 characters".into());
    }
    Ok(url.to_string())
}

/// One endpoint as admins see it (never its secret, after it was added).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: i64,
    pub url: String,
    /// The event types it gets; null: every type.
    pub events: Option<Vec<String>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Deliveries not yet made (being retried, or waiting for an earlier
    /// event of the same tenant).
    pub pending: i64,
    /// Deliveries given up on after every attempt (`webhooks retry`).
    pub dead: i64,
}

const ENDPOINTS: &str = "SELECT w.id, w.url, w.event_types, w.created_at,
        count(d.event_id) FILTER (WHERE d.delivered_at IS NULL AND d.dead_at IS NULL)
          + (SELECT count(*) FROM tenantry.events e
             WHERE NOT e.expanded AND (w.event_types IS NULL OR e.type = ANY (w.event_types))) AS pending,
        count(d.event_id) FILTER (WHERE d.dead_at IS NOT NULL) AS dead
 FROM tenantry.webhooks w LEFT JOIN tenantry.webhook_deliveries d ON d.webhook_id = w.id
 WHERE $1::int8 IS NULL OR w.id = $1
 GROUP BY w.id ORDER BY w.id";

fn endpoint_of(row: &tokio_postgres::Row) -> Endpoint {
    Endpoint {
        id: row.get("id"),
        url: row.get("url"),
        events: row.get("event_types"),
        created_at: row.get("created_at"),
        pending: row.get("pending"),
        dead: row.get("dead"),
    }
}

/// Every endpoint (or one).
pub async fn endpoints(
    client: &impl GenericClient,
    only: Option<i64>,
) -> Result<Vec<Endpoint>, tokio_postgres::Error> {
    Ok(client
        .query(ENDPOINTS, &[&only])
        .await?
        .iter()
        .map(endpoint_of)
        .collect())
}

/// Register an endpoint for `events` (`None`: every type); it and its
/// secret, which is shown only now. Audited (`webhook_added`: the
/// endpoint's id and host, never its path or query) as `by`.
pub async fn add(
    client: &mut tokio_postgres::Client,
    url: &str,
    events: Option<&[EventType]>,
    by: &ChangedBy,
) -> Result<(Endpoint, String), tokio_postgres::Error> {
    let secret = new_secret();
    let types: Option<Vec<&str>> = events.map(|e| e.iter().map(|t| t.as_str()).collect());
    let tx = client.transaction().await?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO tenantry.webhooks (url, secret, event_types) VALUES ($1, $2, $3) RETURNING id",
            &[&url, &secret, &types],
        )
        .await?
        .get(0);
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned));
    audited(
        &tx,
        Entry::new(Action::WebhookAdded)
            .detail("endpoint", id)
            .detail("host", host)
            .detail("events", &types),
        by,
    )
    .await?;
    let endpoint = endpoints(&tx, Some(id)).await?.pop().expect("just added");
    tx.commit().await?;
    Ok((endpoint, secret))
}

/// Remove an endpoint and its deliveries (audited, `webhook_removed`);
/// whether there was one.
pub async fn remove(
    client: &mut tokio_postgres::Client,
    id: i64,
    by: &ChangedBy,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if tx
        .execute("DELETE FROM tenantry.webhooks WHERE id = $1", &[&id])
        .await?
        == 0
    {
        return Ok(false);
    }
    audited(
        &tx,
        Entry::new(Action::WebhookRemoved).detail("endpoint", id),
        by,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Make the dead deliveries (of endpoint `id`, or all) due again, each in
/// its place in its queue (audited, `webhook_deliveries_retried`); how
/// many, or `None` if there is no endpoint `id`.
pub async fn retry(
    client: &mut tokio_postgres::Client,
    id: Option<i64>,
    by: &ChangedBy,
) -> Result<Option<u64>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if let Some(id) = id {
        if endpoints(&tx, Some(id)).await?.is_empty() {
            return Ok(None);
        }
    }
    let n = delivery::retry_dead(&tx, id).await?;
    audited(
        &tx,
        Entry::new(Action::WebhookDeliveriesRetried)
            .detail("endpoint", id)
            .detail("deliveries", n),
        by,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(n))
}

async fn audited(
    client: &impl GenericClient,
    entry: Entry,
    by: &ChangedBy,
) -> Result<(), tokio_postgres::Error> {
    crate::audit::append(
        client,
        &entry.actor(by.actor.clone()).client(by.client.clone()),
    )
    .await
}

/// One delivery of an event to an endpoint.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The `webhook-id` the receiver sees.
    pub msg_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// `delivered`, `pending` or `dead`.
    pub state: String,
    pub attempts: i32,
    /// When it is sent next; null once delivered or dead, and while it
    /// waits for an earlier event of its tenant to be delivered (or dead).
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The receiver's last HTTP status, if it answered.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
}

/// An endpoint's latest deliveries, newest first (`None`: no such endpoint).
pub async fn deliveries(
    client: &impl GenericClient,
    id: i64,
    limit: i64,
) -> Result<Option<Vec<Delivery>>, tokio_postgres::Error> {
    if endpoints(client, Some(id)).await?.is_empty() {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT 'msg_' || replace(e.msg_id::text, '-', '') AS msg_id, e.type, e.created_at,
                    CASE WHEN d.delivered_at IS NOT NULL THEN 'delivered'
                         WHEN d.dead_at IS NOT NULL THEN 'dead' ELSE 'pending' END AS state,
                    d.attempts,
                    CASE WHEN d.delivered_at IS NULL AND d.dead_at IS NULL AND d.next_attempt_at <> 'infinity'
                         THEN d.next_attempt_at END AS next_attempt_at,
                    d.delivered_at, d.last_status, d.last_error
             FROM tenantry.webhook_deliveries d JOIN tenantry.events e ON e.id = d.event_id
             WHERE d.webhook_id = $1 ORDER BY d.event_id DESC LIMIT $2",
            &[&id, &limit],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .map(|r| Delivery {
                msg_id: r.get("msg_id"),
                kind: r.get("type"),
                created_at: r.get("created_at"),
                state: r.get("state"),
                attempts: r.get("attempts"),
                next_attempt_at: r.get("next_attempt_at"),
                delivered_at: r.get("delivered_at"),
                last_status: r.get("last_status"),
                last_error: r.get("last_error"),
            })
            .collect(),
    ))
}

/// Forget events older than `retention` that no endpoint still waits for
/// (every delivery delivered or dead, or none left): their data, the
/// erased tenant's name and id among them. How many.
pub async fn purge(
    client: &mut tokio_postgres::Client,
    retention: std::time::Duration,
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // A purge takes dead deliveries away from their queues: not while a
    // retry may be making them heads again (the next round purges).
    if !delivery::lock_queues(&tx).await? {
        return Ok(0);
    }
    let purged = tx
        .execute(
            "DELETE FROM tenantry.events e
              WHERE e.created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                AND e.expanded
                AND NOT EXISTS (SELECT FROM tenantry.webhook_deliveries d
                                WHERE d.event_id = e.id AND d.delivered_at IS NULL AND d.dead_at IS NULL)",
            &[&retention.as_secs_f64()],
        )
        .await?;
    tx.commit().await?;
    Ok(purged)
}

/// Deliveries not delivered: (pending, dead), for `/metrics`. Pending
/// counts an event not yet expanded as one.
pub async fn backlog(client: &impl GenericClient) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL)
                    + (SELECT count(*) FROM tenantry.events WHERE NOT expanded),
                    count(*) FILTER (WHERE dead_at IS NOT NULL)
             FROM tenantry.webhook_deliveries WHERE delivered_at IS NULL",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn endpoints_are_http_urls_without_credentials() {
        assert!(parse_url("https://example.com/hooks").is_ok());
        assert!(parse_url("http://127.0.0.1:9000/x").is_ok());
        for bad in [
            "ftp://example.com",
            "not a url",
            "https://user:pw@example.com/",
            "file:///etc/passwd",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn event_types_parse_by_their_wire_names() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Ok(t));
        }
        assert!(EventType::parse("tenant.nope").is_err());
    }
}
