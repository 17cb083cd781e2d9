//! The one way Tenantry connects to PostgreSQL ([`Connector`]): the
//! request pool, fleet runs, exports, `/health`'s spare, the mail sender
//! and every command get their connections here, so each of them follows
//! the embedded cluster to its current port, uses the configured TLS
//! (`postgres_tls`), and counts against one cap on connections outside the pool.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::db::{DbError, PortSource};
use crate::embedded;
use crate::postgres_tls::{self as tls, Tls};

/// What a dedicated connection (one outside the request pool) is for. It
/// names the session (`application_name`) and says how long to wait for a
/// place under the cap ([`Connector::with_cap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedicated {
    /// A command's own (bootstrap, a CLI command, a benchmark): uncounted.
    Command,
    /// `GET /api/me/export`: waits [`EXPORT_WAIT`], then 503.
    Export,
    /// A fleet run's control connection and each of its workers.
    Fleet,
    /// `/health`'s spare, asked only when the pool is saturated: never
    /// waits.
    Health,
    /// The mail sender's.
    Outbox,
    /// `tenancy::spares`' builder of spare schemas, while it builds: one
    /// session of the service's, so that after a batch of spare roles only
    /// that one rebuilds the fleet-long list of the service's memberships
    /// (a signup that takes a built spare acts as no role).
    Spares,
    /// A measurement of usage: the fleet's by `serve`'s maintenance, or one
    /// tenant's on demand (`GET /admin/tenants/{name}/usage?refresh=true`,
    /// which vacuums it as its role first). Closed afterwards, never
    /// pooled: a measurement opens every relation it measures.
    Usage,
    /// The webhook sender's.
    Webhooks,
}

/// The `application_name` of the mail sender's session.
pub const OUTBOX_SESSION: &str = "tenantry outbox";

/// The `application_name` of the webhook sender's session.
pub const WEBHOOKS_SESSION: &str = "tenantry webhooks";

/// How long an export waits for a place under the cap before its 503.
pub const EXPORT_WAIT: Duration = Duration::from_secs(2);
/// How long a fleet worker or the mail sender waits for one.
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(10);
/// How long connecting may take (the server, TLS, authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server whose listen queue is full refuses a Unix-socket connection at
/// once (`EAGAIN`, "Resource temporarily unavailable"): it is busy
/// accepting, not gone. Such a connect is tried again after a pause that
/// doubles from [`BACKLOG_FIRST_PAUSE`] up to [`BACKLOG_MAX_PAUSE`] (times
/// a jitter of 0.5-1.5) for at most this long, instead of failing the
/// request and having the next one try at once, which kept the queue full
/// (a pool short of connections under load answered thousands of fast
/// 503s). A refused or absent server still fails at once.
pub const BACKLOG_RETRY_FOR: Duration = Duration::from_secs(2);
pub const BACKLOG_FIRST_PAUSE: Duration = Duration::from_millis(5);
pub const BACKLOG_MAX_PAUSE: Duration = Duration::from_millis(200);

/// The connect failed on a full listen queue (`EAGAIN`).
fn backlog_full(e: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::WouldBlock;
        }
        source = err.source();
    }
    false
}

impl Dedicated {
    fn application_name(self) -> Option<&'static str> {
        match self {
            Dedicated::Command => None,
            Dedicated::Export => Some("tenantry export"),
            Dedicated::Fleet => Some("tenantry fleet"),
            Dedicated::Health => Some("tenantry health"),
            Dedicated::Outbox => Some(OUTBOX_SESSION),
            Dedicated::Spares => Some("tenantry spares"),
            Dedicated::Usage => Some("tenantry usage"),
            Dedicated::Webhooks => Some(WEBHOOKS_SESSION),
        }
    }

    /// `None`: not counted.
    fn wait(self) -> Option<Duration> {
        match self {
            Dedicated::Command => None,
            Dedicated::Export => Some(EXPORT_WAIT),
            Dedicated::Health => Some(Duration::ZERO),
            Dedicated::Fleet
            | Dedicated::Outbox
            | Dedicated::Spares
            | Dedicated::Usage
            | Dedicated::Webhooks => Some(BACKGROUND_WAIT),
        }
    }
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    tls: Tls,
    ports: PortSource,
    outside: Arc<Semaphore>,
    cap: usize,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.inner.tls)
            .field("cap", &self.inner.cap)
            .finish_non_exhaustive()
    }
}

/// A connection outside the pool; its place under the cap is given back
/// when it is dropped. Derefs to the client.
pub struct Connection {
    client: tokio_postgres::Client,
    _place: Option<OwnedSemaphorePermit>,
}

impl std::ops::Deref for Connection {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }
}

impl Connection {
    /// The client itself (its place under the cap is given back now).
    pub fn into_client(self) -> tokio_postgres::Client {
        self.client
    }
}

/// No cap, until one is set.
const UNCAPPED: usize = Semaphore::MAX_PERMITS;

impl Connector {
    /// From a connection string (`DATABASE_URL`): libpq's TLS parameters
    /// are taken out and applied here.
    pub fn from_url(url: &str) -> Result<Connector, String> {
        let (rest, params) = tls::split(url)?;
        let config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
        tls::check(&config, &params)?;
        let tls = Tls::new(&params)?;
        Ok(Connector::new(config, tls, PortSource::Fixed))
    }

    /// A fixed address without TLS (tests, benchmarks, the embedded
    /// cluster's socket).
    pub fn plain(config: tokio_postgres::Config) -> Connector {
        Connector::new(config, Tls::none(), PortSource::Fixed)
    }

    /// The embedded cluster, over its Unix socket, wherever it listens now.
    pub fn embedded(config: tokio_postgres::Config, cluster: embedded::Cluster) -> Connector {
        Connector::new(config, Tls::none(), PortSource::Cluster(cluster))
    }

    fn new(mut config: tokio_postgres::Config, tls: Tls, ports: PortSource) -> Connector {
        let unix_only = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        // Unix sockets never use TLS (as libpq, which ignores sslmode
        // there).
        config.ssl_mode(if unix_only && !config.get_hosts().is_empty() {
            tokio_postgres::config::SslMode::Disable
        } else {
            tls.wire_mode()
        });
        Connector {
            inner: Arc::new(Inner {
                config,
                tls,
                ports,
                outside: Arc::new(Semaphore::new(UNCAPPED)),
                cap: UNCAPPED,
            }),
        }
    }

    /// The same, with at most `cap` counted dedicated connections open at
    /// once (`TENANTRY_EXTRA_CONNECTIONS`).
    pub fn with_cap(&self, cap: usize) -> Connector {
        let cap = cap.clamp(1, UNCAPPED);
        Connector {
            inner: Arc::new(Inner {
                config: self.inner.config.clone(),
                tls: self.inner.tls.clone(),
                ports: self.inner.ports.clone(),
                outside: Arc::new(Semaphore::new(cap)),
                cap,
            }),
        }
    }

    /// The same server with other settings (a Citus session option, a
    /// user).
    pub fn with_config(&self, edit: impl FnOnce(&mut tokio_postgres::Config)) -> Connector {
        let mut config = self.inner.config.clone();
        edit(&mut config);
        Connector {
            inner: Arc::new(Inner {
                config,
                tls: self.inner.tls.clone(),
                ports: self.inner.ports.clone(),
                outside: self.inner.outside.clone(),
                cap: self.inner.cap,
            }),
        }
    }

    /// Another node of the same Citus cluster (`db::direct`): the same
    /// database, user, password, TLS and timeouts at `host`:`port`, its
    /// connections uncapped (they are a pool's).
    pub fn at_node(&self, host: &str, port: i32) -> Connector {
        let old = &self.inner.config;
        let mut config = tokio_postgres::Config::new();
        config.host(host);
        config.port(u16::try_from(port).unwrap_or(5432));
        if let Some(user) = old.get_user() {
            config.user(user);
        }
        if let Some(password) = old.get_password() {
            config.password(password);
        }
        if let Some(dbname) = old.get_dbname() {
            config.dbname(dbname);
        }
        if let Some(name) = old.get_application_name() {
            config.application_name(name);
        }
        if let Some(options) = old.get_options() {
            config.options(options);
        }
        if let Some(timeout) = old.get_connect_timeout() {
            config.connect_timeout(*timeout);
        }
        config
            .ssl_mode(old.get_ssl_mode())
            .keepalives(old.get_keepalives())
            .keepalives_idle(old.get_keepalives_idle());
        Connector {
            inner: Arc::new(Inner {
                config,
                tls: self.inner.tls.clone(),
                ports: PortSource::Fixed,
                outside: Arc::new(Semaphore::new(UNCAPPED)),
                cap: UNCAPPED,
            }),
        }
    }

    /// The configuration as given (the embedded cluster's port as at
    /// start).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.inner.config
    }

    /// The TLS every connection uses (also for cancel requests).
    pub fn tls(&self) -> &Tls {
        &self.inner.tls
    }

    /// The counted dedicated connections allowed at once.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// Where a new connection goes now: the embedded cluster may have
    /// restarted on another port (read from its `postmaster.pid`; while it
    /// is down, the old address fails fast).
    pub fn current_config(&self, base: &tokio_postgres::Config) -> tokio_postgres::Config {
        match &self.inner.ports {
            PortSource::Fixed => base.clone(),
            PortSource::Cluster(cluster) => {
                let user = base.get_user().unwrap_or(embedded::SERVICE_ROLE);
                let dbname = base.get_dbname().unwrap_or(embedded::DATABASE_NAME);
                let Some(mut config) = cluster.current_config(dbname, user) else {
                    return base.clone();
                };
                if let Some(options) = base.get_options() {
                    config.options(options);
                }
                if let Some(name) = base.get_application_name() {
                    config.application_name(name);
                }
                // A socket: no TLS, as `new` decided.
                config.ssl_mode(base.get_ssl_mode());
                config
            }
        }
    }

    /// Open one connection with `config` (the pool's way in).
    pub(crate) async fn open(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let config = self.current_config(config);
        let started = std::time::Instant::now();
        let mut attempt: u32 = 0;
        let (client, connection) = loop {
            match config.connect(self.inner.tls.maker.clone()).await {
                Ok(connected) => break connected,
                Err(e) if backlog_full(&e) => {
                    attempt += 1;
                    let pause = BACKLOG_FIRST_PAUSE
                        .saturating_mul(1 << (attempt - 1).min(10))
                        .mul_f64(rand::random_range(0.5..1.5))
                        .min(BACKLOG_MAX_PAUSE);
                    if started.elapsed() + pause > BACKLOG_RETRY_FOR {
                        return Err(e);
                    }
                    crate::metrics::connect_retried();
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(e),
            }
        };
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok((client, task))
    }

    /// The connection a background sender keeps in `slot`, made again (as
    /// `purpose`) when there is none or it was closed; the closed one gives
    /// its place under the cap back first.
    pub async fn kept<'a>(
        &self,
        slot: &'a mut Option<Connection>,
        purpose: Dedicated,
    ) -> Result<&'a tokio_postgres::Client, DbError> {
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = None;
            *slot = Some(self.connect(purpose).await?);
        }
        Ok(slot.as_ref().expect("just made"))
    }

    /// A connection of its own for `purpose`, outside the pool. Counted
    /// purposes wait their time for a place under the cap, then get
    /// [`DbError::Busy`] (a 503 for a request), so that PostgreSQL's own
    /// limit is never what refuses everyone else.
    pub async fn connect(&self, purpose: Dedicated) -> Result<Connection, DbError> {
        let place = match purpose.wait() {
            None => None,
            Some(wait) => {
                let outside = self.inner.outside.clone();
                let taken = match outside.clone().try_acquire_owned() {
                    Ok(place) => Ok(place),
                    Err(_) if wait.is_zero() => Err(()),
                    Err(_) => match tokio::time::timeout(wait, outside.acquire_owned()).await {
                        Ok(Ok(place)) => Ok(place),
                        _ => Err(()),
                    },
                };
                match taken {
                    Ok(place) => Some(place),
                    Err(()) => {
                        crate::metrics::database_error("extra_connections");
                        return Err(DbError::Busy(self.inner.cap));
                    }
                }
            }
        };
        let mut config = self.inner.config.clone();
        if let Some(name) = purpose.application_name() {
            config.application_name(name);
        }
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open(&config))
            .await
            .map_err(|_| {
                DbError::Connect(format!(
                    "no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?;
        let (client, _task) = opened.map_err(|e| DbError::Connect(tls::explain(&e)))?;
        Ok(Connection {
            client,
            _place: place,
        })
    }
}
