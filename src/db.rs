//! Reaching the database: the embedded cluster or `DATABASE_URL`, the pool,
//! and the bootstrap that brings the control plane (`tenantry`) and the
//! shared reference data (`reference`) up to date.

use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::configuration::{DatabaseTarget, Settings};
use crate::domain::{InstallationId, RoleName};
use crate::embedded::{self, Cluster, ClusterError, Running};

mod system {
    refinery::embed_migrations!("system_migrations");
}

/// Key of the advisory lock that serialises bootstraps of one database (two
/// processes starting at once must not both run the migrations or race on
/// `CREATE SCHEMA IF NOT EXISTS`, which is not concurrency-safe).
const BOOTSTRAP_LOCK: i64 = 0x7465_6e61_6e74_7279; // "tenantry"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
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
    pub config: tokio_postgres::Config,
    pub embedded: Option<(Cluster, Running)>,
}

impl Target {
    /// Resolve the settings to a connection config, starting (or reusing)
    /// the embedded cluster when there is no `DATABASE_URL`.
    pub async fn resolve(settings: &Settings) -> Result<Target, DbError> {
        match &settings.database {
            DatabaseTarget::Url(url) => Ok(Target {
                config: url.expose().parse().map_err(DbError::Connect)?,
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
                ensure_database(&cluster, &running).await?;
                Ok(Target {
                    config: cluster.pg_config(&running, embedded::DATABASE_NAME),
                    embedded: Some((cluster, running)),
                })
            }
        }
    }

    /// One connection outside the pool (bootstrap, CLI, benchmarks).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        connect(&self.config).await
    }

    pub fn pool(&self, size: usize) -> Result<Pool, DbError> {
        pool(self.config.clone(), size, ConnectionLimits::default())
    }
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config.connect(NoTls).await.map_err(DbError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}

/// How long a pooled connection lives. A backend keeps every relation it has
/// touched in its caches for good (~35 KB per tenant provisioned, measured by
/// `scripts/bench-provision`; ~23 KB per table read), so a connection that
/// wanders over thousands of tenants would grow without bound: it is
/// replaced after `max_uses` checkouts or `max_age`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_uses: usize,
    pub max_age: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_uses: 1000,
            max_age: Duration::from_secs(30 * 60),
        }
    }
}

/// The service's pool. Routing state is only ever set transaction-locally
/// (`set_config(…, true)` / `SET LOCAL`), so the cheap `Fast` recycling is
/// enough: a connection goes back with no session state of ours on it.
pub fn pool(
    config: tokio_postgres::Config,
    size: usize,
    limits: ConnectionLimits,
) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .pre_recycle(Hook::sync_fn(move |_, metrics| {
            if metrics.recycle_count + 1 >= limits.max_uses || metrics.age() >= limits.max_age {
                // Discarded; the pool opens a fresh connection instead.
                Err(HookError::message("connection retired"))
            } else {
                Ok(())
            }
        }))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Create the `tenantry` database inside the embedded cluster on first use.
async fn ensure_database(cluster: &Cluster, running: &Running) -> Result<(), DbError> {
    let client = connect(&cluster.pg_config(running, "postgres")).await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&embedded::DATABASE_NAME],
        )
        .await?
        .is_some();
    if !exists {
        // A constant name, not user input.
        match client
            .batch_execute(&format!("CREATE DATABASE {}", embedded::DATABASE_NAME))
            .await
        {
            Ok(()) => {}
            // Another process created it between our check and now.
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What the bootstrap learnt about this database, needed to provision.
#[derive(Debug, Clone)]
pub struct Installation {
    pub id: InstallationId,
    /// Whether the service's own role is a superuser (then it needs no
    /// membership in tenant roles to act as them).
    pub superuser: bool,
}

impl Installation {
    pub fn group_role(&self) -> RoleName {
        self.id.group_role()
    }
}

/// Bring the system schema up to date and make sure the tenants' group role
/// exists with read access to `reference`. Idempotent; safe when several
/// processes start at once.
#[tracing::instrument(skip_all)]
/// Returns the installation and the names of the migrations applied now.
pub async fn bootstrap(
    client: &mut tokio_postgres::Client,
) -> Result<(Installation, Vec<String>), DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    let result = bootstrap_locked(client).await;
    // Unlock even when the bootstrap failed; the connection may be reused.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&BOOTSTRAP_LOCK])
        .await;
    let installation = result?;
    unlock?;
    Ok(installation)
}

async fn bootstrap_locked(
    client: &mut tokio_postgres::Client,
) -> Result<(Installation, Vec<String>), DbError> {
    client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE SCHEMA IF NOT EXISTS tenantry;
             CREATE SCHEMA IF NOT EXISTS reference;",
        )
        .await?;
    let report = system::migrations::runner()
        .set_migration_table_name("tenantry.refinery_schema_history")
        .run_async(client)
        .await?;
    let mut applied = Vec::new();
    for m in report.applied_migrations() {
        tracing::info!(
            version = m.version(),
            name = m.name(),
            "applied system migration"
        );
        applied.push(format!("V{}__{}", m.version(), m.name()));
    }
    let row = client
        .query_one(
            "SELECT i.id, current_setting('is_superuser') = 'on' FROM tenantry.installation i",
            &[],
        )
        .await?;
    let id: String = row.get(0);
    let installation = Installation {
        id: InstallationId::parse(&id)
            .map_err(|e| DbError::Corrupt(format!("bad tenantry.installation row: {e}")))?,
        superuser: row.get(1),
    };
    let group = installation.group_role();
    let has_group = client
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&group.as_str()],
        )
        .await?
        .is_some();
    if !has_group {
        // One group role carries every shared grant: per-tenant GRANTs on the
        // same object from concurrent signups fail with "tuple concurrently
        // updated".
        client
            .batch_execute(&format!("CREATE ROLE {} NOLOGIN", group.quoted()))
            .await?;
    }
    // Granted when the group is new or a system migration ran (which may
    // have added reference tables), not on every start: a GRANT waits behind
    // concurrent signups (they hold a lock on the group role until they
    // commit), and checking every table's privileges costs a scan of
    // pg_class, which grows with every tenant.
    let usage: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
                            WHERE n.nspname = 'reference' AND a.grantee = $1::text::regrole
                              AND a.privilege_type = 'USAGE')",
            &[&group.as_str()],
        )
        .await?
        .get(0);
    let granted = has_group && applied.is_empty() && usage;
    if !granted {
        client
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA reference TO {g};
                 GRANT SELECT ON ALL TABLES IN SCHEMA reference TO {g};",
                g = group.quoted()
            ))
            .await?;
    }
    Ok((installation, applied))
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

/// Is the database reachable? Used by `/health`.
pub async fn ping(pool: &Pool) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), check).await,
        Ok(Some(_))
    )
}
