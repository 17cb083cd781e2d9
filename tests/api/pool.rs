//! Pooled connections are retired before their caches grow without bound.

use std::time::Duration;

use tenantry::db::{pool, ConnectionLimits};

use crate::helpers::*;

async fn backend_pid(pool: &deadpool_postgres::Pool) -> i32 {
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_connection_is_replaced_after_its_maximum_number_of_uses() {
    let db = create_database().await;
    let limits = ConnectionLimits {
        max_uses: 3,
        max_age: Duration::from_secs(3600),
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
    };
    let pool = pool(service_url(&db).parse().unwrap(), 1, limits).unwrap();
    let first = backend_pid(&pool).await;
    assert_eq!(backend_pid(&pool).await, first);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_ne!(backend_pid(&pool).await, first);
}
