//! Direct routing on Citus (`TENANTRY_CITUS_ROUTING=direct`): a tenant's
//! request goes straight to the worker that holds its schema, on a pool of
//! that node's own, instead of through the coordinator (which opens a new
//! worker connection for every routed transaction: Citus caches its worker
//! connections per session and role).
//!
//! [`Direct`] keeps the nodes' pools (one per active primary worker, from
//! `pg_dist_node`) and a placement map, user id → node, read from Citus's
//! metadata on the coordinator. Both are refreshed every
//! [`REFRESH_EVERY`], after Tenantry moves or rebalances tenants, and soon
//! after a request finds its entry missing or stale. A stale entry costs
//! only speed: the guard on the worker that gets the request checks that
//! the worker holds the tenant's shard and refuses it otherwise
//! (`db::citus::enter_on_node`), before it uses anything read there; the
//! request is counted in `/metrics`, its entry dropped and read again
//! ([`Direct::locate`]), and it is sent again where the tenant is. A tenant
//! the map does not know yet (signed up since the last refresh) goes
//! through the coordinator.
//!
//! On a worker the guard reads `tenantry_guard` (`db::citus::GUARD`), the
//! registry's copy on every node.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use uuid::Uuid;

use super::{ConnectionLimits, Connector, DbError, Dedicated, RequestPool, Retire};

/// How often the map and the nodes are read again without a reason
/// (`TENANTRY_CITUS_REFRESH_INTERVAL`'s default).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// How long `/health` reuses a probe of the workers.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// The shortest time between two refreshes (a burst of misses makes one).
const REFRESH_GAP: Duration = Duration::from_millis(200);

/// Each active tenant's worker, and one of its shards (one row per user: a
/// tenant schema is one colocated unit, on one node).
const PLACEMENTS: &str = "SELECT t.user_id, d.nodename::text, d.nodeport, p.shardid
 FROM tenantry.tenants t
 JOIN pg_catalog.pg_dist_schema ds ON ds.schemaid = pg_catalog.to_regnamespace(t.schema_name)
 JOIN LATERAL (
     SELECT pl.groupid, pl.shardid FROM pg_catalog.pg_dist_partition dp
       JOIN pg_catalog.pg_dist_shard sh ON sh.logicalrelid = dp.logicalrelid
       JOIN pg_catalog.pg_dist_placement pl ON pl.shardid = sh.shardid
      WHERE dp.colocationid = ds.colocationid ORDER BY pl.shardid LIMIT 1) p ON true
 JOIN pg_catalog.pg_dist_node d
   ON d.groupid = p.groupid AND d.noderole = 'primary' AND d.groupid <> 0
 WHERE t.status = 'active'";

/// A worker, as `pg_dist_node` names it.
pub type Node = (String, i32);

/// Where a tenant is, as the map says: its worker, and one shard of its
/// schema there (the guard checks that the node still holds it:
/// [`super::citus::enter_on_node`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub node: Node,
    pub shard: i64,
}

/// A tenant's request on its worker: the node's pool, the guard's read
/// there, and the placement it was sent by.
pub type OnWorker = (RequestPool, Arc<str>, Placed);

/// See the module docs.
pub struct Direct {
    coordinator: Connector,
    /// Connections per node.
    size: usize,
    limits: ConnectionLimits,
    statement_timeout: Duration,
    /// [`REFRESH_EVERY`] unless set; `None`: only when asked.
    every: Option<Duration>,
    /// Each node's pool and the guard's read there
    /// ([`super::citus::enter_on_node`]).
    pools: RwLock<HashMap<Node, (RequestPool, Arc<str>)>>,
    placed: RwLock<HashMap<Uuid, Placed>>,
    /// The last probe of the workers ([`Direct::unreachable`]).
    probed: tokio::sync::Mutex<Option<(std::time::Instant, Vec<Node>)>>,
    /// Users found with no placed tenant since the last refresh.
    absent: RwLock<std::collections::HashSet<Uuid>>,
    wake: tokio::sync::Notify,
}

impl Direct {
    /// Read the nodes and the placements once (an error if the coordinator
    /// cannot be read), then keep them fresh in the background for as long
    /// as the returned value lives.
    pub async fn start(
        coordinator: &Connector,
        size: usize,
        limits: ConnectionLimits,
        statement_timeout: Duration,
        every: Option<Duration>,
    ) -> Result<Arc<Direct>, DbError> {
        let direct = Arc::new(Direct {
            coordinator: coordinator.clone(),
            size: size.max(1),
            limits,
            statement_timeout,
            every,
            pools: Default::default(),
            placed: Default::default(),
            probed: Default::default(),
            absent: Default::default(),
            wake: Default::default(),
        });
        direct.refresh().await?;
        let weak = Arc::downgrade(&direct);
        tokio::spawn(keep_fresh(weak));
        Ok(direct)
    }

    /// The pool of the node that holds `user`'s tenant, and the guard's
    /// read there, if the map knows it (else see [`Direct::locate`]).
    pub fn pool_for(&self, user: Uuid) -> Option<OnWorker> {
        let placed = self
            .placed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&user)
            .cloned();
        let placed = placed?;
        let pool = self
            .pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&placed.node)
            .cloned();
        pool.map(|(pool, enter)| (pool, enter, placed))
    }

    /// A tenant the map does not know (signed up since the last refresh):
    /// its node read from the coordinator's metadata through `coordinator`
    /// (one query) and kept. A user with no placed tenant is remembered as
    /// such until the next refresh; its requests go through the
    /// coordinator, whose guard refuses them or serves them.
    pub async fn locate(&self, user: Uuid, coordinator: &RequestPool) -> Option<OnWorker> {
        if self
            .absent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&user)
        {
            return None;
        }
        let client = coordinator.get().await.ok()?;
        let found = client
            .query_opt(&format!("{PLACEMENTS} AND t.user_id = $1"), &[&user])
            .await;
        drop(client);
        match found {
            Ok(Some(row)) => {
                self.placed
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(user, placed(&row));
                let found = self.pool_for(user);
                if found.is_none() {
                    // A node with no pool yet (added since the last
                    // refresh, or inactive): through the coordinator until
                    // the next refresh, without asking again.
                    self.absent
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(user);
                    self.wake.notify_one();
                }
                found
            }
            Ok(None) => {
                self.absent
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(user);
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a tenant's placement");
                None
            }
        }
    }

    /// A request for `user` reached a node that does not hold its tenant
    /// (moved since the map was read): counted, its entry dropped (the
    /// next request reads it again) and the map read again.
    pub fn stale(&self, user: Uuid) {
        crate::metrics::routed_forwarded();
        self.placed
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&user);
        self.wake.notify_one();
    }

    /// Read again now (after a move or a rebalance).
    pub fn refresh_soon(&self) {
        self.wake.notify_one();
    }

    /// The nodes with a pool.
    pub fn nodes(&self) -> Vec<Node> {
        let mut nodes: Vec<Node> = self
            .pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        nodes.sort();
        nodes
    }

    /// How many tenants the map places.
    pub fn placed(&self) -> usize {
        self.placed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Connections of the workers' pools checked out now.
    pub fn in_use(&self) -> usize {
        self.pools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(pool, _)| pool.in_use())
            .sum()
    }

    /// Read the workers (with their placements of the guard's tables) and
    /// every active tenant's node from the coordinator's metadata (one
    /// connection, two queries).
    pub async fn refresh(&self) -> Result<(), DbError> {
        let client = self.coordinator.connect(Dedicated::Command).await?;
        let nodes = client.query(super::citus::GUARD_SHARDS, &[]).await?;
        let placements = client.query(PLACEMENTS, &[]).await?;
        drop(client);
        let nodes: Vec<(Node, Arc<str>)> = nodes
            .iter()
            .map(|r| {
                let shards = super::citus::guard_shard(r.get(2), "entries")
                    .zip(super::citus::guard_shard(r.get(3), "revoked"));
                let enter = super::citus::enter_on_node(r.get(4), shards.as_ref());
                ((r.get(0), r.get(1)), Arc::from(enter))
            })
            .collect();
        {
            let mut pools = self.pools.write().unwrap_or_else(PoisonError::into_inner);
            pools.retain(|node, _| nodes.iter().any(|(n, _)| n == node));
            for (node, enter) in nodes {
                if let Some((_, known)) = pools.get_mut(&node) {
                    if *known != enter {
                        *known = enter;
                    }
                    continue;
                }
                let pool = RequestPool::new(
                    &self.coordinator.at_node(&node.0, node.1),
                    self.size,
                    self.limits,
                    Retire::Spread,
                )?
                .with_statement_timeout(self.statement_timeout);
                pools.insert(node, (pool, enter));
            }
        }
        let placements: HashMap<Uuid, Placed> =
            placements.iter().map(|r| (r.get(0), placed(r))).collect();
        *self.placed.write().unwrap_or_else(PoisonError::into_inner) = placements;
        self.absent
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }

    /// The workers that did not answer `SELECT 1` on a new connection
    /// within `within` (`/health`), asked of all at once at most every
    /// [`PROBE_EVERY`]: calls in between, and calls made while one asks,
    /// get its answer (`/health` is public; it must not open connections
    /// on the workers at the callers' pace).
    pub async fn unreachable(&self, within: Duration) -> Vec<Node> {
        let mut last = self.probed.lock().await;
        if let Some((at, down)) = &*last {
            if at.elapsed() < PROBE_EVERY {
                return down.clone();
            }
        }
        let down = self.probe(within).await;
        *last = Some((std::time::Instant::now(), down.clone()));
        down
    }

    async fn probe(&self, within: Duration) -> Vec<Node> {
        let probes = self.nodes().into_iter().map(|node| {
            let connector = self.coordinator.at_node(&node.0, node.1);
            async move {
                let answered = tokio::time::timeout(within, async {
                    let client = connector.connect(Dedicated::Command).await.ok()?;
                    client.simple_query("SELECT 1").await.ok()
                })
                .await
                .ok()
                .flatten()
                .is_some();
                (!answered).then_some(node)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A row of [`PLACEMENTS`].
fn placed(row: &tokio_postgres::Row) -> Placed {
    Placed {
        node: (row.get(1), row.get(2)),
        shard: row.get(3),
    }
}

/// The refresher: every `every`, or when woken, at most once per
/// [`REFRESH_GAP`]; it ends with the last [`Direct`].
async fn keep_fresh(direct: Weak<Direct>) {
    loop {
        let Some(d) = direct.upgrade() else { return };
        // Without a period, woken only (a dropped `Direct` is noticed
        // within `REFRESH_EVERY` all the same).
        let wait = d.every.unwrap_or(REFRESH_EVERY);
        let woken = tokio::time::timeout(wait, d.wake.notified()).await.is_ok();
        if Arc::strong_count(&d) == 1 {
            // Only this task holds it.
            return;
        }
        if !woken && d.every.is_none() {
            continue;
        }
        if let Err(e) = d.refresh().await {
            tracing::warn!(error = %e, woken, "cannot read the tenants' placements");
        }
        drop(d);
        tokio::time::sleep(REFRESH_GAP).await;
    }
}
