//! Role membership at scale (issue 28), on raw PostgreSQL: what a backend
//! pays to rebuild its cached list of the roles it is a member of, which
//! every `CREATE ROLE` or `GRANT` anywhere throws away, when its user is a
//! member of N tenant roles (the service role today) or of N/K of them (one
//! of K router roles, one idea for the fix). It measures the cost that
//! decides the design; nothing of Tenantry runs.
//!
//! Usage: `cargo bench --bench roles -- [N] [K]` (defaults 10000 and 16).
//! Prints, at each size up to N: the first `SET ROLE` of a new session, the
//! next one, the one after another session created a role, and a
//! signup's `CREATE ROLE` + `GRANT`, for the member of all and for a router.

mod common;

use std::time::{Duration, Instant};

use common::{bench_db, BenchDb};

const SIZES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];
const ROUNDS: usize = 5;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Times of one user's `SET ROLE` to `role`: first in a new session, next,
/// and after another session made a role (medians of [`ROUNDS`]).
async fn set_role_times(
    config: &tokio_postgres::Config,
    admin: &tokio_postgres::Client,
    user: &str,
    role: &str,
    tag: &str,
) -> [Duration; 3] {
    let mut times: [Vec<Duration>; 3] = Default::default();
    let mut config = config.clone();
    config.user(user);
    for round in 0..ROUNDS {
        let session = tenantry::db::connect(&config).await.unwrap();
        let set = format!("SET ROLE \"{role}\"; RESET ROLE");
        for times in times.iter_mut().take(2) {
            let t = Instant::now();
            session.batch_execute(&set).await.unwrap();
            times.push(t.elapsed());
        }
        admin
            .batch_execute(&format!("CREATE ROLE \"inval_{tag}_{round}\""))
            .await
            .unwrap();
        let t = Instant::now();
        session.batch_execute(&set).await.unwrap();
        times[2].push(t.elapsed());
    }
    times.map(median)
}

/// A signup's role work as `user` (who then acts as the new role).
async fn signup_role_time(config: &tokio_postgres::Config, user: &str, tag: &str) -> Duration {
    let mut config = config.clone();
    config.user(user);
    let session = tenantry::db::connect(&config).await.unwrap();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let role = format!("new_{tag}_{round}");
        let t = Instant::now();
        session
            .batch_execute(&format!(
                "BEGIN; CREATE ROLE \"{role}\" NOLOGIN; GRANT \"{role}\" TO CURRENT_USER; \
                 SET LOCAL ROLE \"{role}\"; COMMIT"
            ))
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    median(times)
}

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 10_000);
    let k: usize = common::arg(1, "K", 16);
    let BenchDb {
        dir,
        cluster,
        running,
        ..
    } = bench_db("bench-roles", &[]).await;
    let config = cluster.pg_config(&running, "bench");
    let admin = tenantry::db::connect(&config).await.unwrap();
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    // The bootstrap took CONNECT from PUBLIC.
    let mut routers = String::new();
    for r in 0..k {
        routers.push_str(&format!(
            "CREATE ROLE router_{r} LOGIN CREATEROLE; GRANT CONNECT ON DATABASE bench TO router_{r};"
        ));
    }
    admin
        .batch_execute(&format!(
            "CREATE ROLE svc LOGIN CREATEROLE; GRANT CONNECT ON DATABASE bench TO svc; {routers}"
        ))
        .await
        .unwrap();
    println!("role membership on PostgreSQL {version}: svc is a member of every tenant role, router_0 of one in {k}");
    println!(
        "{:>7} | {:>22} {:>9} {:>11} {:>10} | {:>22} {:>9} {:>11} {:>10}",
        "roles",
        "svc: first SET ROLE ms",
        "next ms",
        "after inv.",
        "signup ms",
        "router: first SET ROLE",
        "next ms",
        "after inv.",
        "signup ms"
    );
    let mut made = 0;
    for &size in SIZES.iter().filter(|&&s| s <= n) {
        while made < size {
            let batch: String = (made..(made + 500).min(size))
                .map(|i| {
                    format!(
                        "CREATE ROLE t{i} NOLOGIN; GRANT t{i} TO svc; GRANT t{i} TO router_{};",
                        i % k
                    )
                })
                .collect();
            admin
                .batch_execute(&format!("BEGIN; {batch} COMMIT"))
                .await
                .unwrap();
            made = (made + 500).min(size);
        }
        let svc = set_role_times(&config, &admin, "svc", "t0", &format!("s{size}")).await;
        let svc_signup = signup_role_time(&config, "svc", &format!("s{size}")).await;
        // router_0's roles are t0, tk, t2k, …: it may act as t0.
        let router = set_role_times(&config, &admin, "router_0", "t0", &format!("r{size}")).await;
        let router_signup = signup_role_time(&config, "router_0", &format!("r{size}")).await;
        println!(
            "{size:>7} | {:>22.2} {:>9.3} {:>11.2} {:>10.2} | {:>22.2} {:>9.3} {:>11.2} {:>10.2}",
            ms(svc[0]),
            ms(svc[1]),
            ms(svc[2]),
            ms(svc_signup),
            ms(router[0]),
            ms(router[1]),
            ms(router[2]),
            ms(router_signup)
        );
    }
    drop(admin);
    cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
