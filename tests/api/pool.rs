//! Pooled connections are retired before their caches grow without bound,
//! and a tenant's requests keep to its shard of the request pool.

use std::collections::HashSet;
use std::time::Duration;

use tenantry::db::{pool, ConnectionLimits, Connector, RequestPool, Retire};
use tenantry::routing::{Access, TenantTx};

use crate::helpers::*;
use crate::isolation::{caller, user_id};

async fn backend_pid(pool: &deadpool_postgres::Pool) -> i32 {
    pid_of(&pool.get().await.unwrap()).await
}

async fn pid_of(client: &deadpool_postgres::Object) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Every connection (4) of `user`'s shard, checked out and held.
async fn hold_shard_of(pool: &RequestPool, user: uuid::Uuid) -> Vec<deadpool_postgres::Object> {
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pool.for_tenant(user).get().await.unwrap());
    }
    held
}

#[tokio::test]
async fn a_connection_is_replaced_after_its_maximum_number_of_uses() {
    let db = create_database().await;
    let limits = ConnectionLimits {
        max_uses: 3,
        max_age: Duration::from_secs(3600),
        ..ConnectionLimits::default()
    };
    let pool = pool(service_url(&db).parse().unwrap(), 1, limits).unwrap();
    let first = backend_pid(&pool).await;
    assert_eq!(backend_pid(&pool).await, first);
    assert_eq!(backend_pid(&pool).await, first);
    let fourth = backend_pid(&pool).await;
    assert_ne!(fourth, first, "the fourth checkout gets a fresh connection");
    assert_eq!(backend_pid(&pool).await, fourth);
}

#[tokio::test]
async fn a_connection_is_replaced_after_its_maximum_age() {
    let db = create_database().await;
    let limits = ConnectionLimits {
        max_uses: 1000,
        // Seconds, not milliseconds: a loaded machine must not age the
        // connection between the first two checkouts.
        max_age: Duration::from_secs(3),
        ..ConnectionLimits::default()
    };
    let pool = pool(service_url(&db).parse().unwrap(), 1, limits).unwrap();
    let first = backend_pid(&pool).await;
    assert_eq!(backend_pid(&pool).await, first);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_ne!(backend_pid(&pool).await, first);
}

/// Two tenants whose requests hash to different shards of a two-shard pool
/// (user ids are random: sign up until both shards have one).
async fn tenants_on_both_shards(app: &TestApp, pool: &RequestPool) -> (uuid::Uuid, uuid::Uuid) {
    let mut by_shard: [Option<uuid::Uuid>; 2] = [None, None];
    for i in 0..64 {
        let name = format!("shard{i}");
        app.token(&name).await;
        let id = user_id(app, &name).await;
        by_shard[pool.shard_of(id)].get_or_insert(id);
        if let [Some(a), Some(b)] = by_shard {
            return (a, b);
        }
    }
    panic!("64 random user ids all fell on one of two shards");
}

async fn routed_backend(pool: &RequestPool, user: uuid::Uuid) -> i32 {
    let rows = TenantTx::once(
        pool,
        caller(user),
        Access::ReadOnly,
        "SELECT pg_backend_pid()",
        &[],
    )
    .await
    .unwrap();
    rows[0].get(0)
}

fn two_shards(app: &TestApp) -> RequestPool {
    let pool = RequestPool::new(
        &Connector::plain(service_url(&app.db_name).parse().unwrap()),
        8,
        ConnectionLimits::default(),
        Retire::Exactly,
    )
    .unwrap();
    assert_eq!(pool.shards(), 2);
    assert_eq!(pool.status().max_size, 8, "the shards add up to the size");
    pool
}

#[tokio::test]
async fn a_tenants_requests_keep_to_its_own_shard_of_the_pool() {
    let app = spawn_app().await;
    let pool = two_shards(&app);
    let (a, b) = tenants_on_both_shards(&app, &pool).await;
    // Every connection open first. A request whose shard is still opening
    // one takes another shard's idle connection after `AFFINITY_WAIT`
    // (5 ms), which a loaded machine can exceed: that is the warm-up, not
    // the steady state asserted here.
    drop((hold_shard_of(&pool, a).await, hold_shard_of(&pool, b).await));
    assert_eq!(pool.status().size, 8);
    let (mut served_a, mut served_b) = (HashSet::new(), HashSet::new());
    for _ in 0..20 {
        served_a.insert(routed_backend(&pool, a).await);
        served_b.insert(routed_backend(&pool, b).await);
        // Work that is no tenant's takes any shard in between.
        drop(pool.get().await.unwrap());
    }
    assert!(
        served_a.is_disjoint(&served_b),
        "a connection served both tenants: {served_a:?} and {served_b:?}"
    );
}

#[tokio::test]
async fn a_tenant_whose_shard_is_busy_is_served_by_another_without_waiting() {
    let app = spawn_app().await;
    let pool = two_shards(&app);
    let (a, b) = tenants_on_both_shards(&app, &pool).await;
    let own = routed_backend(&pool, a).await;
    // Every connection of a's shard in use.
    let held = hold_shard_of(&pool, a).await;
    let mut held_backends = HashSet::new();
    for client in &held {
        held_backends.insert(pid_of(client).await);
    }
    assert!(held_backends.contains(&own), "the held ones are a's shard");
    // The pool waits up to 5 s for a free connection of a shard: a's
    // request must not wait for one of its own.
    let served = tokio::time::timeout(Duration::from_secs(3), routed_backend(&pool, a))
        .await
        .expect("a's request waited for its busy shard");
    assert!(!held_backends.contains(&served));
    // Served by b's shard, which b uses as before.
    assert_eq!(routed_backend(&pool, b).await, served);
    drop(held);
    assert!(held_backends.contains(&routed_backend(&pool, a).await));
}

#[tokio::test]
async fn a_waiting_request_takes_the_first_connection_any_shard_frees() {
    let app = spawn_app().await;
    let pool = two_shards(&app);
    let (a, b) = tenants_on_both_shards(&app, &pool).await;
    // Every connection of both shards in use: a's first, then b's.
    let held_a = hold_shard_of(&pool, a).await;
    let mut held_b = hold_shard_of(&pool, b).await;
    assert_eq!(pool.status().available, 0);
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { routed_backend(&pool, a).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "nothing was free");
    // b's shard frees one; a's shard stays busy. The pool would wait 5 s
    // for a's own.
    let freed = pid_of(&held_b[0]).await;
    drop(held_b.remove(0));
    let served = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("a's request kept waiting for its own shard")
        .unwrap();
    assert_eq!(served, freed);
    drop(held_a);
}

#[tokio::test]
async fn a_burst_for_one_tenant_uses_the_whole_pool_and_never_more() {
    let app = spawn_app().await;
    let pool = two_shards(&app);
    let (a, _) = tenants_on_both_shards(&app, &pool).await;
    let burst = (0..200).map(|_| {
        let pool = pool.clone();
        tokio::spawn(async move {
            TenantTx::once(
                &pool,
                caller(a),
                Access::ReadOnly,
                "SELECT pg_backend_pid(), pg_sleep(0.005)",
                &[],
            )
            .await
            .map(|rows| rows[0].get::<_, i32>(0))
        })
    });
    let mut backends = HashSet::new();
    for request in futures::future::join_all(burst).await {
        backends.insert(
            request
                .unwrap()
                .expect("every request of the burst is served"),
        );
    }
    assert!(
        backends.len() > 4,
        "only a's own shard served: {backends:?}"
    );
    assert!(backends.len() <= 8, "more connections than the pool's size");
}

#[tokio::test]
async fn a_connection_is_replaced_before_it_serves_more_than_its_tenants() {
    let app = spawn_app().await;
    let limits = ConnectionLimits {
        max_tenants: 2,
        ..ConnectionLimits::default()
    };
    let pool = RequestPool::new(
        &Connector::plain(service_url(&app.db_name).parse().unwrap()),
        1,
        limits,
        Retire::Exactly,
    )
    .unwrap();
    let mut users = Vec::new();
    for name in ["tia", "uwe", "vic"] {
        app.token(name).await;
        users.push(user_id(&app, name).await);
    }
    let (tia, uwe, vic) = (users[0], users[1], users[2]);
    let first = routed_backend(&pool, tia).await;
    assert_eq!(routed_backend(&pool, uwe).await, first);
    assert_eq!(
        routed_backend(&pool, tia).await,
        first,
        "a tenant it served"
    );
    let second = routed_backend(&pool, vic).await;
    assert_ne!(second, first, "a third tenant gets a fresh connection");
    assert_eq!(routed_backend(&pool, vic).await, second);
    assert_eq!(routed_backend(&pool, tia).await, second);
    assert_ne!(routed_backend(&pool, uwe).await, second);
    assert_eq!(pool.status().size, 1, "the full one was closed, not kept");
}
