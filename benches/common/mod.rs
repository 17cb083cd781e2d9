//! What the benchmarks share: a private cluster (default settings, durable,
//! as in production) with a bootstrapped `bench` database.

// Each benchmark uses a part of it.
#![allow(dead_code)]

pub mod load;

use std::path::PathBuf;

use tenantry::db::{self, Installation, Target};
use tenantry::embedded::{Cluster, Running};

/// The `index`th positional argument (flags such as cargo's `--bench` are
/// skipped).
pub fn positional(index: usize) -> Option<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .nth(index)
}

/// The `index`th positional argument parsed, `default` without it; one that
/// does not parse stops the benchmark, naming `name`.
pub fn arg<T: std::str::FromStr>(index: usize, name: &str, default: T) -> T {
    positional(index).map_or(default, |a| {
        a.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {a:?}"))
    })
}

pub struct BenchDb {
    pub dir: PathBuf,
    pub cluster: Cluster,
    pub running: Running,
    pub target: Target,
    /// The connection that ran the bootstrap.
    pub boot: tokio_postgres::Client,
    pub installation: Installation,
}

/// Start a cluster under a fresh temp dir named after `name` and the
/// process, with `settings`, create and bootstrap the `bench` database.
pub async fn bench_db(name: &str, settings: &[(&str, &str)]) -> BenchDb {
    let dir = std::env::temp_dir().join(format!("tenantry-{name}-{}", std::process::id()));
    bench_db_in(dir, settings).await
}

/// The same in `dir`, which may hold such a cluster from an earlier run
/// (then it is started again and its `bench` database kept).
pub async fn bench_db_in(dir: PathBuf, settings: &[(&str, &str)]) -> BenchDb {
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let cluster = Cluster::open(&dir).expect("open cluster");
    let running = cluster.ensure_running(settings).expect("start cluster");
    let admin = db::connect(&cluster.pg_config(&running, "postgres"))
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = 'bench'", &[])
        .await
        .unwrap()
        .is_some();
    if !exists {
        admin.batch_execute("CREATE DATABASE bench").await.unwrap();
    }
    let target = Target {
        connector: db::Connector::plain(cluster.pg_config(&running, "bench")),
        embedded: None,
    };
    let mut boot = target.connect().await.unwrap().into_client();
    let (installation, _) = db::bootstrap(&mut boot).await.unwrap();
    BenchDb {
        dir,
        cluster,
        running,
        target,
        boot,
        installation,
    }
}

/// A database `name` owned by a new non-superuser role `<name>_svc` with
/// `CREATEROLE`, as the service runs in production, on the bench's cluster.
pub async fn service_database(bench: &BenchDb, name: &str) {
    let admin = db::connect(&bench.cluster.pg_config(&bench.running, "postgres"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE ROLE {name}_svc LOGIN CREATEROLE"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}_svc"))
        .await
        .unwrap();
}

/// The built-in templates, published in the bench's database (what the
/// first `serve` on a new installation does).
pub async fn builtin_published(
    boot: &tokio_postgres::Client,
    installation: &Installation,
) -> tenantry::tenancy::publication::Templates {
    tenantry::tenancy::publication::Templates::publishing(
        boot,
        installation,
        tenantry::templates::TemplateSet::builtin().unwrap(),
        "bench",
    )
    .await
    .unwrap()
}

/// How a figure compares with its baseline.
#[derive(Clone, Copy)]
pub enum Better {
    /// A time: lower is better.
    Lower,
    /// A rate: higher is better.
    Higher,
}

/// One figure beside its raw-PostgreSQL baseline, for `scripts/bench`'s
/// report: appended as a JSON line to `$TENANTRY_BENCH_RESULTS` when that
/// is set (the benchmark prints its own table either way).
pub fn record(
    bench: &str,
    figure: &str,
    unit: &str,
    better: Better,
    tenantry: f64,
    baseline: (&str, f64),
) {
    write_line(serde_json::json!({
        "bench": bench,
        "figure": figure,
        "unit": unit,
        "higher_is_better": matches!(better, Better::Higher),
        "tenantry": tenantry,
        "baseline_name": baseline.0,
        "baseline": baseline.1,
    }));
}

/// A fact about the run (`postgres` version, the benchmark's size, …).
pub fn record_fact(bench: &str, key: &str, value: &str) {
    write_line(serde_json::json!({ "bench": bench, "fact": key, "value": value }));
}

fn write_line(line: serde_json::Value) {
    let Some(path) = std::env::var_os("TENANTRY_BENCH_RESULTS") else {
        return;
    };
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the results file");
    writeln!(file, "{line}").expect("write the results file");
}
