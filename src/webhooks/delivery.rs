//! Sending webhook deliveries: `serve` expands new events into deliveries,
//! claims the due ones, POSTs each to its endpoint, signed (Standard
//! Webhooks), and records what happened.
//!
//! - Queues: each (endpoint, tenant) is one. Expanding an event appends a
//!   delivery to its queue, due now if the queue was empty, else waiting
//!   (`next_attempt_at` 'infinity') until the one before it is delivered or
//!   dead ([`PROMOTE`]). So one delivery per queue is ever in flight, a
//!   tenant's events arrive in order, and claiming reads only what is due
//!   (an index range), however long the queues behind a dead receiver get.
//!   Expanding (exclusive) and recording outcomes (shared) hold one
//!   advisory lock, so a queue's tail is never appended to while its head
//!   is being settled. Fleet events (no tenant) are never held back.
//! - At least once: a delivery is marked delivered only after a 2xx, and a
//!   claim that outlives its sender (killed mid-send) runs out, so another
//!   process sends it again. Never twice at once: a claim is an UPDATE of
//!   rows picked with `FOR UPDATE SKIP LOCKED`. A stopping `serve` finishes
//!   what it is sending and gives back what it had claimed.
//! - A failure (no answer within `TENANTRY_WEBHOOK_TIMEOUT`, a non-2xx, a
//!   redirect, which is not followed) is retried with exponential backoff
//!   and jitter; after `TENANTRY_WEBHOOK_MAX_ATTEMPTS` the delivery is dead
//!   (`webhooks deliveries ID`, `/metrics`, `webhooks retry`) and the next
//!   one of its queue goes.
//! - Each delivery is sent by a task of its own, at most [`IN_FLIGHT`] at
//!   once per process and [`PER_ENDPOINT`] to one endpoint: a slow receiver
//!   holds its own deliveries back, not the others'.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::configuration::WebhookSettings;
use crate::mail::delivery::{Delivering, Stop};

/// The `application_name` of the sender's session.
pub const SESSION: &str = crate::db::WEBHOOKS_SESSION;

/// Deliveries one process sends at once.
pub const IN_FLIGHT: usize = 32;
/// … of which to one endpoint.
pub const PER_ENDPOINT: usize = 8;
/// Events expanded into deliveries at once.
const EXPAND_BATCH: i64 = 1000;
/// How often the outbox is looked at when nothing happened.
const POLL: Duration = Duration::from_millis(500);

/// Held shared to settle the heads of queues (what a send came to), and
/// exclusively by what changes which deliveries a queue holds or which is
/// its head otherwise: expanding events, a retry, a purge.
const QUEUE_LOCK: (i32, i32) = (0x776864, 0); // 'whd'
pub(super) const LOCK_TO_EXPAND: &str = "SELECT pg_catalog.pg_try_advisory_xact_lock($1, $2)";
const LOCK_TO_SETTLE: &str = "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, $2)";
const LOCK_TO_RETRY: &str = "SELECT pg_catalog.pg_advisory_xact_lock($1, $2)";

/// Take [`QUEUE_LOCK`] exclusively if no one holds it (in the caller's
/// transaction): whether it was.
pub(super) async fn lock_queues(
    client: &impl GenericClient,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(LOCK_TO_EXPAND, &[&QUEUE_LOCK.0, &QUEUE_LOCK.1])
        .await?
        .get(0))
}

/// Expand the oldest unexpanded events (`$1` how many) into one delivery
/// per endpoint that wants each: the first of a queue that has nothing
/// undelivered is due now, the others wait their turn. Which endpoints get
/// an event is decided here, a moment after the change: one removed
/// meanwhile gets nothing (its row is locked, or skipped if gone). Returns
/// the events and the deliveries written.
const EXPAND: &str = "WITH ev AS (
    UPDATE tenantry.events e SET expanded = true
     WHERE e.id IN (SELECT id FROM tenantry.events WHERE NOT expanded ORDER BY id LIMIT $1)
    RETURNING e.id, e.type, e.tenant),
 pairs AS (
    SELECT w.id AS webhook_id, ev.id AS event_id, ev.tenant
    FROM ev JOIN tenantry.webhooks w ON w.event_types IS NULL OR ev.type = ANY (w.event_types)
    FOR KEY SHARE OF w),
 written AS (
    INSERT INTO tenantry.webhook_deliveries (webhook_id, event_id, tenant, next_attempt_at)
    SELECT p.webhook_id, p.event_id, p.tenant,
           CASE WHEN p.tenant IS NULL
                  OR (p.event_id = min(p.event_id) OVER (PARTITION BY p.webhook_id, p.tenant)
                      AND NOT EXISTS (
                          SELECT FROM tenantry.webhook_deliveries d
                          WHERE d.webhook_id = p.webhook_id AND d.tenant = p.tenant
                            AND d.delivered_at IS NULL AND d.dead_at IS NULL))
                THEN pg_catalog.now() ELSE 'infinity' END
    FROM pairs p
    -- Written already (by a process of the version before queues).
    ON CONFLICT (webhook_id, event_id) DO NOTHING
    RETURNING 1)
 SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM written)";

/// Make due the oldest undelivered delivery of each queue (`$1` endpoints,
/// `$2` tenants, pairwise) that has none due or in flight.
pub const PROMOTE: &str = "UPDATE tenantry.webhook_deliveries d
    SET next_attempt_at = pg_catalog.now()
   FROM unnest($1::int8[], $2::uuid[]) AS q (webhook_id, tenant),
        LATERAL (SELECT o.event_id FROM tenantry.webhook_deliveries o
                 WHERE o.webhook_id = q.webhook_id AND o.tenant = q.tenant
                   AND o.delivered_at IS NULL AND o.dead_at IS NULL
                 ORDER BY o.event_id LIMIT 1) AS oldest
  WHERE d.webhook_id = q.webhook_id AND d.event_id = oldest.event_id
    AND d.next_attempt_at = 'infinity'
    AND NOT EXISTS (SELECT FROM tenantry.webhook_deliveries o
                    WHERE o.webhook_id = q.webhook_id AND o.tenant = q.tenant
                      AND o.delivered_at IS NULL AND o.dead_at IS NULL
                      AND o.next_attempt_at <> 'infinity')";

/// Claim what is due (`$1` claimer, `$2` claim seconds, `$3` how many,
/// `$4` one endpoint id per delivery this process has in flight, `$5`
/// the most in flight to one endpoint): endpoint by endpoint, each up to
/// its room, so one at its cap costs nothing to pass over.
const CLAIM: &str = "WITH busy AS (
    SELECT f.id, count(*) AS n FROM unnest($4::int8[]) AS f (id) GROUP BY f.id),
 due AS (
    SELECT q.webhook_id, q.event_id, q.next_attempt_at
    FROM tenantry.webhooks w
    LEFT JOIN busy ON busy.id = w.id
    CROSS JOIN LATERAL (
        SELECT d.webhook_id, d.event_id, d.next_attempt_at
        FROM tenantry.webhook_deliveries d
        WHERE d.webhook_id = w.id AND d.delivered_at IS NULL AND d.dead_at IS NULL
          AND d.next_attempt_at <= pg_catalog.now()
          AND (d.claimed_until IS NULL OR d.claimed_until < pg_catalog.now())
        ORDER BY d.next_attempt_at
        LIMIT GREATEST($5 - coalesce(busy.n, 0), 0)
        FOR UPDATE OF d SKIP LOCKED) AS q
    ORDER BY q.next_attempt_at
    LIMIT $3)
 UPDATE tenantry.webhook_deliveries d
    SET claimed_by = $1, claimed_until = pg_catalog.now() + pg_catalog.make_interval(secs => $2),
        attempts = d.attempts + 1
   FROM due, tenantry.events e, tenantry.webhooks w
  WHERE d.webhook_id = due.webhook_id AND d.event_id = due.event_id
    AND e.id = d.event_id AND w.id = d.webhook_id
 RETURNING d.webhook_id, d.event_id, d.tenant, d.attempts, w.url, w.secret,
           'msg_' || replace(e.msg_id::text, '-', ''), e.type, e.created_at, e.data";

/// What a claimed delivery's attempt came to.
const DELIVERED: &str = "UPDATE tenantry.webhook_deliveries
    SET delivered_at = pg_catalog.now(), last_status = $4, last_error = NULL,
        claimed_by = NULL, claimed_until = NULL
  WHERE webhook_id = $1 AND event_id = $2 AND claimed_by = $3";
const FAILED: &str = "UPDATE tenantry.webhook_deliveries
    SET last_status = $4, last_error = $5,
        dead_at = CASE WHEN $6 THEN pg_catalog.now() END,
        next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => $7),
        claimed_by = NULL, claimed_until = NULL
  WHERE webhook_id = $1 AND event_id = $2 AND claimed_by = $3";
/// Give back what this process claimed (a stop).
const RELEASE: &str = "UPDATE tenantry.webhook_deliveries
    SET claimed_by = NULL, claimed_until = NULL, attempts = attempts - 1
  WHERE claimed_by = $1 AND delivered_at IS NULL";

/// The body every endpoint receives.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: &'a serde_json::Value,
}

struct Claimed {
    webhook_id: i64,
    event_id: i64,
    tenant: Option<Uuid>,
    attempts: i32,
    url: String,
    secret: String,
    msg_id: String,
    kind: String,
    created_at: chrono::DateTime<chrono::Utc>,
    data: serde_json::Value,
}

/// An attempt's outcome: the receiver's status, or why there was none.
enum Outcome {
    Delivered(u16),
    Failed(Option<u16>, String),
}

/// The webhook sender of one `serve` process. It has a database connection
/// of its own (`Dedicated::Webhooks`, made again when lost, under
/// `TENANTRY_EXTRA_CONNECTIONS`), so it never takes one from requests.
pub struct Sender {
    connector: crate::db::Connector,
    client: Option<crate::db::Connection>,
    http: reqwest::Client,
    settings: WebhookSettings,
    /// Who claims (`claimed_by`): this process, uniquely.
    me: String,
    /// The sends under way.
    sending: tokio::task::JoinSet<(Claimed, Outcome)>,
    /// Each send's endpoint, by task.
    endpoint_of: HashMap<tokio::task::Id, i64>,
    /// Endpoint → deliveries to it in `sending`.
    per_endpoint: HashMap<i64, usize>,
    /// Sent, not yet recorded.
    done: Vec<(Claimed, Outcome)>,
}

impl Sender {
    pub fn new(
        connector: crate::db::Connector,
        settings: &WebhookSettings,
    ) -> Result<Sender, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("Tenantry-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Sender {
            connector,
            client: None,
            http,
            settings: settings.clone(),
            me: format!("{}:{}", std::process::id(), Uuid::new_v4()),
            sending: tokio::task::JoinSet::new(),
            endpoint_of: HashMap::new(),
            per_endpoint: HashMap::new(),
            done: Vec::new(),
        })
    }

    /// How long a claim holds: the attempt's timeout and time to record
    /// it. A claim that runs out before it is recorded (a killed process)
    /// is sent again, with the same `webhook-id`.
    fn claim_seconds(&self) -> f64 {
        self.settings.timeout.as_secs_f64() + 15.0
    }

    /// Deliver until [`Delivering::stop`]: then finish the sends under way
    /// (each bounded by its timeout), record them, and give back the rest.
    pub fn spawn(mut self) -> Delivering {
        let stop = Arc::new(Stop::default());
        let asked = stop.clone();
        let claim_seconds = self.claim_seconds() as u64;
        let task = tokio::spawn(async move {
            while !asked.stopping() {
                let busy = match self.round().await {
                    Ok(busy) => busy,
                    Err(e) => {
                        self.client = None;
                        tracing::warn!(error = %e, "webhook delivery skipped");
                        false
                    }
                };
                if busy || asked.stopping() {
                    continue;
                }
                tokio::select! {
                    Some(sent) = self.sending.join_next_with_id(), if !self.sending.is_empty() => {
                        self.sent(sent)
                    }
                    _ = tokio::time::sleep(POLL) => {}
                    _ = asked.asked() => {}
                }
            }
            tracing::info!(
                sends = self.sending.len(),
                "webhook delivery stopping: letting the sends under way end"
            );
            while let Some(sent) = self.sending.join_next_with_id().await {
                self.sent(sent);
            }
            if let Err(e) = self.record().await {
                self.client = None;
                tracing::warn!(error = %e, "webhook delivery stopped; what was sent is sent again when its claim runs out");
            }
            self.release().await;
        });
        Delivering::new("webhook delivery", stop, task, claim_seconds)
    }

    /// A send task's end.
    fn sent(
        &mut self,
        sent: Result<(tokio::task::Id, (Claimed, Outcome)), tokio::task::JoinError>,
    ) {
        let id = match &sent {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some(endpoint) = self.endpoint_of.remove(&id) {
            if let Some(n) = self.per_endpoint.get_mut(&endpoint) {
                *n = n.saturating_sub(1);
            }
        }
        match sent {
            Ok((_, done)) => self.done.push(done),
            // Its claim runs out, and it is sent again.
            Err(e) => tracing::warn!(error = %e, "a webhook send task failed"),
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        self.connector
            .kept(&mut self.client, crate::db::Dedicated::Webhooks)
            .await
            .map_err(|e| e.to_string())
    }

    /// One round: record what was sent, expand new events, claim what is
    /// due and start sending it. Whether there is more to do at once.
    async fn round(&mut self) -> Result<bool, String> {
        while let Some(sent) = self.sending.try_join_next_with_id() {
            self.sent(sent);
        }
        self.record().await?;
        // What was expanded before still goes out when expanding fails.
        let expanded_all = match self.expand().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot expand webhook events into deliveries; trying again");
                true
            }
        };
        let (claimed, room) = self.claim().await?;
        Ok(!expanded_all || (room > 0 && claimed == room))
    }

    /// Expand events into deliveries, unless another process is at it;
    /// whether none are left.
    async fn expand(&mut self) -> Result<bool, String> {
        let client = self.client().await?;
        let expanded = async {
            client.batch_execute("BEGIN").await?;
            let mut events = 0;
            if lock_queues(client).await? {
                events = client.query_one(EXPAND, &[&EXPAND_BATCH]).await?.get(0);
            }
            client.batch_execute("COMMIT").await?;
            Ok::<i64, tokio_postgres::Error>(events)
        }
        .await;
        match expanded {
            Ok(events) => Ok(events < EXPAND_BATCH),
            Err(e) => {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    self.client = None;
                }
                Err(e.to_string())
            }
        }
    }

    /// Claim what is due, as far as there is room, and start sending it;
    /// how many, and the room there was.
    async fn claim(&mut self) -> Result<(usize, usize), String> {
        let room = IN_FLIGHT - self.sending.len();
        if room == 0 {
            return Ok((0, 0));
        }
        let in_flight: Vec<i64> = self
            .per_endpoint
            .iter()
            .flat_map(|(id, n)| std::iter::repeat_n(*id, *n))
            .collect();
        let (me, seconds) = (self.me.clone(), self.claim_seconds());
        let (limit, cap) = (room as i64, PER_ENDPOINT as i64);
        let rows = self
            .client()
            .await?
            .query(CLAIM, &[&me, &seconds, &limit, &in_flight, &cap])
            .await
            .map_err(|e| e.to_string())?;
        for r in &rows {
            let claimed = Claimed {
                webhook_id: r.get(0),
                event_id: r.get(1),
                tenant: r.get(2),
                attempts: r.get(3),
                url: r.get(4),
                secret: r.get(5),
                msg_id: r.get(6),
                kind: r.get(7),
                created_at: r.get(8),
                data: r.get(9),
            };
            *self.per_endpoint.entry(claimed.webhook_id).or_default() += 1;
            let endpoint = claimed.webhook_id;
            let http = self.http.clone();
            let task = self.sending.spawn(async move {
                let outcome = attempt(&http, &claimed).await;
                (claimed, outcome)
            });
            self.endpoint_of.insert(task.id(), endpoint);
        }
        Ok((rows.len(), room))
    }

    /// Record the outcomes of what was sent, and make due the next
    /// delivery of each queue whose head was delivered or died.
    async fn record(&mut self) -> Result<(), String> {
        if self.done.is_empty() {
            return Ok(());
        }
        let done = std::mem::take(&mut self.done);
        let (max_attempts, backoff, me) = (
            self.settings.max_attempts,
            self.settings.backoff,
            self.me.clone(),
        );
        let client = self.client().await?;
        let mut settled: (Vec<i64>, Vec<Uuid>) = Default::default();
        let recorded = async {
            client.batch_execute("BEGIN").await?;
            client
                .execute(LOCK_TO_SETTLE, &[&QUEUE_LOCK.0, &QUEUE_LOCK.1])
                .await?;
            for (c, outcome) in &done {
                let ended = match outcome {
                    Outcome::Delivered(status) => {
                        crate::metrics::webhook("delivered");
                        client
                            .execute(
                                DELIVERED,
                                &[&c.webhook_id, &c.event_id, &me, &i32::from(*status)],
                            )
                            .await?;
                        true
                    }
                    Outcome::Failed(status, error) => {
                        let dead = c.attempts as u32 >= max_attempts;
                        crate::metrics::webhook(if dead { "dead" } else { "failed_attempt" });
                        let wait = crate::mail::delivery::backoff(
                            backoff,
                            c.attempts as u32,
                            rand::random_range(0.5..1.5),
                        );
                        tracing::warn!(
                            endpoint = c.webhook_id,
                            msg_id = %c.msg_id,
                            attempt = c.attempts,
                            status = status.map(i32::from),
                            error = %error,
                            dead,
                            "a webhook delivery failed"
                        );
                        client
                            .execute(
                                FAILED,
                                &[
                                    &c.webhook_id,
                                    &c.event_id,
                                    &me,
                                    &status.map(i32::from),
                                    error,
                                    &dead,
                                    &wait.as_secs_f64(),
                                ],
                            )
                            .await?;
                        dead
                    }
                };
                if let (true, Some(tenant)) = (ended, c.tenant) {
                    settled.0.push(c.webhook_id);
                    settled.1.push(tenant);
                }
            }
            if !settled.0.is_empty() {
                client.execute(PROMOTE, &[&settled.0, &settled.1]).await?;
            }
            client.batch_execute("COMMIT").await
        }
        .await;
        recorded.map_err(|e| {
            format!("cannot record webhook deliveries (their claims run out and they are sent again): {e}")
        })
    }

    /// Give back what this process claimed and did not send, for another
    /// process now rather than when the claims run out.
    async fn release(&mut self) {
        let me = self.me.clone();
        let released = match self.client().await {
            Ok(client) => client
                .execute(RELEASE, &[&me])
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match released {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deliveries = n,
                "webhook delivery stopped; claims given back"
            ),
            Err(e) => tracing::warn!(error = %e, "webhook delivery stopped; its claims run out"),
        }
    }
}

/// Make dead deliveries (of endpoint `id`, or all) due again with a fresh
/// count of attempts, in their tenants' order: each queue's oldest
/// undelivered delivery becomes its head again (one being sent stays in
/// flight, and the retried follow it). How many. In the caller's
/// transaction.
pub async fn retry_dead(
    client: &impl GenericClient,
    id: Option<i64>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(LOCK_TO_RETRY, &[&QUEUE_LOCK.0, &QUEUE_LOCK.1])
        .await?;
    let rows = client
        .query(
            "UPDATE tenantry.webhook_deliveries
                SET dead_at = NULL, attempts = 0, claimed_by = NULL, claimed_until = NULL,
                    next_attempt_at = CASE WHEN tenant IS NULL THEN pg_catalog.now()
                                           ELSE 'infinity' END
              WHERE dead_at IS NOT NULL AND ($1::int8 IS NULL OR webhook_id = $1)
             RETURNING webhook_id, tenant",
            &[&id],
        )
        .await?;
    let (endpoints, tenants): (Vec<i64>, Vec<Uuid>) = rows
        .iter()
        .filter_map(|r| Some((r.get::<_, i64>(0), r.get::<_, Option<Uuid>>(1)?)))
        .unzip();
    if !endpoints.is_empty() {
        // The heads not being sent step back, so that the oldest goes first.
        client
            .execute(
                "UPDATE tenantry.webhook_deliveries d SET next_attempt_at = 'infinity'
                   FROM unnest($1::int8[], $2::uuid[]) AS q (webhook_id, tenant)
                  WHERE d.webhook_id = q.webhook_id AND d.tenant = q.tenant
                    AND d.delivered_at IS NULL AND d.dead_at IS NULL
                    AND d.next_attempt_at <> 'infinity'
                    AND (d.claimed_until IS NULL OR d.claimed_until < pg_catalog.now())",
                &[&endpoints, &tenants],
            )
            .await?;
        client.execute(PROMOTE, &[&endpoints, &tenants]).await?;
    }
    Ok(rows.len() as u64)
}

/// POST one delivery, signed.
async fn attempt(http: &reqwest::Client, c: &Claimed) -> Outcome {
    let body = match serde_json::to_vec(&Body {
        kind: &c.kind,
        timestamp: c
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        data: &c.data,
    }) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(None, e.to_string()),
    };
    let now = chrono::Utc::now().timestamp();
    let signature = match super::sign(&c.secret, &c.msg_id, now, &body) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(None, e),
    };
    let sent = http
        .post(&c.url)
        .header("content-type", "application/json")
        .header("webhook-id", &c.msg_id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => Outcome::Delivered(r.status().as_u16()),
        Ok(r) if r.status().is_redirection() => Outcome::Failed(
            Some(r.status().as_u16()),
            "a redirect (not followed: give the endpoint's final URL)".into(),
        ),
        Ok(r) => Outcome::Failed(Some(r.status().as_u16()), format!("HTTP {}", r.status())),
        Err(e) => Outcome::Failed(
            None,
            if e.is_timeout() {
                "no answer in time (TENANTRY_WEBHOOK_TIMEOUT)".into()
            } else if e.is_connect() {
                "cannot connect".into()
            } else {
                "the request failed".into()
            },
        ),
    }
}
