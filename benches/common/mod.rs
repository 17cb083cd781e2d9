//! What the benchmarks share: a private cluster (default settings, durable,
//! as in production) with a bootstrapped `bench` database.

// Each benchmark uses a part of it.
#![allow(dead_code)]

pub mod load;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use tenantry::domain::{Email, Username};
use tenantry::provisioning::{provision, NewAccount};

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

/// Provision tenants `t<i>` for `i` in `range` (`tenantry::provisioning`,
/// bcrypt skipped) on `sessions` sessions at once, with a progress bar.
pub async fn provision_many(
    target: &Target,
    installation: &db::Installation,
    templates: &tenantry::tenancy::publication::Templates,
    range: std::ops::Range<usize>,
    sessions: usize,
) {
    let pool = target.pool(sessions, installation).unwrap();
    let next = AtomicUsize::new(range.start);
    let bar = ProgressBar::new(range.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} tenants, eta {eta}").unwrap());
    let workers = (0..sessions).map(|_| async {
        let mut client = pool.get().await.unwrap();
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= range.end {
                break;
            }
            let account = NewAccount {
                username: Username::parse(&format!("t{i:05}")).unwrap(),
                email: Email::parse(&format!("t{i:05}@example.com")).unwrap(),
                password_hash: "$2b$04$bench.bench.bench.bench.bench.bench.bench.bench.be".into(),
                role: tenantry::auth::Role::User,
                refresh_token: None,
                idempotency_key: None,
                verification: None,
                audit: None,
            };
            provision(&mut client, installation, templates, &account)
                .await
                .expect("provision");
            bar.inc(1);
        }
    });
    futures::future::join_all(workers).await;
    bar.finish_and_clear();
}

/// The middle value (the upper one of an even count).
pub fn median(d: &[std::time::Duration]) -> std::time::Duration {
    let mut v = d.to_vec();
    v.sort();
    v[v.len() / 2]
}
