//! The request pool: how connections are made, how long they live, and what
//! a connection that ran tenant SQL must shed before it is used again.

use std::time::{Duration, Instant};

use crate::db::{Connector, DbError};
use crate::embedded::Cluster;
use deadpool_postgres::{
    Connect, Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;

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
/// `scripts/bench-provision`; ~23 KB per table read, measured by
/// `scripts/bench-routing`'s backend memory), so a
/// connection that wanders over thousands of tenants would grow without
/// bound: the request pool ([`RequestPool`]) replaces a connection before it
/// serves more than `max_tenants` distinct tenants, and any pool replaces one
/// after `max_uses` checkouts or `max_age`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_uses: usize,
    pub max_age: Duration,
    pub max_tenants: usize,
}

impl Default for ConnectionLimits {
    /// About 1,000 distinct tenants per connection (spread ±50% per
    /// connection, see [`ConnectionLimits::spread`]): a backend caches at
    /// most that many tenants' relations, ~20 KB each for a quick-summary
    /// read (~30 MB per connection at worst; measured by
    /// `scripts/bench-routing`). With tenant affinity a connection meets
    /// only its shard's share of the tenants, so at 2,000 tenants it never
    /// reaches the limit and stays warm. Retiring sooner costs tail
    /// latency: a fresh backend reads its catalogs cold (retiring at 500
    /// uses raised p99 from 38 ms to 285 ms; with affinity, retiring after
    /// ~2,000 uses instead of by tenants: p99 55 instead of 41 ms, same
    /// benchmark). `max_uses` (~20,000) is a backstop for any other growth.
    fn default() -> Self {
        ConnectionLimits {
            max_uses: 20_000,
            max_age: Duration::from_secs(30 * 60),
            max_tenants: 1000,
        }
    }
}

impl ConnectionLimits {
    /// A connection's share of `limit` when spread: scaled into [½, 1½)×
    /// from when the connection was made, so that connections opened
    /// together are not all replaced together (a burst of cold backends).
    fn spread(limit: usize, created: Instant) -> usize {
        let spread = created.duration_since(*EPOCH).subsec_nanos() as usize % limit.max(1);
        (limit / 2 + spread).max(1)
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

/// deadpool's way in: every pooled connection is the [`Connector`]'s.
struct Via(Connector);

impl Connect for Via {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = pg_config.clone();
        Box::pin(async move { self.0.open(&config).await })
    }
}

/// A pool on a fixed address.
pub fn pool(
    config: tokio_postgres::Config,
    size: usize,
    limits: ConnectionLimits,
) -> Result<Pool, DbError> {
    pool_with(&Connector::plain(config), size, limits, Retire::Exactly)
}

/// The service's pool: [`pool_on`] with nothing run on a new connection.
pub fn pool_with(
    connector: &Connector,
    size: usize,
    limits: ConnectionLimits,
    retire: Retire,
) -> Result<Pool, DbError> {
    pool_on(connector, size, limits, retire, OnOpen::Nothing)
}

/// Builds the list of roles the session's login role may become (what
/// `SET ROLE` checks: `MEMBER` on PostgreSQL 15, `SET` from 16 on, each its
/// own cache, kept per session until the next role change anywhere): for
/// the service, a member of every tenant role, that is the whole fleet's
/// list, 0.3–0.4 s at 10,000 tenants on PostgreSQL 15. `pg_monitor` exists
/// everywhere; the answer does not matter.
pub const WARM_MEMBERSHIPS: &str = "SELECT pg_catalog.pg_has_role(current_user, 'pg_monitor', \
     CASE WHEN pg_catalog.current_setting('server_version_num')::int4 >= 160000 \
          THEN 'SET' ELSE 'MEMBER' END)";

/// What a pool's new connection runs before its first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnOpen {
    Nothing,
    /// [`WARM_MEMBERSHIPS`] (the routed pool's service shard), so that a
    /// signup does not pay it. Best effort: a failure is logged and the
    /// connection used anyway (it rebuilds the list at its first check).
    WarmMemberships,
}

/// A pool of `size` connections through `connector`. `Fast` recycling (is the socket open?) is enough
/// because nothing session-level stays on a connection that goes back:
/// routing is transaction-local (`routing::TenantTx`), and every path that
/// runs tenant SQL ends with [`SESSION_RESET`]; a connection whose
/// transaction did not end cleanly is discarded, never returned.
/// Requests fail fast while the database is down: connecting is bounded
/// by `create_timeout`, waiting for a free connection by `wait_timeout`.
fn pool_on(
    connector: &Connector,
    size: usize,
    limits: ConnectionLimits,
    retire: Retire,
    on_open: OnOpen,
) -> Result<Pool, DbError> {
    std::sync::LazyLock::force(&EPOCH);
    let mut config = connector.config().clone();
    if config.get_application_name().is_none() {
        // What operators (and scripts/bench-routing) find it by.
        config.application_name("tenantry");
    }
    let manager = Manager::from_connect(
        config,
        Via(connector.clone()),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager);
    if on_open == OnOpen::WarmMemberships {
        builder = builder.post_create(Hook::async_fn(|client, _| {
            Box::pin(async move {
                if let Err(e) = client.batch_execute(WARM_MEMBERSHIPS).await {
                    tracing::warn!(error = %e, "a new connection could not build its role list ahead");
                }
                Ok(())
            })
        }));
    }
    builder
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(3)))
        .recycle_timeout(Some(Duration::from_secs(3)))
        .pre_recycle(Hook::sync_fn(move |_, metrics| {
            let (uses, age) = match retire {
                Retire::Exactly => (limits.max_uses, limits.max_age),
                // Connections opened together (`RequestPool::open_service`)
                // are not all replaced together either.
                Retire::Spread => (
                    ConnectionLimits::spread(limits.max_uses, metrics.created),
                    Duration::from_secs(ConnectionLimits::spread(
                        usize::try_from(limits.max_age.as_secs()).unwrap_or(usize::MAX),
                        metrics.created,
                    ) as u64),
                ),
            };
            if metrics.recycle_count + 1 >= uses || metrics.age() >= age {
                // Discarded; the pool opens a fresh connection instead.
                Err(HookError::message("connection retired"))
            } else {
                Ok(())
            }
        }))
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Connections per shard of the service's [`RequestPool`].
pub const CONNECTIONS_PER_SHARD: usize = 4;

/// How long a tenant's request waits for its own shard before it takes
/// whichever connection frees first ([`RequestPool::get_for_tenant`]).
pub const AFFINITY_WAIT: Duration = Duration::from_millis(5);

/// With router roles, how long a tenant's request waits for its router's
/// connections before it takes one of the service's: longer, because a
/// service session pays the whole fleet's membership list on its first
/// `SET ROLE` after any role change (0.3 s at 10,000 tenants), while a
/// router's connections are only ever briefly busy rebuilding theirs
/// (~10 ms; `scripts/bench-scale-node`).
pub const ROUTED_AFFINITY_WAIT: Duration = Duration::from_millis(50);

/// How often a request past [`AFFINITY_WAIT`] looks for an idle connection
/// of another shard.
pub const AFFINITY_POLL: Duration = Duration::from_millis(2);

/// The service's request pool: [`CONNECTIONS_PER_SHARD`]-connection shards
/// of one deadpool pool each, and tenant affinity between them. A tenant's
/// requests go to the shard its user id hashes to, so each backend serves a
/// fixed share of the tenants (a quarter of them with the default 16
/// connections) and finds their relations and plans in its caches far more
/// often than one that wanders over all of them: PostgreSQL builds a
/// relation's cache entry from the catalogs at a backend's first use of it,
/// which costs more than the read itself (measured by
/// `scripts/bench-routing`). A request goes elsewhere only when its shard
/// has no free connection and another has one, or after waiting
/// [`AFFINITY_WAIT`] when another has an idle one, so one busy tenant still
/// gets the whole pool. Work that is no tenant's (sign-in, admin, health)
/// takes the shard with the most free connections.
///
/// It also bounds backend memory: a connection caches at most its shard's
/// share of the tenants, besides the [`ConnectionLimits`] every connection
/// retires at.
///
/// `serve`'s pool is [`RequestPool::routed`]: its tenant shards are one per
/// router role (`db::routers`), whose connections may become only that
/// router's tenants, so a busy router's tenant overflows only to the
/// service's own shard, never to another router's.
#[derive(Clone)]
pub struct RequestPool {
    /// The service's own connections: all work with router roles, and
    /// what is no tenant's (plus a tenant's overflow) with them.
    shards: std::sync::Arc<[Pool]>,
    /// With router roles (`db::routers`): one shard per router, whose
    /// connections log in as that router and serve its tenants only.
    routed: Option<std::sync::Arc<[Pool]>>,
    size: usize,
    limits: ConnectionLimits,
    retire: Retire,
    /// The distinct tenants each live connection has served, by the
    /// connection's id and creation time (`ConnectionLimits::max_tenants`).
    served: std::sync::Arc<std::sync::Mutex<Served>>,
    /// How long one statement of a tenant's request may run (zero: no limit).
    statement_timeout: Duration,
    /// What a cancel request needs.
    tls: crate::postgres_tls::Tls,
    /// On Citus with `TENANTRY_CITUS_ROUTING=direct`: the workers' pools,
    /// which serve the tenants they hold (`db::direct`).
    direct: Option<std::sync::Arc<super::Direct>>,
}

type Served = std::collections::HashMap<
    (deadpool_postgres::ObjectId, Instant),
    std::collections::HashSet<uuid::Uuid>,
>;

impl RequestPool {
    /// `size` connections in all, in shards of [`CONNECTIONS_PER_SHARD`]
    /// (one shard for a pool smaller than two of them).
    pub fn new(
        connector: &Connector,
        size: usize,
        limits: ConnectionLimits,
        retire: Retire,
    ) -> Result<RequestPool, DbError> {
        RequestPool::opening(connector, size, limits, retire, OnOpen::Nothing)
    }

    fn opening(
        connector: &Connector,
        size: usize,
        limits: ConnectionLimits,
        retire: Retire,
        on_open: OnOpen,
    ) -> Result<RequestPool, DbError> {
        let count = (size / CONNECTIONS_PER_SHARD).max(1);
        let shards = (0..count)
            .map(|i| {
                // The remainder goes to the first shards: `size` in all.
                let shard_size = size / count + usize::from(i < size % count);
                pool_on(connector, shard_size, limits, retire, on_open)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RequestPool {
            shards: shards.into(),
            routed: None,
            size,
            limits,
            retire,
            served: Default::default(),
            statement_timeout: Duration::ZERO,
            tls: connector.tls().clone(),
            direct: None,
        })
    }

    /// The pool with router roles (`db::routers`): one shard per router of
    /// `size / routers` connections (at least one), each logged in as its
    /// router and serving that router's tenants, and one shard of
    /// `max(CONNECTIONS_PER_SHARD, size / 4)` connections logged in as the
    /// service for work that is no tenant's, and for a tenant's request
    /// when its router's shard has no connection free (the service may act
    /// as any tenant). Connections never move between routers: a
    /// connection's list of roles it may become is its router's share of
    /// the fleet (see `db::routers`).
    pub fn routed(
        connector: &Connector,
        size: usize,
        limits: ConnectionLimits,
        retire: Retire,
        logins: &[super::routers::Login],
    ) -> Result<RequestPool, DbError> {
        if logins.is_empty() {
            return RequestPool::new(connector, size, limits, retire);
        }
        let service = size.div_ceil(4).max(CONNECTIONS_PER_SHARD);
        // The service's sessions build the whole fleet's list of roles
        // they may become when they open (`WARM_MEMBERSHIPS`), not in the
        // first signup that gets one.
        let mut pool =
            RequestPool::opening(connector, service, limits, retire, OnOpen::WarmMemberships)?;
        let per_router = size.div_ceil(logins.len()).max(1);
        let routed = logins
            .iter()
            .map(|login| {
                let as_router = connector.with_config(|config| {
                    config.user(login.role.as_str());
                    config.password(login.password.as_bytes());
                });
                pool_with(&as_router, per_router, limits, retire)
            })
            .collect::<Result<Vec<_>, _>>()?;
        pool.size = service + per_router * logins.len();
        pool.routed = Some(routed.into());
        Ok(pool)
    }

    /// Tenant transactions on this pool stop a statement after `timeout`
    /// (`TENANTRY_STATEMENT_TIMEOUT`; zero: never).
    pub fn with_statement_timeout(mut self, timeout: Duration) -> RequestPool {
        self.statement_timeout = timeout;
        self
    }

    /// Tenants' requests go to the worker that holds them (`db::direct`).
    pub fn with_direct(mut self, direct: std::sync::Arc<super::Direct>) -> RequestPool {
        self.direct = Some(direct);
        self
    }

    /// Direct routing's nodes and placements, if it is on.
    pub fn direct(&self) -> Option<&std::sync::Arc<super::Direct>> {
        self.direct.as_ref()
    }

    /// A connection for work that is no tenant's.
    pub async fn get(&self) -> Result<deadpool_postgres::Object, PoolError> {
        self.freest().get().await
    }

    /// The shard for a tenant's request: its own, unless that one has no
    /// free connection and another has.
    pub fn for_tenant(&self, user: uuid::Uuid) -> &Pool {
        let own = &self.tenant_shards()[self.shard_of(user)];
        if free(own) > 0 || self.routed.is_some() {
            // With routers, the service's connections are a tenant's only
            // after [`ROUTED_AFFINITY_WAIT`] (`checkout`): a service session pays
            // the whole fleet's membership list on its first `SET ROLE`.
            return own;
        }
        let freest = self.freest();
        if free(freest) > 0 {
            freest
        } else {
            own
        }
    }

    /// A connection for a tenant's request ([`RequestPool::for_tenant`]).
    /// When every connection is busy it waits in its own shard's queue; after
    /// [`AFFINITY_WAIT`] it also takes an idle connection of another shard
    /// as soon as one is back (looked for every [`AFFINITY_POLL`]): a shard
    /// whose tenants happen to be busier than the others' does not make its
    /// requests queue longer. Other shards are only ever taken from when
    /// they have a connection free right away, never waited on: a wait given
    /// up could abandon a connection being opened.
    ///
    /// A connection that has served its share of distinct tenants
    /// (`ConnectionLimits::max_tenants`) is closed instead of serving one
    /// more, and another checked out.
    pub async fn get_for_tenant(
        &self,
        user: uuid::Uuid,
    ) -> Result<deadpool_postgres::Object, PoolError> {
        loop {
            let got = self.checkout(user).await?;
            if self.admit(&got, user) {
                return Ok(got);
            }
            drop(deadpool_postgres::Object::take(got));
        }
    }

    /// May this connection serve `user`? Yes if it has served it before or
    /// has room for one more tenant; the count starts again with a new
    /// connection.
    fn admit(&self, connection: &deadpool_postgres::Object, user: uuid::Uuid) -> bool {
        use deadpool_postgres::Object;
        let created = Object::metrics(connection).created;
        let key = (Object::id(connection), created);
        let limit = match self.retire {
            Retire::Exactly => self.limits.max_tenants,
            Retire::Spread => ConnectionLimits::spread(self.limits.max_tenants, created),
        };
        let mut served = self
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !served.contains_key(&key) {
            self.forget_closed(&mut served);
        }
        let tenants = served.entry(key).or_default();
        if tenants.contains(&user) {
            true
        } else if tenants.len() >= limit.max(1) {
            served.remove(&key);
            false
        } else {
            tenants.insert(user);
            true
        }
    }

    /// Connections also end elsewhere (retired by uses or age, discarded
    /// after an error): their entries go once older than `max_age`, and the
    /// oldest go when there are more than four per pooled connection (a
    /// connection still alive then only starts its count again).
    fn forget_closed(&self, served: &mut Served) {
        let room = 4 * self.size.max(1);
        if served.len() < room {
            return;
        }
        // The longest a connection lives (`Retire::Spread` spreads it up
        // to 1½ times `max_age`).
        let max_age = self.limits.max_age * 3 / 2;
        served.retain(|(_, created), _| created.elapsed() < max_age);
        if served.len() >= room {
            let mut created: Vec<Instant> = served.keys().map(|(_, c)| *c).collect();
            created.sort_unstable();
            let cutoff = created[served.len() - room / 2];
            served.retain(|(_, c), _| *c >= cutoff);
        }
    }

    async fn checkout(&self, user: uuid::Uuid) -> Result<deadpool_postgres::Object, PoolError> {
        let pool = self.for_tenant(user);
        if self.routed.is_none() && self.shards.len() == 1 {
            return pool.get().await;
        }
        // Whether this checkout opens a connection (none idle, room for
        // one): then, if another shard serves the request instead, the
        // connection is let finish opening, into its pool, rather than
        // abandoned half-open. Over TCP with a SCRAM password a router's
        // connection can take longer to open than `ROUTED_AFFINITY_WAIT`,
        // and abandoning it each time would leave that router without one.
        let opens = {
            let s = pool.status();
            s.available == 0 && s.waiting == 0 && s.size < s.max_size
        };
        let mut own = Box::pin({
            let pool = pool.clone();
            async move { pool.get().await }
        });
        let mut pause = if self.routed.is_some() {
            ROUTED_AFFINITY_WAIT
        } else {
            AFFINITY_WAIT
        };
        loop {
            tokio::select! {
                biased;
                got = &mut own => return got,
                () = tokio::time::sleep(pause) => {}
            }
            pause = AFFINITY_POLL;
            // With routers, only the service's connections may act as
            // another router's tenant.
            for other in self.shards.iter().filter(|p| !std::ptr::eq(*p, pool)) {
                // An idle connection; with routers also room for a new one
                // in the service's shard, but never its last half: signups
                // and all other work that is no tenant's run there.
                let room = if self.routed.is_some() {
                    free(other).saturating_sub(other.status().max_size / 2)
                } else {
                    other.status().available
                };
                if room == 0 {
                    continue;
                }
                let now = deadpool_postgres::Timeouts {
                    wait: Some(Duration::ZERO),
                    ..other.timeouts()
                };
                match other.timeout_get(&now).await {
                    Ok(got) => {
                        if opens {
                            tokio::spawn(own);
                        }
                        return Ok(got);
                    }
                    Err(PoolError::Timeout(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn freest(&self) -> &Pool {
        self.shards
            .iter()
            .max_by_key(|p| free(p))
            .expect("a request pool has a shard")
    }

    /// The shards a tenant's request may call its own: the routers', or
    /// without routers all of them.
    fn tenant_shards(&self) -> &[Pool] {
        self.routed.as_deref().unwrap_or(&self.shards)
    }

    /// With router roles, every connection of the service's own opened
    /// now, one at a time, each building its list of roles as it opens
    /// ([`WARM_MEMBERSHIPS`]): what `serve` does before it listens, so that
    /// no signup waits for one to open (0.3–0.4 s at 10,000 tenants on
    /// PostgreSQL 15, more under load).
    pub async fn open_service(&self) -> Result<(), PoolError> {
        if self.routed.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let mut held = Vec::new();
        for shard in self.shards.iter() {
            for _ in 0..shard.status().max_size {
                held.push(shard.get().await?);
            }
        }
        tracing::info!(
            connections = held.len(),
            seconds = started.elapsed().as_secs_f64(),
            "the service's own connections are open"
        );
        Ok(())
    }

    /// How many routers the pool's tenant connections log in as (0: they
    /// log in as the service).
    pub fn routers(&self) -> usize {
        self.routed.as_ref().map_or(0, |r| r.len())
    }

    /// A connection of the service's own for a tenant's request: with
    /// routers, what serves a request its router was refused (a membership
    /// missing, see `routing::TenantTx`); without, its own shard's.
    pub async fn get_as_service(
        &self,
        user: uuid::Uuid,
    ) -> Result<deadpool_postgres::Object, PoolError> {
        if self.routed.is_some() {
            self.get().await
        } else {
            self.get_for_tenant(user).await
        }
    }

    /// The shards' statuses, summed.
    pub fn status(&self) -> deadpool_postgres::Status {
        self.shards
            .iter()
            .chain(self.routed.iter().flat_map(|r| r.iter()))
            .map(Pool::status)
            .fold(
                deadpool_postgres::Status {
                    max_size: 0,
                    size: 0,
                    available: 0,
                    waiting: 0,
                },
                |a, s| deadpool_postgres::Status {
                    max_size: a.max_size + s.max_size,
                    size: a.size + s.size,
                    available: a.available + s.available,
                    waiting: a.waiting + s.waiting,
                },
            )
    }

    /// Connections checked out or waited for now, the workers' pools
    /// included (direct routing): what the spare builder waits to see at
    /// zero (`tenancy::spares`).
    pub fn in_use(&self) -> usize {
        // A checkout that is opening a connection is among `waiting`.
        let s = self.status();
        s.size.saturating_sub(s.available)
            + s.waiting
            + self.direct.as_ref().map_or(0, |d| d.in_use())
    }

    /// A tenant's own shard: a stable function of its user id (random, so
    /// the shards get even shares).
    /// With routers, the tenant's router (`db::routers::router_of`).
    pub fn shard_of(&self, user: uuid::Uuid) -> usize {
        super::routers::router_of(user, self.tenant_shards().len())
    }

    /// How many shards tenants are spread over (`RequestPool::new`; with
    /// routers, one per router).
    pub fn shards(&self) -> usize {
        self.tenant_shards().len()
    }
}

/// Connections a checkout could have at once: idle ones, and room to open
/// new ones, less what others already wait for.
fn free(pool: &Pool) -> usize {
    let s = pool.status();
    (s.available + s.max_size.saturating_sub(s.size)).saturating_sub(s.waiting)
}

/// Where [`crate::routing::TenantTx`] checks a tenant's connection out.
pub trait TenantPool {
    fn get_for_tenant(
        &self,
        user: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<deadpool_postgres::Object, PoolError>> + Send;

    /// A connection for the tenant's request, and where it is: on a
    /// worker that holds the tenant (`db::direct`: the guard reads
    /// `tenantry_guard` there), or `None`: where the registry is.
    fn checkout_tenant(
        &self,
        user: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<Checkout, CheckoutError>> + Send
    where
        Self: Sync,
    {
        async move { Ok((self.get_for_tenant(user).await?, None)) }
    }

    /// The `statement_timeout` of a tenant's transaction (zero: none).
    fn statement_timeout(&self) -> Duration {
        Duration::ZERO
    }

    /// The TLS of its connections, for cancel requests (none: plaintext).
    fn tls(&self) -> Option<&crate::postgres_tls::Tls> {
        None
    }

    /// Whether its tenant connections log in as router roles.
    fn routed(&self) -> bool {
        false
    }

    /// A connection that may act as any tenant, for a request whose own
    /// connection was refused its tenant's role (`RequestPool::get_as_service`).
    fn get_as_service(
        &self,
        user: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<deadpool_postgres::Object, PoolError>> + Send
    {
        self.get_for_tenant(user)
    }
}

/// A worker a tenant's connection came from ([`TenantPool::checkout_tenant`]).
#[derive(Clone)]
pub struct OnNode {
    pub direct: std::sync::Arc<super::Direct>,
    /// The tenant guard's read on this node
    /// (`db::citus::enter_on_node`).
    pub enter: std::sync::Arc<str>,
    /// Where the map placed the tenant (the guard checks it still is).
    pub placed: super::direct::Placed,
}

impl OnNode {
    /// `HOST:PORT`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.placed.node.0, self.placed.node.1)
    }
}

/// Whether a worker's pool failed because the worker is gone rather than
/// busy or refusing (see [`CheckoutError::Node`]).
fn worker_gone(error: &PoolError) -> bool {
    match error {
        PoolError::Timeout(deadpool_postgres::TimeoutType::Create) => true,
        PoolError::Backend(e) => super::connection_lost(e),
        _ => false,
    }
}

/// A tenant's connection, and the worker it is on if direct routing
/// checked it out of a worker's pool.
pub type Checkout = (deadpool_postgres::Object, Option<OnNode>);

/// Why a tenant's connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The tenant's worker (direct routing) gives no connection.
    #[error("the worker {node} is unavailable: {error}")]
    Node { node: String, error: PoolError },
}

impl TenantPool for RequestPool {
    async fn checkout_tenant(&self, user: uuid::Uuid) -> Result<Checkout, CheckoutError> {
        if let Some(direct) = &self.direct {
            let found = match direct.pool_for(user) {
                Some(found) => Some(found),
                None => direct.locate(user, self).await,
            };
            if let Some((pool, enter, placed)) = found {
                let on = OnNode {
                    direct: direct.clone(),
                    enter,
                    placed,
                };
                return match pool.get_for_tenant(user).await {
                    Ok(got) => Ok((got, Some(on))),
                    // The worker does not answer (refused, reset, or no
                    // connection within the create timeout): its placements
                    // may have changed (a failover, tenants moved off it).
                    Err(error) if worker_gone(&error) => {
                        direct.refresh_soon();
                        Err(CheckoutError::Node {
                            node: on.name(),
                            error,
                        })
                    }
                    // A saturated pool, a refused login: what they are.
                    Err(error) => Err(CheckoutError::Pool(error)),
                };
            }
        }
        Ok((RequestPool::get_for_tenant(self, user).await?, None))
    }

    fn get_for_tenant(
        &self,
        user: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<deadpool_postgres::Object, PoolError>> + Send
    {
        RequestPool::get_for_tenant(self, user)
    }

    fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    fn get_as_service(
        &self,
        user: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<deadpool_postgres::Object, PoolError>> + Send
    {
        RequestPool::get_as_service(self, user)
    }

    fn routed(&self) -> bool {
        self.routed.is_some()
    }

    fn tls(&self) -> Option<&crate::postgres_tls::Tls> {
        Some(&self.tls)
    }
}

/// A plain pool routes every tenant to itself.
impl TenantPool for Pool {
    fn get_for_tenant(
        &self,
        _: uuid::Uuid,
    ) -> impl std::future::Future<Output = Result<deadpool_postgres::Object, PoolError>> + Send
    {
        self.get()
    }
}
