//! Usage benchmark: measuring the bytes of every tenant's schema
//! (`tenancy::usage::measure`: one query for the whole fleet, the sizes
//! stored, the quotas checked) against a hand-rolled script's way, one size
//! query per schema; then signups quiet and beside measurements run back to
//! back, which must not wait on them.
//!
//! `cargo bench --bench usage -- [N] [SIGNUPS]` (or `scripts/bench-usage`):
//! N tenants (default 2,000), SIGNUPS timed each way (default 200).

use std::time::{Duration, Instant};

mod common;

use common::{bench_db, median, BenchDb};
use tenantry::db::Target;

const ROUNDS: usize = 3;

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 2000);
    let signups: usize = common::arg(1, "SIGNUPS", 200);
    let BenchDb {
        dir,
        cluster,
        target,
        boot,
        installation,
        ..
    } = bench_db("bench-usage", &[("max_connections", "100")]).await;
    let version: String = boot
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    common::record_fact("usage", "postgres", &version);
    common::record_fact("usage", "size", &format!("{n} tenants"));
    println!("usage benchmark on PostgreSQL {version}: {n} tenants");
    let templates = common::builtin_published(&boot, &installation).await;
    let t = Instant::now();
    common::provision_many(&target, &installation, &templates, 0..n, 4).await;
    println!(
        "provisioned {n} tenants in {:.1} s (4 sessions)",
        t.elapsed().as_secs_f64()
    );
    boot.batch_execute("VACUUM ANALYZE").await.unwrap();
    boot.batch_execute("CHECKPOINT").await.unwrap();
    usage_pass(&target, &installation, n).await;

    // Signups on one session, quiet and then beside measurements of the
    // whole fleet run back to back on another.
    let quiet = timed_signups(&target, &installation, &templates, n..n + signups).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measurer = {
        let stop = stop.clone();
        let pool = target.pool(1, &installation).unwrap();
        tokio::spawn(async move {
            let mut client = pool.get().await.unwrap();
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tenantry::tenancy::usage::measure(&mut client, false, None, 0)
                    .await
                    .unwrap()
                    .expect("the only measurement");
                passes += 1;
            }
            passes
        })
    };
    let beside = timed_signups(
        &target,
        &installation,
        &templates,
        n + signups..n + 2 * signups,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let passes = measurer.await.unwrap();
    let rate = |d: Duration| signups as f64 / d.as_secs_f64();
    println!(
        "{signups} signups: {:.1}/s quiet, {:.1}/s beside {passes} whole-fleet measurements: {:.2}x",
        rate(quiet),
        rate(beside),
        rate(beside) / rate(quiet)
    );
    common::record(
        "usage",
        "signups beside measurements of the fleet",
        "signups/s",
        common::Better::Higher,
        rate(beside),
        ("signups, no measurement", rate(quiet)),
    );
    drop(boot);
    cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// How long signups `range` take on one session, one after the other.
async fn timed_signups(
    target: &Target,
    installation: &tenantry::db::Installation,
    templates: &tenantry::tenancy::publication::Templates,
    range: std::ops::Range<usize>,
) -> Duration {
    let t = Instant::now();
    common::provision_many(target, installation, templates, range, 1).await;
    t.elapsed()
}

/// Measuring the usage of all N tenants: `tenancy::usage::measure` (one
/// query for the fleet, the sizes stored, the quotas checked) against what
/// a hand-rolled script does, one size query per tenant schema (prepared,
/// on one session). Each side three times, alternating; medians.
async fn usage_pass(target: &Target, installation: &tenantry::db::Installation, n: usize) {
    const PER_SCHEMA: &str =
        "SELECT COALESCE(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::int8
         FROM pg_catalog.pg_class c
         WHERE c.relnamespace = $1::text::regnamespace AND c.relkind IN ('r', 'm', 'S')";
    let pool = target.pool(1, installation).unwrap();
    let mut client = pool.get().await.unwrap();
    let per_schema = client.prepare(PER_SCHEMA).await.unwrap();
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let mut total = 0;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let measured = tenantry::tenancy::usage::measure(&mut client, false, None, 0)
            .await
            .unwrap()
            .expect("the only measurement");
        ours.push(t.elapsed());
        assert_eq!(measured.tenants, n);
        total = measured.bytes;
        let t = Instant::now();
        let mut sum = 0i64;
        for i in 0..n {
            let schema = format!("tenant_t{i:05}");
            sum += client
                .query_one(&per_schema, &[&schema])
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
        raw.push(t.elapsed());
        if sum != total {
            println!("(the per-schema sum differs: {sum} against {total} bytes)");
        }
    }
    let (ours, raw) = (median(&ours), median(&raw));
    println!(
        "usage of {n} tenants ({:.0} MB): measured in {:.0} ms in one pass, \
         {:.0} ms one query per schema (raw): {:.2}x the time",
        total as f64 / 1e6,
        ours.as_secs_f64() * 1e3,
        raw.as_secs_f64() * 1e3,
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    common::record(
        "usage",
        &format!("usage of {n} tenants measured"),
        "ms",
        common::Better::Lower,
        ours.as_secs_f64() * 1e3,
        ("raw, a query per schema", raw.as_secs_f64() * 1e3),
    );
}
