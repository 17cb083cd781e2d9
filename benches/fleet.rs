//! Fleet migration benchmark: `tenantry`'s fleet runner against the same SQL
//! applied raw, side by side on one private cluster (default settings,
//! durable), then a no-op run over a large fleet.
//!
//! `cargo bench --bench fleet -- [N] [NOOP_N] [BIN]` (or `scripts/bench-fleet`).
//! 1. Provisions N tenants at the built-in templates' latest version.
//! 2. For concurrency 1, 2 and 4: `fleet migrate` (the library's runner: run
//!    lock, plan, one pipelined transaction per tenant with its advisory
//!    lock, history and result rows) of a realistic version — a column with
//!    a default and an index on `experiences` — over all N tenants; then
//!    the same DDL plus the registry update applied raw by persistent
//!    parallel sessions, one transaction (one multi-statement query) per
//!    tenant; and raw again with a history row per tenant as well (the
//!    bookkeeping Tenantry keeps in each tenant's schema). Each side adds a
//!    column of its own, so all do the same amount of new work; each runs
//!    three times in rotating order, each from vacuumed catalogs and a
//!    checkpoint, and the median is reported.
//! 3. Grows the fleet to NOOP_N tenants (default 10,000) and times a no-op
//!    run: in process, and as the real binary BIN (`tenantry fleet migrate`,
//!    process start and connect included), next to the raw registry query.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{bench_db, median, BenchDb};
use tenantry::db::Target;
use tenantry::domain::TemplateVersion;
use tenantry::templates::TemplateSet;
use tenantry::tenancy::fleet::{self, Progress, RunOptions};
use tenantry::tenancy::publication::Templates;

const CONCURRENCY: [usize; 3] = [1, 2, 4];

/// Each side runs this many times per concurrency, in rotating order; the
/// median is reported (these machines are noisy).
const ROUNDS: usize = 3;

fn version_sql(column: &str) -> String {
    format!(
        "ALTER TABLE experiences ADD COLUMN {column} integer NOT NULL DEFAULT 0;\n\
         CREATE INDEX experiences_{column}_idx ON experiences ({column});\n"
    )
}

/// The catalogs a tenant's `ADD COLUMN` and `CREATE INDEX` read and write.
const CATALOG_VACUUM: &str = "VACUUM pg_catalog.pg_index, pg_catalog.pg_class, \
     pg_catalog.pg_attribute, pg_catalog.pg_attrdef, pg_catalog.pg_depend, pg_catalog.pg_type";

struct Quiet;
impl Progress for Quiet {}

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 2000);
    let noop_n: usize = common::arg(1, "NOOP_N", 10_000);
    let bin = common::positional(2);

    // TENANTRY_BENCH_LOG=1 logs every statement's duration and keeps the
    // cluster's directory, to see where the time goes.
    let keep_log = std::env::var("TENANTRY_BENCH_LOG").is_ok_and(|v| v == "1");
    let mut settings = vec![("max_connections", "100")];
    if keep_log {
        settings.push(("log_min_duration_statement", "0"));
    }
    let BenchDb {
        dir,
        cluster,
        running,
        target,
        boot,
        installation,
    } = bench_db("bench-fleet", &settings).await;
    let builtin = TemplateSet::builtin().unwrap();
    let base = builtin.latest().get() as usize;

    // The admin's templates: the built-in ones plus one version per
    // concurrency measured.
    let tdir = dir.join("templates");
    std::fs::create_dir_all(&tdir).unwrap();
    for t in builtin.all() {
        std::fs::write(tdir.join(t.file_name()), t.sql()).unwrap();
    }
    for (i, c) in CONCURRENCY.iter().enumerate() {
        for round in 0..ROUNDS {
            std::fs::write(
                tdir.join(format!(
                    "V{}__rating_p{c}_{round}.sql",
                    base + 1 + i * ROUNDS + round
                )),
                version_sql(&format!("rating_p{c}_{round}")),
            )
            .unwrap();
        }
    }

    let version: String = boot
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    common::record_fact("fleet", "postgres", &version);
    common::record_fact(
        "fleet",
        "size",
        &format!(
            "{n} tenants migrated V{base} → V{}, no-op run over {noop_n}",
            base + 1
        ),
    );
    println!("fleet benchmark on PostgreSQL {version}: {n} tenants at V{base}, then a no-op run over {noop_n}");
    let t = Instant::now();
    let at_base = Templates::publishing(&boot, &installation, builtin.clone(), "bench")
        .await
        .unwrap();
    common::provision_many(&target, &installation, &at_base, 0..n, 4).await;
    println!(
        "provisioned {n} tenants in {:.1} s (4 sessions)",
        t.elapsed().as_secs_f64()
    );
    let checkpoint = Instant::now();
    boot.batch_execute("CHECKPOINT").await.unwrap();
    println!(
        "checkpoint after provisioning: {:.1} s",
        checkpoint.elapsed().as_secs_f64()
    );

    // The admin publishes the new versions; each round migrates to one.
    let published = Templates::publishing(
        &boot,
        &installation,
        TemplateSet::from_dir(&tdir).unwrap(),
        "bench",
    )
    .await
    .unwrap();
    let templates: Arc<TemplateSet> = published.get();

    println!();
    println!(
        "{:<12} {:>9} {:>9} {:>7} {:>13} {:>7}",
        "concurrency", "fleet/s", "raw/s", "ratio", "raw+history/s", "ratio"
    );
    let schemas: Vec<String> = (0..n).map(|i| format!("tenant_t{i:05}")).collect();
    for (i, &c) in CONCURRENCY.iter().enumerate() {
        // Each side starts from the same state, and the order rotates: the
        // catalogs the DDL reads are vacuumed (on PostgreSQL 15.20 every
        // `ADD COLUMN … DEFAULT` reads all of pg_index, cheaply only on pages
        // a vacuum marked all-visible, so an autovacuum landing in one side's
        // run would favour it), then a checkpoint (the first writer to a page
        // after a checkpoint pays for its full-page image in the WAL).
        let mut rounds: [Vec<Duration>; 3] = Default::default();
        for round in 0..ROUNDS {
            let version = TemplateVersion::parse((base + 1 + i * ROUNDS + round) as i64).unwrap();
            let options = RunOptions {
                target: Some(version),
                concurrency: c,
                canary: 0,
                started_by: "bench".into(),
                ..RunOptions::default()
            };
            for side in (0..3).map(|k| (k + i + round) % 3) {
                boot.batch_execute(CATALOG_VACUUM).await.unwrap();
                boot.batch_execute("CHECKPOINT").await.unwrap();
                let column = |prefix: &str| format!("{prefix}_p{c}_{round}");
                rounds[side].push(match side {
                    0 => {
                        let t = Instant::now();
                        let run =
                            fleet::prepare(&target.connector, templates.clone(), options.clone())
                                .await
                                .expect("prepare");
                        let summary = run.execute(&Quiet).await.expect("run");
                        assert_eq!(summary.succeeded, n, "{summary:?}");
                        t.elapsed()
                    }
                    1 => raw_fan_out(&target, &schemas, &column("raw"), c, Raw::Minimal).await,
                    _ => {
                        raw_fan_out(
                            &target,
                            &schemas,
                            &column("same"),
                            c,
                            Raw::WithHistory(1000 + version.get()),
                        )
                        .await
                    }
                });
            }
        }
        let times = rounds.map(|r| median(&r));
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let (svc, raw, same) = (rate(times[0]), rate(times[1]), rate(times[2]));
        println!(
            "{c:<12} {svc:>9.0} {raw:>9.0} {:>6.2}x {same:>13.0} {:>6.2}x",
            svc / raw,
            svc / same
        );
        common::record(
            "fleet",
            &format!("migrate, concurrency {c}"),
            "tenants/s",
            common::Better::Higher,
            svc,
            ("raw SQL + history", same),
        );
    }

    // The no-op run over a large fleet.
    if noop_n > n {
        let latest = templates.latest();
        let t = Instant::now();
        common::provision_many(&target, &installation, &published, n..noop_n, 4).await;
        println!();
        println!(
            "grew the fleet to {noop_n} tenants in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        boot.batch_execute("CHECKPOINT").await.unwrap();
        let behind: i64 = boot
            .query_one(
                "SELECT count(*) FROM tenantry.tenants WHERE template_version < $1",
                &[&latest.get()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(behind, 0);
    }
    let tenants: i64 = boot
        .query_one("SELECT count(*) FROM tenantry.tenants", &[])
        .await
        .unwrap()
        .get(0);
    let mut in_process = Vec::new();
    let mut raw_query = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let run = fleet::prepare(&target.connector, templates.clone(), RunOptions::default())
            .await
            .unwrap();
        let summary = run.execute(&Quiet).await.unwrap();
        in_process.push(t.elapsed());
        assert_eq!(summary.planned, 0);
        let t = Instant::now();
        let client = target.connect().await.unwrap();
        client
            .query(
                "SELECT user_id FROM tenantry.tenants WHERE template_version < $1",
                &[&templates.latest().get()],
            )
            .await
            .unwrap();
        raw_query.push(t.elapsed());
    }
    println!();
    println!("no-op run over {tenants} tenants (median of 5):");
    println!(
        "  in process (connect, run lock, template check, plan, record): {:.1} ms",
        ms(median(&in_process))
    );
    println!(
        "  raw: connect + the registry query alone:                      {:.1} ms",
        ms(median(&raw_query))
    );
    common::record(
        "fleet",
        &format!("no-op run over {tenants} tenants"),
        "ms",
        common::Better::Lower,
        ms(median(&in_process)),
        ("connect + registry query", ms(median(&raw_query))),
    );
    if let Some(bin) = bin {
        let url = format!(
            "host={} port={} user=postgres dbname=bench",
            running.socket_dir.display(),
            running.port
        );
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let out = std::process::Command::new(&bin)
                .args(["fleet", "migrate"])
                .env("DATABASE_URL", &url)
                .env("TENANTRY_TEMPLATES_DIR", &tdir)
                .output()
                .expect("run tenantry");
            times.push(t.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!(
            "  `tenantry fleet migrate` end to end (process start, bootstrap check, run): {:.1} ms",
            ms(median(&times))
        );
    }

    drop(boot);
    cluster.stop().unwrap();
    if keep_log {
        println!("statement log kept under {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Provision tenants `t<i>` for i in `range` on `sessions` pooled
/// connections (bcrypt is not what is measured: a fixed hash).
/// What a raw tenant transaction does besides the template's DDL.
#[derive(Clone, Copy)]
enum Raw {
    /// The registry's version row only: the raw limit.
    Minimal,
    /// Also a row in the tenant's own history table (at this version), as
    /// Tenantry keeps one: the same bookkeeping, without the service.
    WithHistory(i32),
}

/// `sessions` persistent connections, each taking the next tenant and
/// sending its whole transaction as one multi-statement query.
async fn raw_fan_out(
    target: &Target,
    schemas: &[String],
    column: &str,
    sessions: usize,
    kind: Raw,
) -> Duration {
    let mut clients = Vec::new();
    let setup = target.connect().await.unwrap();
    // The raw side's registry: like tenantry.tenants, the version is indexed.
    setup
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS public.raw_registry (
                 schema_name text PRIMARY KEY, template_version int NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE INDEX IF NOT EXISTS raw_registry_version_idx ON public.raw_registry (template_version);
             INSERT INTO public.raw_registry (schema_name, template_version)
             SELECT schema_name, 4 FROM tenantry.tenants ON CONFLICT DO NOTHING;",
        )
        .await
        .unwrap();
    for _ in 0..sessions {
        clients.push(target.connect().await.unwrap());
    }
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let work = clients.iter().map(|client| {
        let next = &next;
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(schema) = schemas.get(i) else { break };
                // Generated names, not input.
                let history = match kind {
                    Raw::Minimal => String::new(),
                    Raw::WithHistory(v) => format!(
                        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
                         VALUES ({v}, '{column}', now()::text, '0');"
                    ),
                };
                let sql = format!(
                    "BEGIN; SET LOCAL search_path TO {schema};\n{}{history}\
                     UPDATE public.raw_registry SET template_version = template_version + 1, updated_at = now()\
                     WHERE schema_name = '{schema}';\
                     COMMIT;",
                    version_sql(column)
                );
                client.batch_execute(&sql).await.expect("raw fan-out");
            }
        }
    });
    futures::future::join_all(work).await;
    started.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
