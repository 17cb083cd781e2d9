//! Reaching the database: the embedded cluster or `DATABASE_URL` ([`Target`]),
//! the pool ([`pool`]), the bootstrap that brings the control plane
//! (`tenantry`) and the shared reference data (`reference`) up to date
//! ([`bootstrap`]), and request pipelining ([`pipeline`]).

mod bootstrap;
pub mod citus;
mod connector;
mod direct;
mod pool;
pub mod routers;

use std::task::Poll;

use futures::future::BoxFuture;

use crate::configuration::{DatabaseTarget, Settings};
use crate::embedded::{self, Cluster, ClusterError, Running};

pub use bootstrap::{bootstrap, Installation, BOOTSTRAP_LOCK};
pub use connector::{
    Connection, Connector, Dedicated, CONNECT_TIMEOUT, EXPORT_WAIT, OUTBOX_SESSION,
    WEBHOOKS_SESSION,
};
pub use direct::{Direct, Node};
pub use pool::{
    pool, pool_with, Checkout, CheckoutError, ConnectionLimits, OnNode, PortSource, RequestPool,
    Retire, TenantPool, AFFINITY_POLL, AFFINITY_WAIT, COMMIT_AND_RESET, CONNECTIONS_PER_SHARD,
    SESSION_RESET, WARM_MEMBERSHIPS,
};

/// The name of the per-tenant history table: refinery's own default, in the
/// tenant's schema, in refinery's format.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

/// The class of a tenant's transaction-scoped advisory lock (second key:
/// `hashtext(user_id::text)`): taken shared by each routed request and
/// export, exclusively by a fleet migration of the tenant and its erasure
/// (`tenantry.lock_tenant`, `tenantry.fleet_claim`).
pub const TENANT_LOCK_CLASS: i32 = 1_953_395_828;

/// The class of the transaction-level advisory lock a refill of spare
/// tenant roles holds (`tenancy::spares::refill`), and the router roles'
/// hand-over too (`routers::ensure`, which deals spares out to routers).
pub const REFILL_LOCK_CLASS: i32 = 0x737072; // 'spr'

/// The class of the session-level advisory lock `tenantry backup` holds,
/// exclusively, while `pg_dump` runs: a signup takes a spare whose schema
/// is built (and renames the schema) only if it gets this lock shared
/// (`tenancy::spares::claim`), because `pg_dump` reads some definitions
/// (indexes, defaults) from the live catalog, not from its snapshot, and a
/// schema renamed meanwhile would be dumped half under each name.
pub const BACKUP_LOCK_CLASS: i32 = 0x626b70; // 'bkp'

/// The class of a tenant's export admission (same second key): an export
/// is admitted only while nobody waits for the tenant exclusively
/// (`tenantry.lock_tenant`).
pub const EXPORT_ADMISSION_CLASS: i32 = 1_953_395_829;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("the service's {0} connections outside its pool are all in use (TENANTRY_EXTRA_CONNECTIONS); retry shortly")]
    Busy(usize),
    #[error("DATABASE_URL: {0}")]
    Url(String),
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("system migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error("cannot create the connection pool: {0}")]
    Pool(String),
    #[error("the control plane is inconsistent: {0}")]
    Corrupt(String),
    #[error("the embedded cluster task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Where we connect, and the embedded cluster if we use one.
#[derive(Debug, Clone)]
pub struct Target {
    pub connector: Connector,
    pub embedded: Option<(Cluster, Running)>,
}

impl Target {
    /// Resolve the settings to a connector, starting (or reusing) the
    /// embedded cluster when there is no `DATABASE_URL`.
    pub async fn resolve(settings: &Settings) -> Result<Target, DbError> {
        match &settings.database {
            DatabaseTarget::Url(url) => Ok(Target {
                connector: Connector::from_url(url.expose()).map_err(DbError::Url)?,
                embedded: None,
            }),
            DatabaseTarget::Embedded => {
                let data_dir = settings.data_dir.clone();
                let (cluster, running) = tokio::task::spawn_blocking(move || {
                    let cluster = Cluster::open(&data_dir)?;
                    let running = cluster.ensure_running(&[])?;
                    Ok::<_, ClusterError>((cluster, running))
                })
                .await??;
                bootstrap::prepare_embedded(&cluster, &running).await?;
                let config =
                    cluster.pg_config_as(&running, embedded::DATABASE_NAME, embedded::SERVICE_ROLE);
                Ok(Target {
                    connector: Connector::embedded(config, cluster.clone()),
                    embedded: Some((cluster, running)),
                })
            }
        }
    }

    /// One connection outside the pool (bootstrap, CLI, benchmarks).
    pub async fn connect(&self) -> Result<Connection, DbError> {
        self.connector.connect(Dedicated::Command).await
    }

    /// The request pool. On the embedded cluster it follows the server to
    /// the port it listens on now, so a `db stop` / `db start` while
    /// `serve` runs heals by itself.
    /// On Citus its sessions keep no connections to
    /// the workers between transactions (`citus.max_cached_conns_per_worker
    /// = 0`, a session default, so `RESET ALL` keeps it): Citus reaches a
    /// worker as the tenant's role, and a cached worker session of a role
    /// that was erased and made again under the same name (the same
    /// username signing up again) would still be the old role there.
    pub fn pool(&self, size: usize, installation: &Installation) -> Result<RequestPool, DbError> {
        let connector = if installation.citus {
            citus_session(&self.connector)
        } else {
            self.connector.clone()
        };
        RequestPool::new(
            &connector,
            size,
            ConnectionLimits::default(),
            Retire::Spread,
        )
    }
}

/// Whether `e` says the connection or its server is gone (closed, an I/O
/// error, SQLSTATE class 08 or 57P), not that a statement failed.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if e.as_db_error().is_none() && e.code().is_none() {
        // An I/O error on the socket.
        return std::error::Error::source(e)
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
    }
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("08") || code.starts_with("57P")
    })
}

/// A pooled session on Citus keeps no worker connections between
/// transactions (see `Target::pool`).
pub fn citus_session(connector: &Connector) -> Connector {
    connector.with_config(|config| {
        let options = format!(
            "{} -c citus.max_cached_conns_per_worker=0",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim_start());
    })
}

/// One connection to a fixed address without TLS (tests, benchmarks).
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    Ok(Connector::plain(config.clone())
        .connect(Dedicated::Command)
        .await?
        .into_client())
}

/// Send every request before reading any reply, and return the replies in
/// order. tokio-postgres writes a request to the connection when its future
/// is first polled, so polling each future once, in order, puts them all on
/// the wire in that order; PostgreSQL answers in the same order. Inside a
/// transaction this costs one round trip instead of one per request.
pub async fn pipeline<T>(mut requests: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut early = Vec::with_capacity(requests.len());
    for request in &mut requests {
        early.push(match futures::poll!(request.as_mut()) {
            Poll::Ready(reply) => Some(reply),
            Poll::Pending => None,
        });
    }
    let mut replies = Vec::with_capacity(requests.len());
    for (request, reply) in requests.into_iter().zip(early) {
        replies.push(match reply {
            Some(reply) => reply,
            None => request.await,
        });
    }
    replies
}
