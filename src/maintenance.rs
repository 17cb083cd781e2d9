//! What `serve` does in the background, every `TENANTRY_MAINTENANCE_INTERVAL`
//! (and once at start): purge what has expired (refresh tokens, login
//! throttle rows, signup idempotency keys), anchor the audit chain to the
//! anchor file, forget idle rate-limit state, and on Citus sweep what a
//! killed signup left (`provisioning::sweep_pending`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::api::middleware::RateLimits;
use crate::startup::AppState;

/// How many rows each purge removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub refresh_tokens: u64,
    pub login_throttle: u64,
    pub idempotency_keys: u64,
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
    Ok(Purged {
        refresh_tokens,
        login_throttle,
        idempotency_keys,
    })
}

/// Start the background loop (it ends with the runtime).
pub fn spawn(
    state: Arc<AppState>,
    limits: Arc<RateLimits>,
    anchor_file: PathBuf,
    interval: Duration,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            limits.forget_idle();
            let client = match state.pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "maintenance skipped: no database connection");
                    continue;
                }
            };
            match purge_expired(&**client).await {
                Ok(p) if p != Purged::default() => tracing::info!(
                    refresh_tokens = p.refresh_tokens,
                    login_throttle = p.login_throttle,
                    idempotency_keys = p.idempotency_keys,
                    "purged expired rows"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "purging expired rows failed"),
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
        }
    });
}
