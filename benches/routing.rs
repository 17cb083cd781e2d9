//! Routed reads over HTTP vs the same SQL through pgbench, side by side on
//! one private PostgreSQL cluster (started and removed by the benchmark).
//!
//! N tenants (default 2,000) each hold a quick summary and three
//! experiences. `wrk` drives `GET /api/summaries/quick` and
//! `GET /api/experiences?q=engineer` for a random tenant per request at
//! concurrency 32 against the real service (non-superuser service role,
//! tenant guard, JWT, JSON); pgbench runs the equivalent statements with
//! schema-qualified names for a random tenant per transaction, as the
//! superuser, on as many connections; and, as the service's role, routed
//! raw three ways: the service's statements in one message, the same
//! pipelined with one Sync, and only role and search path switched (the
//! role's name read in the same message, without the guard's lock and
//! account checks).
//! Reported: requests/s and the ratios,
//! p50 and p99 latency, and the sum of PostgreSQL backends' private memory
//! (`Private_*` in /proc/<pid>/smaps_rollup) at the end of each run.
//!
//! Usage: cargo bench --bench routing -- [N] [SECONDS]

mod common;

use common::load::{run_pgbench, run_wrk, start_service, which, wrk_script, PgTarget, Session};

use tenantry::configuration::Settings;
use tenantry::db;
const CONCURRENCY: usize = 32;
const SECRET: &str = "bench-secret-bench-secret-bench-secret-01";
const SEARCH: &str = "engineer";

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 2000);
    let seconds: u64 = common::arg(1, "SECONDS", 10);
    let wrk = which("wrk").expect("wrk is not installed (scripts/bench-routing installs it)");

    let bench = common::bench_db("routing", &[("max_connections", "200")]).await;
    let bindir = bench.cluster.bindir().to_path_buf();
    let socket = bench.running.socket_dir.clone();
    let port = bench.running.port;

    // The service's own database and non-superuser role, as in production.
    let admin = db::connect(&bench.cluster.pg_config(&bench.running, "postgres"))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE routing_svc LOGIN CREATEROLE")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE routing OWNER routing_svc")
        .await
        .unwrap();
    let service_url = format!(
        "host={} port={port} user=routing_svc dbname=routing",
        socket.display()
    );
    let superuser_url = format!(
        "host={} port={port} user=postgres dbname=routing",
        socket.display()
    );
    let service_config: tokio_postgres::Config = service_url.parse().unwrap();
    let mut boot = db::connect(&service_config).await.unwrap();
    let (installation, _) = db::bootstrap(&mut boot).await.unwrap();
    let templates = common::builtin_published(&boot, &installation).await;

    println!("provisioning {n} tenants…");
    let tokens =
        common::load::provision_seeded(&service_config, &installation, &templates, n, SECRET).await;
    admin.batch_execute("CHECKPOINT").await.unwrap();

    // The service, on the default pool size and connection limits.
    let pool_size = Settings::from_env().map(|s| s.pool_size).unwrap_or(16);
    let anchors = bench.dir.join("audit-anchors");
    let (address, _server) = start_service(&service_url, SECRET, &bench.dir, anchors).await;

    let work = bench.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let lua = work.join("tokens.lua");
    std::fs::write(&lua, wrk_script(&tokens)).unwrap();

    let quick_sql = "\\set n random(1000, 999 + :tenants)\n\
         SELECT headline, content, details, revision, updated_at FROM tenant_rt:n.summaries WHERE kind = 'quick';\n";
    let search_sql = format!(
        "\\set n random(1000, 999 + :tenants)\n\
         SELECT id, kind, title, organization, employment_type, location, is_remote, industry_code, started_on, ended_on, description, COALESCE(details -> 'skills', '[]'::jsonb) AS skills, created_at, updated_at, ts_rank(doc, query) AS rank FROM tenant_rt:n.experiences, websearch_to_tsquery('english', '{SEARCH}') AS query, LATERAL (SELECT setweight(to_tsvector('english', title), 'A') || setweight(to_tsvector('english', coalesce(organization, '')), 'B') || setweight(to_tsvector('english', coalesce(details ->> 'skills', '')), 'B') || setweight(to_tsvector('english', coalesce(description, '')), 'C') AS doc) AS d WHERE doc @@ query ORDER BY rank DESC, id DESC LIMIT 51;\n"
    );

    println!(
        "\n{n} tenants, concurrency {CONCURRENCY}, {seconds} s per run, service pool {pool_size} connections; pgbench -M simple (schema-qualified names cannot be bind parameters; -M extended for the pipelined run)\n"
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9} {:>13}",
        "run", "req/s", "p50 ms", "p99 ms", "backend MB"
    );
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    common::record_fact("routing", "postgres", &version);
    common::record_fact(
        "routing",
        "size",
        &format!("{n} tenants, concurrency {CONCURRENCY}, {seconds} s per run"),
    );
    // The same reads routed the way the service routes them (the tenant's
    // shared advisory lock, the registry read with the account, session and
    // suspension checks, then search_path, role and statement timeout set
    // transaction-locally), sent raw as ONE message
    // per transaction (each statement parsed and planned every time).
    let lock = "SELECT pg_catalog.pg_advisory_xact_lock_shared(1953395828, pg_catalog.hashtext(user_id::text)) FROM tenantry.tenants WHERE username = 'rt' || :n";
    let enter = "SELECT 1 / count(*), CASE WHEN bool_or(u.suspended_at IS NOT NULL) THEN tenantry.refuse_suspended() END, pg_catalog.set_config('search_path', pg_catalog.quote_ident(max(t.schema_name)) || ', reference', true), pg_catalog.set_config('role', max(t.role_name), true), pg_catalog.set_config('statement_timeout', '5000ms', true) FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id WHERE t.username = 'rt' || :n AND t.status = 'active' AND u.token_generation = 0 AND u.disabled_at IS NULL AND NOT EXISTS (SELECT FROM tenantry.refresh_tokens r WHERE r.family_id = '00000000-0000-0000-0000-000000000000' AND r.revoked_at IS NOT NULL)";
    let routed = |select: &str| {
        format!(
            "\\set n random(1000, 999 + :tenants)\n\
             BEGIN READ ONLY\\; {lock}\\; {enter}\\; {select}\\; COMMIT;\n"
        )
    };
    // The same statements pipelined with a single Sync (`-M extended`):
    // what the routing costs with no round trips between its statements.
    let pipelined = |select: &str| {
        format!(
            "\\set n random(1000, 999 + :tenants)\n\
             \\startpipeline\nBEGIN READ ONLY;\n{lock};\n{enter};\n{select};\nCOMMIT;\n\\endpipeline\n"
        )
    };
    // Only the role and search path switched: the role's name read from
    // the registry in the same message (a tenant role's name carries no
    // username), no lock, no account check (what the guard may not skip):
    // the cost of switching tenants at all.
    let switched = |select: &str| {
        format!(
            "\\set n random(1000, 999 + :tenants)\n\
             BEGIN READ ONLY\\; SELECT pg_catalog.set_config('search_path', 'tenant_rt' || :n || ', reference', true), pg_catalog.set_config('role', (SELECT role_name FROM tenantry.tenants WHERE username = 'rt' || :n), true)\\; {select}\\; COMMIT;\n"
        )
    };
    let quick_select = "SELECT headline, content, details, revision, updated_at FROM summaries WHERE kind = 'quick'";
    let search_select = search_sql
        .lines()
        .nth(1)
        .unwrap()
        .trim_end_matches(';')
        .replace("tenant_rt:n.", "");
    for (label, path, sql, select) in [
        (
            "quick summary",
            "/api/summaries/quick".to_string(),
            quick_sql.to_string(),
            quick_select.to_string(),
        ),
        (
            "experiences?q=",
            format!("/api/experiences?q={SEARCH}"),
            search_sql.clone(),
            search_select.clone(),
        ),
    ] {
        let http = run_wrk(
            &wrk,
            &lua,
            (&address, &path),
            CONCURRENCY,
            seconds,
            &superuser_url,
        )
        .await;
        let pg = PgTarget {
            bindir: &bindir,
            host: socket.display().to_string(),
            port,
            dbname: "routing",
        };
        let load = (CONCURRENCY, seconds);
        let raw = run_pgbench(&pg, &work, &sql, n, load, "postgres", &Session::PLAIN).await;
        // The service's role, routed raw three ways (see above).
        let extended = Session {
            protocol: "extended",
            ..Session::PLAIN
        };
        let mut routed_runs = Vec::new();
        for (script, session) in [
            (routed(&select), &Session::PLAIN),
            (pipelined(&select), &extended),
            (switched(&select), &Session::PLAIN),
        ] {
            routed_runs
                .push(run_pgbench(&pg, &work, &script, n, load, "routing_svc", session).await);
        }
        let [floor, in_pipeline, switch_only]: [_; 3] =
            routed_runs.try_into().expect("three routed runs");
        for (who, run) in [
            ("service (HTTP)", &http),
            ("pgbench qualified", &raw),
            ("pgbench routed", &floor),
            ("pgbench routed, pipelined", &in_pipeline),
            ("pgbench role+path only", &switch_only),
        ] {
            println!(
                "{:<44} {:>10.0} {:>9.2} {:>9.2} {:>13.1}",
                format!("{label}: {who}"),
                run.rate,
                run.p50_ms,
                run.p99_ms,
                run.backend_mb
            );
        }
        use common::{record, Better};
        for baseline in [
            ("pgbench routed", floor.rate),
            ("pgbench qualified", raw.rate),
        ] {
            record(
                "routing",
                &format!("{label}: throughput"),
                "req/s",
                Better::Higher,
                http.rate,
                baseline,
            );
        }
        record(
            "routing",
            &format!("{label}: p99 latency"),
            "ms",
            Better::Lower,
            http.p99_ms,
            ("pgbench routed", floor.p99_ms),
        );
        println!(
            "{:<44} {:>10.2}× of qualified, {:.2}× of routed",
            format!("{label}: service ratio"),
            http.rate / raw.rate,
            http.rate / floor.rate
        );
        println!(
            "{:<44} {:>10.2}× of qualified (pipelined routing), {:.2}× (role+path only)\n",
            format!("{label}: raw routing's ceiling"),
            in_pipeline.rate / raw.rate,
            switch_only.rate / raw.rate
        );
    }
    shared_limits(&bench, &service_url, &lua, &wrk, seconds).await;
    tls_to_postgres(&bench, &admin, &lua, &wrk, quick_sql, (n, seconds)).await;
    drop(boot);
    drop(admin);
    if std::env::var_os("TENANTRY_BENCH_KEEP").is_some() {
        println!(
            "kept: {superuser_url}; the service at {address}, tokens in {}",
            lua.display()
        );
        std::future::pending::<()>().await;
    }
    bench.cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&bench.dir);
}

/// What TLS to PostgreSQL costs: the quick summary again, the service and
/// pgbench both over TCP to 127.0.0.1, first without TLS, then with
/// (`sslmode=require`: the encryption is the cost; verifying the
/// certificate happens once per connection).
async fn tls_to_postgres(
    bench: &common::BenchDb,
    admin: &tokio_postgres::Client,
    lua: &std::path::Path,
    wrk: &std::path::Path,
    quick_sql: &str,
    (n, seconds): (usize, u64),
) {
    use std::os::unix::fs::MetadataExt;
    // A certificate for the server, owned by its OS user; TCP without
    // passwords (a private cluster on loopback); ssl on by a reload.
    let pgdata = bench.cluster.data_dir().join("pgdata");
    let out = std::process::Command::new("openssl")
        .current_dir(&pgdata)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner = std::fs::metadata(&pgdata).unwrap();
    for file in ["server.key", "server.crt"] {
        let path = pgdata.join(file);
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
    let hba = pgdata.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all all 127.0.0.1/32 trust\n{rules}")).unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET ssl = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    let port = bench.running.port;
    let work = bench.dir.join("work");
    let mut runs = Vec::new();
    for mode in ["disable", "require"] {
        let url =
            format!("host=127.0.0.1 port={port} user=routing_svc dbname=routing sslmode={mode}");
        let data = bench.dir.join(format!("tcp-{mode}"));
        std::fs::create_dir_all(&data).unwrap();
        let (address, server) =
            start_service(&url, SECRET, &data, data.join("audit-anchors")).await;
        let http = run_wrk(
            wrk,
            lua,
            (&address, "/api/summaries/quick"),
            CONCURRENCY,
            seconds,
            &format!("host=127.0.0.1 port={port} user=postgres dbname=routing"),
        )
        .await;
        server.abort();
        let pg = PgTarget {
            bindir: bench.cluster.bindir(),
            host: "127.0.0.1".into(),
            port,
            dbname: "routing",
        };
        let session = Session {
            sslmode: mode,
            ..Session::PLAIN
        };
        let raw = run_pgbench(
            &pg,
            &work,
            quick_sql,
            n,
            (CONCURRENCY, seconds),
            "postgres",
            &session,
        )
        .await;
        runs.push((mode, http, raw));
    }
    for (mode, http, raw) in &runs {
        let over = if *mode == "disable" {
            "TCP"
        } else {
            "TCP + TLS"
        };
        for (who, run) in [("service (HTTP)", http), ("pgbench qualified", raw)] {
            println!(
                "{:<44} {:>10.0} {:>9.2} {:>9.2} {:>13.1}",
                format!("quick summary over {over}: {who}"),
                run.rate,
                run.p50_ms,
                run.p99_ms,
                run.backend_mb
            );
        }
    }
    let [(_, plain_http, plain_raw), (_, tls_http, tls_raw)] = &runs[..] else {
        unreachable!("two runs")
    };
    println!(
        "{:<44} {:>10.2}× of pgbench over TLS; TLS keeps {:.2}× of the service's rate, {:.2}× of pgbench's\n",
        "quick summary over TLS: service ratio",
        tls_http.rate / tls_raw.rate,
        tls_http.rate / plain_http.rate,
        tls_raw.rate / plain_raw.rate
    );
    common::record(
        "routing",
        "quick summary over TLS: throughput",
        "req/s",
        common::Better::Higher,
        tls_http.rate,
        ("pgbench qualified over TLS", tls_raw.rate),
    );
}

/// What counting rate limits in the database costs per request, the same
/// requests through a service counting them only in its process and one
/// counting them in the database too (limits high enough never to refuse):
/// the quick summary under the per-user limit, and an anonymous request
/// (`GET /api/me` without a token, a 401) under the per-IP one, whose one
/// bucket every request of the run updates.
async fn shared_limits(
    bench: &common::BenchDb,
    service_url: &str,
    lua: &std::path::Path,
    wrk: &std::path::Path,
    seconds: u64,
) {
    use common::load::start_service_with;
    use tenantry::configuration::Limits;
    let work = bench.dir.join("work");
    let anon_lua = work.join("anonymous.lua");
    std::fs::write(&anon_lua, "-- no token: an anonymous request\n").unwrap();
    let superuser_url = format!(
        "host={} port={} user=postgres dbname=routing",
        bench.running.socket_dir.display(),
        bench.running.port
    );
    let high = 100_000_000;
    let mut rows = Vec::new();
    for (label, path, script, limits) in [
        (
            "quick summary, no limits",
            "/api/summaries/quick",
            lua,
            Limits::off(),
        ),
        (
            "quick summary, per-user limit in process",
            "/api/summaries/quick",
            lua,
            Limits {
                user_per_minute: high,
                ..Limits::off()
            },
        ),
        (
            "quick summary, per-user limit shared",
            "/api/summaries/quick",
            lua,
            Limits {
                user_per_minute: high,
                shared_user: true,
                ..Limits::off()
            },
        ),
        (
            "anonymous 401, per-IP limit in process",
            "/api/me",
            &anon_lua,
            Limits {
                anon_per_minute: high,
                shared: false,
                ..Limits::off()
            },
        ),
        (
            "anonymous 401, per-IP limit shared",
            "/api/me",
            &anon_lua,
            Limits {
                anon_per_minute: high,
                ..Limits::off()
            },
        ),
    ] {
        let data = bench.dir.join(format!("limits-{}", rows.len()));
        std::fs::create_dir_all(&data).unwrap();
        let (address, server) = start_service_with(
            service_url,
            SECRET,
            &data,
            data.join("audit-anchors"),
            limits,
        )
        .await;
        let anonymous = path == "/api/me";
        let run = common::load::run_wrk_answered(
            wrk,
            script,
            (&address, path),
            CONCURRENCY,
            seconds,
            &superuser_url,
            if anonymous {
                common::load::Answers::Refused
            } else {
                common::load::Answers::Success
            },
        )
        .await;
        server.abort();
        println!(
            "{:<44} {:>10.0} {:>9.2} {:>9.2} {:>13.1}",
            label, run.rate, run.p50_ms, run.p99_ms, run.backend_mb
        );
        rows.push(run);
    }
    let [_, user_local, user_shared, anon_local, anon_shared] = &rows[..] else {
        unreachable!("five runs")
    };
    println!(
        "{:<44} {:>10.2}× per user, {:.2}× per IP (shared over in-process)\n",
        "shared rate limits",
        user_shared.rate / user_local.rate,
        anon_shared.rate / anon_local.rate
    );
    for (figure, shared, local, baseline) in [
        (
            "quick summary, per-user limit shared: throughput",
            user_shared,
            user_local,
            "per-user limit in process",
        ),
        (
            "anonymous 401, per-IP limit shared: throughput",
            anon_shared,
            anon_local,
            "per-IP limit in process",
        ),
    ] {
        common::record(
            "routing",
            figure,
            "req/s",
            common::Better::Higher,
            shared.rate,
            (baseline, local.rate),
        );
    }
}
