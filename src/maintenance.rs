//! What `serve` does in the background, every `TENANTRY_MAINTENANCE_INTERVAL`
//! (and once at start): purge what has expired (refresh tokens, login
//! throttle rows, signup idempotency keys), anchor the audit chain to the
//! anchor file, forget idle rate-limit state, purge delivered mail after
//! its retention and expired account tokens, erase the accounts that never
//! verified their address (`TENANTRY_UNVERIFIED_TTL`), on Citus sweep
//! what a killed signup left (`provisioning::sweep_pending`), and every
//! `TENANTRY_USAGE_INTERVAL` measure every tenant's usage against its quota
//! (`tenancy::usage`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::api::middleware::RateLimits;
use crate::api::AppState;

/// How many rows each purge removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub refresh_tokens: u64,
    pub login_throttle: u64,
    pub idempotency_keys: u64,
    pub account_tokens: u64,
    /// Rate-limit buckets that are full again.
    pub rate_limits: u64,
}

/// Delete expired rows. Refresh tokens go once expired: an expired token is
/// refused anyway, and its family's history is not needed to detect reuse
/// of a token that can no longer be used.
pub async fn purge_expired(client: &impl GenericClient) -> Result<Purged, tokio_postgres::Error> {
    let refresh_tokens = client
        .execute(
            "DELETE FROM tenantry.refresh_tokens WHERE expires_at < now()",
            &[],
        )
        .await?;
    // On Citus, the guard's record of those sessions' revocations too.
    crate::db::citus::forget_revoked(client).await?;
    let login_throttle = client
        .execute(
            "DELETE FROM tenantry.login_throttle
             WHERE window_start < now() - interval '1 day'
               AND (locked_until IS NULL OR locked_until < now() - interval '1 day')",
            &[],
        )
        .await?;
    let idempotency_keys = client
        .execute(
            "DELETE FROM tenantry.idempotency_keys WHERE created_at < now() - interval '24 hours'",
            &[],
        )
        .await?;
    let account_tokens = client
        .execute(
            "DELETE FROM tenantry.account_tokens WHERE expires_at < now()",
            &[],
        )
        .await?;
    let rate_limits = client
        .execute("DELETE FROM tenantry.rate_limits WHERE tat < now()", &[])
        .await?;
    Ok(Purged {
        refresh_tokens,
        login_throttle,
        idempotency_keys,
        account_tokens,
        rate_limits,
    })
}

/// Accounts whose address was never verified within `ttl`: their names,
/// at most 100 per round (the next round takes the rest).
async fn unverified(
    client: &impl GenericClient,
    ttl: Duration,
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT u.username FROM tenantry.users u
               JOIN tenantry.tenants t ON t.user_id = u.id
              WHERE u.email_verified_at IS NULL AND u.role = 'user' AND u.suspended_at IS NULL
                AND u.created_at < now() - make_interval(secs => $1)
                AND t.status = 'active'
              ORDER BY u.created_at LIMIT 100",
            &[&ttl.as_secs_f64()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Erase the accounts that never verified their address (the normal
/// audited erasure, each with its receipt in the log); how many.
pub async fn erase_unverified(state: &AppState, ttl: Duration) -> usize {
    let names = match state.pool.get().await {
        Ok(client) => match unverified(&**client, ttl).await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for unverified accounts");
                return 0;
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for unverified accounts");
            return 0;
        }
    };
    let mut erased = 0;
    for name in names {
        let Ok(username) = crate::domain::Username::parse(&name) else {
            continue;
        };
        let requester = crate::tenancy::erasure::Requester {
            actor: "maintenance".into(),
            client: None,
            reason: "email_unverified",
            only_unverified: true,
        };
        use crate::tenancy::erasure::{erase, ErasureError};
        let mut client = match state.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "erasing unverified accounts: no connection; next round retries");
                break;
            }
        };
        let outcome = erase(
            &mut client,
            &username,
            &state.pseudonyms,
            &requester,
            Duration::from_secs(5),
        )
        .await;
        match outcome {
            Ok(receipt) => {
                erased += 1;
                state.letters.forget_files(&receipt.mail);
                tracing::info!(
                    audit_entry = receipt.audit_entry,
                    rows = receipt.rows,
                    tables = receipt.tables.len(),
                    sessions_revoked = receipt.sessions_revoked,
                    "erased an account whose address was never verified"
                );
            }
            // Verified or suspended since it was picked: kept.
            Err(ErasureError::Kept) => {}
            Err(e) => {
                tracing::warn!(error = %e, "erasing an unverified account failed; next round retries")
            }
        }
    }
    erased
}

/// Measure every tenant's usage ([`crate::tenancy::usage::measure`]) and
/// log who crossed a quota.
pub async fn measure_usage(state: &AppState) {
    let started = std::time::Instant::now();
    // A connection of its own, closed after: measuring opens every tenant
    // relation, and a pooled backend would keep them all in its caches.
    let mut client = match state.connector.connect(crate::db::Dedicated::Usage).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "measuring the tenants' usage skipped: no connection");
            return;
        }
    };
    match crate::tenancy::usage::measure(
        &mut client,
        state.installation.citus,
        None,
        state.tenant_quota_bytes,
    )
    .await
    {
        Ok(None) => tracing::info!("another process is measuring the tenants' usage"),
        Ok(Some(m)) => {
            tracing::info!(
                tenants = m.tenants,
                bytes = m.bytes,
                ms = started.elapsed().as_millis() as u64,
                "measured the tenants' usage"
            );
            for name in &m.now_over {
                tracing::warn!(tenant = %state.pseudonyms.name(name), "a tenant is over its quota: its writes are refused");
            }
            for name in &m.now_under {
                tracing::info!(tenant = %state.pseudonyms.name(name), "a tenant is back under its quota");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "measuring the tenants' usage failed; it is tried again after the interval")
        }
    }
}

/// Start the background loop (it ends with the runtime).
pub fn spawn(
    state: Arc<AppState>,
    limits: Arc<RateLimits>,
    anchor_file: PathBuf,
    interval: Duration,
    mail: crate::configuration::MailSettings,
    usage_interval: Option<Duration>,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_usage: Option<tokio::time::Instant> = None;
        loop {
            ticker.tick().await;
            limits.forget_idle();
            let mut client = match state.pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "maintenance skipped: no database connection");
                    continue;
                }
            };
            // A version published elsewhere: metrics and the next signup use it.
            if let Err(e) = state.templates.refresh(&**client).await {
                tracing::warn!(error = %e, "cannot read the published templates");
            }
            match purge_expired(&**client).await {
                Ok(p) if p != Purged::default() => tracing::info!(
                    refresh_tokens = p.refresh_tokens,
                    login_throttle = p.login_throttle,
                    idempotency_keys = p.idempotency_keys,
                    account_tokens = p.account_tokens,
                    rate_limits = p.rate_limits,
                    "purged expired rows"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "purging expired rows failed"),
            }
            match crate::webhooks::purge(&mut client, mail.retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "purged webhook events past their retention"),
                Err(e) => tracing::warn!(error = %e, "purging webhook events failed"),
            }
            match crate::mail::delivery::purge_delivered(&**client, mail.retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(mails = n, "purged delivered mail past its retention"),
                Err(e) => tracing::warn!(error = %e, "purging delivered mail failed"),
            }
            if state.installation.citus {
                match crate::provisioning::sweep_pending(&client).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(signups = n, "swept what killed signups left"),
                    Err(e) => tracing::warn!(error = %e, "sweeping killed signups failed"),
                }
            }
            if let Err(e) =
                crate::audit::write_anchor(&**client, &anchor_file, state.installation.id.as_str())
                    .await
            {
                tracing::warn!(error = %crate::api::error::cause_chain(&e), "cannot anchor the audit chain");
            }
            // Due when the newest measurement (by any process, before a
            // restart too) is older than the interval: a restart does not
            // measure the whole fleet again at once.
            // One try per interval in this process, whatever came of it.
            let usage_due = match usage_interval {
                Some(every) if last_usage.is_none_or(|at| at.elapsed() >= every) => {
                    crate::tenancy::usage::due(&**client, every)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "cannot read when usage was last measured");
                            false
                        })
                }
                _ => false,
            };
            // Each erasure takes connections of its own: this one goes back.
            drop(client);
            if usage_due {
                last_usage = Some(tokio::time::Instant::now());
                measure_usage(&state).await;
            }
            if let Some(ttl) = mail.unverified_ttl {
                erase_unverified(&state, ttl).await;
            }
        }
    });
}
