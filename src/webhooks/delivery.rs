//! Sending webhook deliveries: `serve` claims the due ones, POSTs each to
//! its endpoint, signed (Standard Webhooks), and records what happened.
//!
//! - At least once: a delivery is marked delivered only after a 2xx, and a
//!   claim that outlives its sender (killed mid-send) runs out, so another
//!   process sends it again. Never twice at once: a claim is an UPDATE of
//!   rows picked with `FOR UPDATE SKIP LOCKED`.
//! - In order per tenant and endpoint: a delivery is due only when no
//!   earlier event of the same tenant is still undelivered (and not dead)
//!   for that endpoint, and none of the tenant's is being sent to it. A
//!   dead delivery no longer holds the later ones back, so one made due
//!   again (`webhooks retry`) arrives after them.
//! - A failure (no answer within `TENANTRY_WEBHOOK_TIMEOUT`, a non-2xx, a
//!   redirect, which is not followed) is retried with exponential backoff
//!   and jitter; after `TENANTRY_WEBHOOK_MAX_ATTEMPTS` the delivery is dead
//!   (`webhooks deliveries ID`, `/metrics`, `webhooks retry`).

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::configuration::WebhookSettings;

/// The `application_name` of the sender's session.
pub const SESSION: &str = crate::db::WEBHOOKS_SESSION;

/// Deliveries claimed at once (sent concurrently).
const BATCH: i64 = 20;
/// How often the outbox is looked at when nothing was due.
const POLL: Duration = Duration::from_millis(500);

/// Claim what is due (`$1` claimer, `$2` claim seconds, `$3` how many).
const CLAIM: &str = "WITH due AS (
    SELECT d.webhook_id, d.event_id
    FROM tenantry.webhook_deliveries d JOIN tenantry.events e ON e.id = d.event_id
    WHERE d.delivered_at IS NULL AND d.dead_at IS NULL
      AND d.next_attempt_at <= pg_catalog.now()
      AND (d.claimed_until IS NULL OR d.claimed_until < pg_catalog.now())
      AND NOT EXISTS (
          SELECT FROM tenantry.webhook_deliveries d2 JOIN tenantry.events e2 ON e2.id = d2.event_id
          WHERE d2.webhook_id = d.webhook_id AND e2.tenant = e.tenant AND e2.id <> e.id
            AND ((e2.id < e.id AND d2.delivered_at IS NULL AND d2.dead_at IS NULL)
                 OR d2.claimed_until > pg_catalog.now()))
    ORDER BY d.event_id
    LIMIT $3
    FOR UPDATE OF d SKIP LOCKED)
 UPDATE tenantry.webhook_deliveries d
    SET claimed_by = $1, claimed_until = pg_catalog.now() + pg_catalog.make_interval(secs => $2),
        attempts = d.attempts + 1
   FROM due, tenantry.events e, tenantry.webhooks w
  WHERE d.webhook_id = due.webhook_id AND d.event_id = due.event_id
    AND e.id = d.event_id AND w.id = d.webhook_id
 RETURNING d.webhook_id, d.event_id, d.attempts, w.url, w.secret,
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
        })
    }

    /// Deliver until the runtime ends.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.deliver_due().await {
                    Ok(n) if n as i64 == BATCH => continue,
                    Ok(_) => {}
                    Err(e) => {
                        self.client = None;
                        tracing::warn!(error = %e, "webhook delivery skipped")
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
    }

    /// Claim what is due, send it, record the outcomes; how many were
    /// claimed.
    async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        self.connector
            .kept(&mut self.client, crate::db::Dedicated::Webhooks)
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn deliver_due(&mut self) -> Result<usize, String> {
        let claim_seconds = self.settings.timeout.as_secs_f64() * 2.0 + 30.0;
        let me = self.me.clone();
        let rows = self
            .client()
            .await?
            .query(CLAIM, &[&me, &claim_seconds, &BATCH])
            .await
            .map_err(|e| e.to_string())?;
        let claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| Claimed {
                webhook_id: r.get(0),
                event_id: r.get(1),
                attempts: r.get(2),
                url: r.get(3),
                secret: r.get(4),
                msg_id: r.get(5),
                kind: r.get(6),
                created_at: r.get(7),
                data: r.get(8),
            })
            .collect();
        let outcomes = futures::future::join_all(claimed.iter().map(|c| self.attempt(c))).await;
        let max_attempts = self.settings.max_attempts;
        let backoff = self.settings.backoff;
        let client = self.client().await?;
        for (c, outcome) in claimed.iter().zip(outcomes) {
            let recorded = match outcome {
                Outcome::Delivered(status) => {
                    crate::metrics::webhook("delivered");
                    client
                        .execute(
                            DELIVERED,
                            &[&c.webhook_id, &c.event_id, &me, &i32::from(status)],
                        )
                        .await
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
                                &error,
                                &dead,
                                &wait.as_secs_f64(),
                            ],
                        )
                        .await
                }
            };
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "cannot record a webhook delivery; its claim runs out and it is sent again");
            }
        }
        Ok(claimed.len())
    }

    /// POST one delivery, signed.
    async fn attempt(&self, c: &Claimed) -> Outcome {
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
        let sent = self
            .http
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
}
