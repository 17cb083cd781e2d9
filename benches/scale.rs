//! Scale-out: the routing benchmark on plain PostgreSQL and on a Citus
//! coordinator with two workers, same machine, same run.
//!
//! Each target gets N tenants (default 2,000) provisioned through Tenantry
//! as a non-superuser service role, each with a quick summary and three
//! experiences. Then, on each: `wrk` drives `GET /api/summaries/quick` for a
//! random tenant per request at concurrency 32 against the real service
//! (twice: the first run on a new service, whose backends meet each tenant
//! for the first time, then the measured run on warm ones; on Citus once
//! more without TLS to the nodes, which the plain server does not use),
//! and pgbench sends the same routed transaction the service sends (the
//! tenant's shared lock, the registry read, role and search path, the
//! SELECT) as one message, at concurrency 32 and at concurrency 1 (latency).
//! On Citus pgbench runs twice: as the service's sessions are set up
//! (`citus.max_cached_conns_per_worker=0`: a new worker connection per
//! transaction) and with Citus's default worker connection cache, which
//! shows what that setting costs.
//!
//! `SCALE_WORKERS=1` takes the second worker out of the cluster before
//! anything is placed (its server runs on, idle): the same tenants on one
//! worker, to set beside a run with two.
//!
//! Usage: cargo bench --bench scale -- [N] [SECONDS]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::load::{
    run_pgbench, run_wrk, start_service, start_service_adjusted, try_run_pgbench, which,
    wrk_script, PgTarget, Run, Session,
};
use common::{record, record_fact, Better};
use tenantry::db;

const CONCURRENCY: usize = 32;
const SECRET: &str = "bench-secret-bench-secret-bench-secret-01";
const NO_WORKER_CACHE: Session<'static> = Session {
    options: "-c citus.max_cached_conns_per_worker=0",
    ..Session::PLAIN
};

/// What one target measured.
struct Figures {
    /// On Citus with direct routing (the default), after a first run of
    /// the same length (`http_cold`): a service that has been up a while.
    http: Run,
    /// The first run on a service just started: its pooled backends meet
    /// every tenant for the first time (on Citus, each also loads the
    /// tenant's table metadata then).
    http_cold: Run,
    /// Citus only: direct routing with `sslmode=disable` (warmed).
    http_no_tls: Option<Run>,
    /// Citus only: the same through the coordinator
    /// (`TENANTRY_CITUS_ROUTING=coordinator`).
    http_coordinator: Option<Run>,
    routed: Run,
    routed_one: Run,
    /// Citus only: pgbench with Citus's worker connection cache, at
    /// concurrency 32 and 1; with thousands of tenants the workers may run
    /// out of connection slots (a connection per session and tenant role).
    cached: Option<(Result<Run, String>, Result<Run, String>)>,
    /// Citus only: one tenant's shard read directly on its worker, at
    /// concurrency 1, on a persistent session, on a new connection per
    /// transaction without TLS, and with TLS as Citus connects (sslmode
    /// require): where a new worker connection's time goes.
    on_worker: Option<[Run; 3]>,
    provision_s: f64,
    /// Signups that each take a spare whose schema was built ahead
    /// (`tenancy::spares`, what `serve` keeps a stock of): their count,
    /// median time each, and how long building those spares took.
    from_spares: (usize, std::time::Duration, f64),
}

/// How many signups from built spares each target measures.
const SPARE_SIGNUPS: usize = 50;

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 2000);
    let seconds: u64 = common::arg(1, "SECONDS", 10);
    let wrk = which("wrk").expect("wrk is not installed (scripts/bench-scale installs it)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/citus-cluster");

    // Plain PostgreSQL: a private cluster, as the routing benchmark has.
    let bench = common::bench_db("scale", &[("max_connections", "200")]).await;
    common::service_database(&bench, "scale").await;
    let plain = PgTarget {
        bindir: bench.cluster.bindir(),
        host: bench.running.socket_dir.display().to_string(),
        port: bench.running.port,
        dbname: "scale",
    };

    // Citus: a coordinator and two workers (scripts/citus-cluster), the
    // `scale` database on every node, owned by the service role.
    let citus_dir = bench.dir.join("citus");
    let out = Command::new(&script)
        .args(["start", citus_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/citus-cluster start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("PORTS="))
        .map(|p| {
            p.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports.len(), 3, "PORTS=<coordinator> <worker1> <worker2>");
    let coordinator_port = ports[0];
    let out = Command::new(&script)
        .args([
            "createdb",
            "scale",
            "scale_svc",
            citus_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/citus-cluster createdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let citus = PgTarget {
        bindir: bench.cluster.bindir(),
        host: "127.0.0.1".into(),
        port: coordinator_port,
        dbname: "scale",
    };
    let workers: usize = std::env::var("SCALE_WORKERS")
        .ok()
        .map(|w| match w.as_str() {
            "1" => 1,
            "2" => 2,
            _ => panic!("SCALE_WORKERS is 1 or 2, not {w:?}"),
        })
        .unwrap_or(2);
    if workers == 1 {
        db::connect(&citus.url("postgres").parse().unwrap())
            .await
            .unwrap()
            .execute(
                "SELECT pg_catalog.citus_remove_node('127.0.0.1', $1)",
                &[&i32::from(ports[2])],
            )
            .await
            .unwrap();
    }

    let version: String = db::connect(&plain.url("postgres").parse().unwrap())
        .await
        .unwrap()
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    record_fact("scale", "postgres", &format!("{version}, Citus 12.1"));
    record_fact(
        "scale",
        "size",
        &format!(
            "{n} tenants per target, concurrency {CONCURRENCY}, {seconds} s per run; \
             Citus: coordinator + {workers} worker(s) on this machine"
        ),
    );

    let work = bench.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    println!("== plain PostgreSQL");
    let on_plain = measure(&plain, &wrk, &work, &bench.dir, n, seconds, false).await;
    println!("== Citus, coordinator + {workers} worker(s)");
    let on_citus = measure(&citus, &wrk, &work, &bench.dir, n, seconds, true).await;

    println!(
        "\n{n} tenants, concurrency {CONCURRENCY}, {seconds} s per run; all nodes on this machine\n"
    );
    println!(
        "{:<52} {:>10} {:>9} {:>9}",
        "run", "req/s", "p50 ms", "p99 ms"
    );
    let row = |label: &str, run: &Run| {
        println!(
            "{label:<52} {:>10.0} {:>9.2} {:>9.2}",
            run.rate, run.p50_ms, run.p99_ms
        );
    };
    for (name, f) in [("plain", &on_plain), ("citus", &on_citus)] {
        if let Some(through) = &f.http_coordinator {
            row(
                &format!("{name}: service, quick summary (HTTP), direct"),
                &f.http,
            );
            row(
                &format!("{name}: service, quick summary (HTTP), coordinator"),
                through,
            );
        } else {
            row(&format!("{name}: service, quick summary (HTTP)"), &f.http);
        }
        row(
            &format!("{name}: the same, first run on a new service"),
            &f.http_cold,
        );
        if let Some(run) = &f.http_no_tls {
            row(&format!("{name}: the same, direct, without TLS"), run);
        }
        row(
            &format!("{name}: pgbench routed, c={CONCURRENCY}"),
            &f.routed,
        );
        row(&format!("{name}: pgbench routed, c=1"), &f.routed_one);
        if let Some((cached, cached_one)) = &f.cached {
            for (label, run) in [
                (
                    format!("{name}: pgbench routed, worker conns cached, c={CONCURRENCY}"),
                    cached,
                ),
                (
                    format!("{name}: pgbench routed, worker conns cached, c=1"),
                    cached_one,
                ),
            ] {
                match run {
                    Ok(run) => row(&label, run),
                    Err(e) => println!("{label:<52} failed: {}", e.lines().next().unwrap_or("")),
                }
            }
        }
    }
    if let Some([warm, fresh, tls]) = &on_citus.on_worker {
        row(
            "citus: one shard read on its worker, persistent session",
            warm,
        );
        row("citus: the same on a new connection, no TLS", fresh);
        row("citus: the same on a new connection, TLS (as Citus)", tls);
    }
    println!(
        "\nprovisioning: plain {:.1} tenants/s, Citus {:.1} tenants/s",
        n as f64 / on_plain.provision_s,
        n as f64 / on_citus.provision_s
    );
    let (k, plain_spare, plain_build) = on_plain.from_spares;
    let (_, citus_spare, citus_build) = on_citus.from_spares;
    println!(
        "signup taking a built spare ({k} each, one at a time): plain {:.1} ms, Citus {:.1} ms (Citus {:.2}× plain's rate); \
         building those spares: plain {:.1}/s, Citus {:.1}/s (what a stream of signups keeps once the stock is used up)",
        plain_spare.as_secs_f64() * 1000.0,
        citus_spare.as_secs_f64() * 1000.0,
        plain_spare.as_secs_f64() / citus_spare.as_secs_f64(),
        k as f64 / plain_build,
        k as f64 / citus_build
    );
    if let Some(through) = &on_citus.http_coordinator {
        println!(
            "Citus / plain over HTTP: direct routing {:.2}× the rate, p99 {:.2}× plain's; through the coordinator {:.2}×, p99 {:.2}×",
            on_citus.http.rate / on_plain.http.rate,
            on_citus.http.p99_ms / on_plain.http.p99_ms,
            through.rate / on_plain.http.rate,
            through.p99_ms / on_plain.http.p99_ms
        );
        println!(
            "the first run on a new service (cold backends): direct routing {:.2}× the rate, p99 {:.2}× plain's",
            on_citus.http_cold.rate / on_plain.http_cold.rate,
            on_citus.http_cold.p99_ms / on_plain.http_cold.p99_ms
        );
        if let Some(run) = &on_citus.http_no_tls {
            println!(
                "direct routing without TLS to the nodes (plain has none): {:.2}× the rate, p99 {:.2}× plain's",
                run.rate / on_plain.http.rate,
                run.p99_ms / on_plain.http.p99_ms
            );
        }
    }
    println!(
        "Citus / plain: service {:.2}×, routed SQL {:.2}×; one transaction's latency {:.2} ms vs {:.2} ms (+{:.2} ms on the coordinator and its worker round trip)",
        on_citus.http.rate / on_plain.http.rate,
        on_citus.routed.rate / on_plain.routed.rate,
        on_citus.routed_one.p50_ms,
        on_plain.routed_one.p50_ms,
        on_citus.routed_one.p50_ms - on_plain.routed_one.p50_ms
    );
    if let Some((Ok(cached), Ok(cached_one))) = &on_citus.cached {
        println!(
            "Citus's worker connection cache: {:.2}× the routed rate, {:.2} ms per transaction at c=1 (the service does without it; see ARCHITECTURE.md)",
            cached.rate / on_citus.routed.rate,
            on_citus.routed_one.p50_ms - cached_one.p50_ms
        );
    }
    if let Some([warm, fresh, tls]) = &on_citus.on_worker {
        // pgbench's per-transaction latency leaves the connection out:
        // at concurrency 1 the time per transaction is 1 / rate.
        let per = |run: &Run| 1000.0 / run.rate;
        println!(
            "A new worker connection, on a worker directly: {:.2} ms per transaction on a persistent session, \
             {:.2} ms with a new connection ({:.2} ms to start a worker backend and set it up), \
             {:.2} ms with TLS as Citus connects (+{:.2} ms)",
            per(warm),
            per(fresh),
            per(fresh) - per(warm),
            per(tls),
            per(tls) - per(fresh)
        );
    }

    for (figure, unit, better, citus_value, plain_value) in [
        (
            "quick summary over HTTP: throughput",
            "req/s",
            Better::Higher,
            on_citus.http.rate,
            on_plain.http.rate,
        ),
        (
            "quick summary over HTTP: p99 latency",
            "ms",
            Better::Lower,
            on_citus.http.p99_ms,
            on_plain.http.p99_ms,
        ),
        (
            "quick summary over HTTP through the coordinator: throughput",
            "req/s",
            Better::Higher,
            on_citus.http_coordinator.as_ref().map_or(0.0, |r| r.rate),
            on_plain.http.rate,
        ),
        (
            "routed SQL (pgbench): throughput",
            "req/s",
            Better::Higher,
            on_citus.routed.rate,
            on_plain.routed.rate,
        ),
        (
            "routed SQL at concurrency 1: p50 latency",
            "ms",
            Better::Lower,
            on_citus.routed_one.p50_ms,
            on_plain.routed_one.p50_ms,
        ),
        (
            "provisioning: one tenant",
            "s",
            Better::Lower,
            on_citus.provision_s / n as f64,
            on_plain.provision_s / n as f64,
        ),
        (
            "signup taking a built spare: median",
            "ms",
            Better::Lower,
            citus_spare.as_secs_f64() * 1000.0,
            plain_spare.as_secs_f64() * 1000.0,
        ),
    ] {
        record(
            "scale",
            &format!("Citus: {figure}"),
            unit,
            better,
            citus_value,
            ("plain PostgreSQL", plain_value),
        );
    }

    let _ = Command::new(&script)
        .args(["stop", citus_dir.to_str().unwrap()])
        .status();
    bench.cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&bench.dir);
}

/// Provision, start the service, drive it, then pgbench.
async fn measure(
    target: &PgTarget<'_>,
    wrk: &Path,
    work: &Path,
    data_dir: &Path,
    n: usize,
    seconds: u64,
    citus: bool,
) -> Figures {
    let service_url = target.url("scale_svc");
    let service_config: tokio_postgres::Config = service_url.parse().unwrap();
    let mut boot = db::connect(&service_config).await.unwrap();
    let (installation, _) = db::bootstrap(&mut boot).await.unwrap();
    assert_eq!(installation.citus, citus, "the target is what it should be");
    let templates = common::builtin_published(&boot, &installation).await;
    println!("provisioning {n} tenants…");
    let started = std::time::Instant::now();
    let tokens =
        common::load::provision_seeded(&service_config, &installation, &templates, n, SECRET).await;
    let provision_s = started.elapsed().as_secs_f64();
    println!("signups from {SPARE_SIGNUPS} built spares…");
    let from_spares = from_built_spares(&service_config, &installation, &templates).await;
    boot.batch_execute("CHECKPOINT").await.ok();

    let anchors = data_dir.join(if citus { "anchors-citus" } else { "anchors" });
    let (address, server) = start_service(&service_url, SECRET, data_dir, anchors).await;
    // The service builds its stock of spare schemas in the background
    // (`tenancy::spares`; the signups above took the last ones): the reads
    // are measured with it full, as in a service that has been up a while
    // (on Citus each build is a distributed transaction on every node).
    // What `start_service` configures.
    let stock = tenantry::configuration::Settings::from_env()
        .map(|s| s.spare_schemas)
        .unwrap_or(100) as i64;
    let waited = std::time::Instant::now();
    loop {
        let row = boot
            .query_one(
                "SELECT count(schema_name), count(*) FROM tenantry.spare_roles",
                &[],
            )
            .await
            .unwrap();
        let (built, spares): (i64, i64) = (row.get(0), row.get(1));
        if built >= spares.min(stock) || waited.elapsed() > std::time::Duration::from_secs(900) {
            println!(
                "spare schemas built before the reads: {built}, after {:.0} s",
                waited.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let lua: PathBuf = work.join(if citus { "citus.lua" } else { "plain.lua" });
    std::fs::write(&lua, wrk_script(&tokens)).unwrap();
    let drive = |address: String| {
        let (lua, url) = (lua.clone(), target.url("postgres"));
        async move {
            let (address, path) = (address.as_str(), "/api/summaries/quick");
            run_wrk(wrk, &lua, (address, path), CONCURRENCY, seconds, &url).await
        }
    };
    let http_cold = drive(address.clone()).await;
    let http = drive(address).await;
    server.abort();
    let warmed = |address: String| {
        let drive = &drive;
        async move {
            drive(address.clone()).await;
            drive(address).await
        }
    };
    // On Citus, other services on the same database, measured warm as
    // above: without TLS (Citus turns `ssl` on on every node, so the
    // service reaches the workers over TLS where the plain server has
    // none), and through the coordinator.
    let other =
        |url: String, anchors: &'static str, adjust: fn(&mut tenantry::configuration::Settings)| {
            let warmed = &warmed;
            async move {
                let (address, server) =
                    start_service_adjusted(&url, SECRET, data_dir, data_dir.join(anchors), adjust)
                        .await;
                let run = warmed(address).await;
                server.abort();
                run
            }
        };
    let (http_no_tls, http_coordinator) = if citus {
        (
            Some(
                other(
                    format!("{service_url} sslmode=disable"),
                    "anchors-citus-no-tls",
                    |_| {},
                )
                .await,
            ),
            Some(
                other(service_url.clone(), "anchors-citus-coordinator", |s| {
                    s.citus_routing = tenantry::configuration::CitusRouting::Coordinator
                })
                .await,
            ),
        )
    } else {
        (None, None)
    };

    let routed = "\\set n random(1000, 999 + :tenants)\n\
         BEGIN READ ONLY\\; SELECT pg_catalog.pg_advisory_xact_lock_shared(1953395828, pg_catalog.hashtext(user_id::text)) FROM tenantry.tenants WHERE username = 'rt' || :n\\; SELECT 1 / count(*), pg_catalog.set_config('search_path', pg_catalog.quote_ident(max(t.schema_name)) || ', reference', true), pg_catalog.set_config('role', max(t.role_name), true) FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id WHERE t.username = 'rt' || :n AND t.status = 'active' AND u.token_generation = 0 AND u.disabled_at IS NULL\\; SELECT headline, content, details, revision, updated_at FROM summaries WHERE kind = 'quick'\\; COMMIT;\n";
    let options = if citus {
        &NO_WORKER_CACHE
    } else {
        &Session::PLAIN
    };
    let many = (CONCURRENCY, seconds);
    let one = (1, seconds.min(5));
    let routed_many = run_pgbench(target, work, routed, n, many, "scale_svc", options).await;
    let routed_one = run_pgbench(target, work, routed, n, one, "scale_svc", options).await;
    let on_worker = if citus {
        Some(shard_read_on_worker(target, &service_config, work, seconds.min(5)).await)
    } else {
        None
    };
    let cached = if citus {
        let user = "scale_svc";
        Some((
            try_run_pgbench(target, work, routed, n, many, user, &Session::PLAIN).await,
            try_run_pgbench(target, work, routed, n, one, user, &Session::PLAIN).await,
        ))
    } else {
        None
    };
    Figures {
        http,
        http_cold,
        http_no_tls,
        http_coordinator,
        routed: routed_many,
        routed_one,
        cached,
        on_worker,
        provision_s,
        from_spares,
    }
}

/// [`SPARE_SIGNUPS`] spares built (untimed but for the total), then as many
/// signups, one at a time, each timed, each taking one of them.
async fn from_built_spares(
    service: &tokio_postgres::Config,
    installation: &db::Installation,
    templates: &tenantry::tenancy::publication::Templates,
) -> (usize, std::time::Duration, f64) {
    use tenantry::tenancy::spares;
    let k = SPARE_SIGNUPS;
    let mut builder = db::connect(service).await.unwrap();
    let started = std::time::Instant::now();
    spares::refill(&mut builder, installation, k).await.unwrap();
    while spares::build_one(&mut builder, installation, templates, k, &[])
        .await
        .unwrap()
        .is_some()
    {}
    let build_s = started.elapsed().as_secs_f64();
    let pool = db::pool(service.clone(), 1, db::ConnectionLimits::default()).unwrap();
    let mut client = pool.get().await.unwrap();
    let hash = bcrypt::hash("not used to log in here", 4).unwrap();
    let mut times = Vec::with_capacity(k);
    for i in 0..k {
        let account = common::load::account(&format!("sp{}", 1000 + i), &hash);
        let t = std::time::Instant::now();
        let made =
            tenantry::provisioning::provision(&mut client, installation, templates, &account)
                .await
                .unwrap();
        times.push(t.elapsed());
        assert!(made.built_schema, "signup {i} took a built spare");
    }
    (k, common::median(&times), build_s)
}

/// The first tenant's quick-summary read, sent straight to the worker that
/// holds its shard: on a persistent session, on a new connection per
/// transaction without TLS, and with TLS (Citus's `sslmode=require`).
async fn shard_read_on_worker(
    coordinator: &PgTarget<'_>,
    service: &tokio_postgres::Config,
    work: &Path,
    seconds: u64,
) -> [Run; 3] {
    let client = db::connect(service).await.unwrap();
    let row = client
        .query_one(
            "SELECT pg_catalog.quote_ident(t.schema_name) || '.' || pg_catalog.quote_ident('summaries_' || s.shardid),
                    p.nodename, p.nodeport::int4
               FROM tenantry.tenants t
               JOIN pg_dist_shard s
                 ON s.logicalrelid = (pg_catalog.quote_ident(t.schema_name) || '.summaries')::regclass
               JOIN pg_dist_shard_placement p ON p.shardid = s.shardid
              WHERE t.username = 'rt1000'",
            &[],
        )
        .await
        .unwrap();
    let (shard, host, port): (String, String, i32) = (row.get(0), row.get(1), row.get(2));
    let worker = PgTarget {
        bindir: coordinator.bindir,
        host,
        port: port as u16,
        dbname: coordinator.dbname,
    };
    let sql = format!(
        "SELECT headline, content, details, revision, updated_at FROM {shard} WHERE kind = 'quick';\n"
    );
    let one = (1, seconds);
    let mut runs = Vec::new();
    for session in [
        Session::PLAIN,
        Session {
            connect_each: true,
            sslmode: "disable",
            ..Session::PLAIN
        },
        Session {
            connect_each: true,
            sslmode: "require",
            ..Session::PLAIN
        },
    ] {
        runs.push(run_pgbench(&worker, work, &sql, 1, one, "scale_svc", &session).await);
    }
    runs.try_into().unwrap_or_else(|_| unreachable!())
}
