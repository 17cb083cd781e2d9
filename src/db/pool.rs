//! The request pool: how connections are made, how long they live, and what
//! a connection that ran tenant SQL must shed before it is used again.

use std::time::{Duration, Instant};

use deadpool_postgres::{
    Connect, Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;
use tokio_postgres::NoTls;

use crate::db::DbError;
use crate::embedded::{self, Cluster};

macro_rules! session_reset {
    () => {
        "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
         SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; \
         SELECT count(*) AS leaked FROM pg_prepared_statements WHERE from_sql;"
    };
}

/// Every piece of session state that SQL running on a connection can leave
/// behind: cursors, `SET` (also `SET ROLE` / `SET SESSION AUTHORIZATION`,
/// which `RESET ALL` skips), `LISTEN`, session advisory locks, temp tables
/// and cached sequence values. deadpool's `Clean`, sent by us in the same
/// message as `COMMIT` (no extra round trip) instead of on every checkout.
/// Prepared statements are kept (the statement cache's are needed); the last
/// statement counts those made by SQL `PREPARE` (templates may not, see
/// `tenancy::lint`, but a function could), and a connection with any is
/// closed instead of going back (`routing::TenantTx`).
pub const SESSION_RESET: &str = session_reset!();

/// The end of a routed transaction: commit, then [`SESSION_RESET`], in one
/// message. A commit that fails (an aborted transaction) still ends it.
pub const COMMIT_AND_RESET: &str = concat!("COMMIT; ", session_reset!());

/// How long a pooled connection lives. A backend keeps every relation it has
/// touched in its caches for good (~35 KB per tenant provisioned, measured by
/// `scripts/bench-provision`; ~23 KB per table read, BASELINES.md), so a
/// connection that wanders over thousands of tenants would grow without
/// bound: it is replaced after `max_uses` checkouts (which bounds the
/// distinct tenants it can have touched) or `max_age`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_uses: usize,
    pub max_age: Duration,
}

impl Default for ConnectionLimits {
    /// About 2,000 checkouts (spread ±50% per connection, see [`pool_with`]):
    /// a backend caches at most that many tenants' relations, ~20 KB each
    /// for a quick-summary read (~40 MB per connection at worst; measured
    /// by `scripts/bench-routing`). Retiring sooner costs tail latency: a
    /// fresh backend reads its catalogs cold (at 500 uses p99 was 285 ms
    /// against 38 ms without retirement, same run).
    fn default() -> Self {
        ConnectionLimits {
            max_uses: 2000,
            max_age: Duration::from_secs(30 * 60),
        }
    }
}

impl ConnectionLimits {
    /// This connection's limit when spread: `max_uses` scaled into
    /// [½, 1½)× from when the connection was made, so that connections
    /// opened together are not all replaced together (a burst of cold
    /// backends).
    fn spread_uses(&self, created: Instant) -> usize {
        let spread = created.duration_since(*EPOCH).subsec_nanos() as usize % self.max_uses.max(1);
        (self.max_uses / 2 + spread).max(1)
    }
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// How connections reach their `max_uses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// At exactly `max_uses` checkouts.
    Exactly,
    /// At a limit spread around `max_uses` per connection (the service).
    Spread,
}

/// Where new connections go.
#[derive(Debug, Clone)]
pub enum PortSource {
    /// The configured address, always.
    Fixed,
    /// The embedded cluster's address as it is now: after a `db stop` /
    /// `db start` it may listen on another port (and so another socket
    /// file), which a fixed config would never find.
    Cluster(Cluster),
}

struct Connector {
    ports: PortSource,
}

impl Connect for Connector {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = match &self.ports {
            PortSource::Cluster(cluster) => {
                let user = pg_config.get_user().unwrap_or(embedded::SERVICE_ROLE);
                let dbname = pg_config.get_dbname().unwrap_or(embedded::DATABASE_NAME);
                // While the server is down, the old address fails fast.
                cluster
                    .current_config(dbname, user)
                    .unwrap_or_else(|| pg_config.clone())
            }
            PortSource::Fixed => pg_config.clone(),
        };
        Box::pin(async move {
            let (client, connection) = config.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "pooled connection closed");
                }
            });
            Ok((client, task))
        })
    }
}

/// A pool on a fixed address.
pub fn pool(
    config: tokio_postgres::Config,
    size: usize,
    limits: ConnectionLimits,
) -> Result<Pool, DbError> {
    pool_with(config, size, limits, PortSource::Fixed, Retire::Exactly)
}

/// The service's pool. `Fast` recycling (is the socket open?) is enough
/// because nothing session-level stays on a connection that goes back:
/// routing is transaction-local (`routing::TenantTx`), and every path that
/// runs tenant SQL ends with [`SESSION_RESET`]; a connection whose
/// transaction did not end cleanly is discarded, never returned.
/// Requests fail fast while the database is down: connecting is bounded
/// by `create_timeout`, waiting for a free connection by `wait_timeout`.
pub fn pool_with(
    config: tokio_postgres::Config,
    size: usize,
    limits: ConnectionLimits,
    ports: PortSource,
    retire: Retire,
) -> Result<Pool, DbError> {
    std::sync::LazyLock::force(&EPOCH);
    let mut config = config;
    if config.get_application_name().is_none() {
        // What operators (and scripts/bench-routing) find it by.
        config.application_name("tenantry");
    }
    let manager = Manager::from_connect(
        config,
        Connector { ports },
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(3)))
        .recycle_timeout(Some(Duration::from_secs(3)))
        .pre_recycle(Hook::sync_fn(move |_, metrics| {
            let uses = match retire {
                Retire::Exactly => limits.max_uses,
                Retire::Spread => limits.spread_uses(metrics.created),
            };
            if metrics.recycle_count + 1 >= uses || metrics.age() >= limits.max_age {
                // Discarded; the pool opens a fresh connection instead.
                Err(HookError::message("connection retired"))
            } else {
                Ok(())
            }
        }))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}
