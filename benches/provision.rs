//! Provisioning benchmark: the service's own provisioning code against the
//! same template SQL sent raw, side by side on one private cluster.
//!
//! `cargo bench --bench provision -- [N]` (or `scripts/bench-provision [N]`).
//! For each i in 0..N it provisions one tenant through
//! `tenantry::provisioning::provision` (pool of one connection, bcrypt hash
//! precomputed) and one raw tenant: `BEGIN; CREATE SCHEMA; SET LOCAL
//! search_path; <every template>; INSERT registry row; COMMIT` as one
//! multi-statement query on one open connection. The two alternate which goes
//! first; a third variant sends the service's exact DDL raw, a fourth adds the
//! verification mail, a fifth takes a spare whose schema was built ahead
//! (`tenancy::spares`, built untimed just before). It prints median and p95 per tenant for both and their ratio, near
//! an empty fleet (the first W tenants) and near N tenants (the last W).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
mod common;

use common::{bench_db, BenchDb};
use tenantry::domain::{Email, Password, Username};
use tenantry::provisioning::{provision, NewAccount};
use tenantry::tenancy::publication::Templates;

#[tokio::main]
async fn main() {
    let n: usize = common::arg(0, "N", 1000);
    let cost: u32 = std::env::var("BCRYPT_COST")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(12);

    let BenchDb {
        dir,
        cluster,
        target,
        installation,
        boot,
        ..
    } = bench_db("bench", &[]).await;
    let published = common::builtin_published(&boot, &installation).await;
    let templates = published.get();
    let pool = target.pool(1, &installation).unwrap();
    let mut service = pool.get().await.unwrap();
    let raw = target.connect().await.unwrap();
    raw.batch_execute(
        "CREATE TABLE public.raw_registry (schema_name text PRIMARY KEY, template_version int NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    let all_sql: String = templates
        .all()
        .iter()
        .map(|t| t.sql())
        .collect::<Vec<_>>()
        .join("\n;\n");

    // bcrypt, reported on its own.
    let password = Password::parse("a perfectly fine password").unwrap();
    let mut bcrypt_times = Vec::new();
    let mut hash = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        hash = tenantry::auth::hash_password(&password, cost)
            .await
            .unwrap();
        bcrypt_times.push(t.elapsed());
    }

    let version = server_version(&raw).await;
    common::record_fact("provision", "postgres", &version);
    common::record_fact("provision", "size", &format!("{n} signups each way"));
    println!(
        "provisioning {n} tenants each way on PostgreSQL {} ({} tables per tenant from {} template versions)",
        version,
        count_tables(&all_sql),
        templates.all().len()
    );
    let bar = ProgressBar::new(n as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} tenants, eta {eta}").unwrap());
    let mut svc_times = Vec::with_capacity(n);
    let mut raw_times = Vec::with_capacity(n);
    let mut same_times = Vec::with_capacity(n);
    // Signup as the API makes it since issue 21: the same account plus its
    // verification token and mail in the outbox, in the same transaction.
    let mut mail_times = Vec::with_capacity(n);
    // Signup taking a spare whose schema is built (`tenancy::spares`, what
    // `serve` keeps a stock of): the spare made and built untimed, just
    // before.
    let mut built_times = Vec::with_capacity(n);
    // The same with a webhook endpoint registered (untimed, and removed
    // after): the signup also writes its `tenant.created` event and the
    // endpoint's delivery row, in its transaction.
    let mut event_times = Vec::with_capacity(n);
    let mut builder = target.connect().await.unwrap();
    let letters = tenantry::mail::Letters::new("http://127.0.0.1:8080");
    let started = Instant::now();
    for i in 0..n {
        let account = NewAccount {
            username: Username::parse(&format!("svc_{i}")).unwrap(),
            email: Email::parse(&format!("svc_{i}@example.com")).unwrap(),
            password_hash: hash.clone(),
            role: tenantry::auth::Role::User,
            // What an API signup writes besides the tenant: its first
            // session and its audit entry (the chain head is taken last).
            refresh_token: Some(tenantry::provisioning::RefreshTokenRow {
                family_id: uuid::Uuid::new_v4(),
                hash: tenantry::auth::new_refresh_token().1,
                user_agent: Some("bench".into()),
            }),
            idempotency_key: None,
            verification: None,
            audit: Some(tenantry::provisioning::AuditContext {
                pseudonyms: tenantry::audit::Pseudonyms::from_secret(
                    b"bench-secret-bench-secret-bench-secret",
                ),
                actor: None,
                client: None,
            }),
        };
        // Names are generated here, not user input.
        let raw_sql = format!(
            "BEGIN; CREATE SCHEMA raw_{i}; SET LOCAL search_path TO raw_{i};\n{all_sql}\n;\
             INSERT INTO public.raw_registry (schema_name, template_version) VALUES ('raw_{i}', {}); COMMIT;",
            templates.latest().get()
        );
        // The same work as the service (role, schema with grants, history table,
        // tables created as the role, history rows) sent raw in one query:
        // separates the cost of that extra DDL from the cost of the code path.
        let same_sql = format!(
            "BEGIN; CREATE ROLE same_{i}_r NOLOGIN; CREATE SCHEMA same_{i}; GRANT USAGE, CREATE ON SCHEMA same_{i} TO same_{i}_r;\
             CREATE TABLE same_{i}.refinery_schema_history (version int4 PRIMARY KEY, name varchar(255), applied_on varchar(255), checksum varchar(255));\
             SET LOCAL search_path TO same_{i}; SET LOCAL ROLE same_{i}_r;\n{all_sql}\n; RESET ROLE;\
             INSERT INTO same_{i}.refinery_schema_history SELECT v, 'v', now()::text, '0' FROM generate_series(1, {v}) v;\
             INSERT INTO public.raw_registry (schema_name, template_version) VALUES ('same_{i}', {v}); GRANT {g} TO same_{i}_r; COMMIT;",
            g = installation.group_role().quoted(),
            v = templates.latest().get()
        );
        let mail_account = with_mail(&account, &format!("mail_{i}"), &letters);
        let built_account = with_mail(&account, &format!("built_{i}"), &letters);
        let event_account = with_mail(&account, &format!("event_{i}"), &letters);
        if i % 2 == 1 {
            event_times.push(
                time_with_event(
                    &mut builder,
                    &mut service,
                    &installation,
                    &published,
                    &event_account,
                )
                .await,
            );
        }
        if i % 2 == 0 {
            built_times.push(
                time_built(
                    &mut builder,
                    &mut service,
                    &installation,
                    &published,
                    &built_account,
                )
                .await,
            );
            svc_times.push(time_service(&mut service, &installation, &published, &account).await);
            mail_times
                .push(time_service(&mut service, &installation, &published, &mail_account).await);
            raw_times.push(time_raw(&raw, &raw_sql).await);
            same_times.push(time_raw(&raw, &same_sql).await);
        } else {
            same_times.push(time_raw(&raw, &same_sql).await);
            raw_times.push(time_raw(&raw, &raw_sql).await);
            mail_times
                .push(time_service(&mut service, &installation, &published, &mail_account).await);
            svc_times.push(time_service(&mut service, &installation, &published, &account).await);
            built_times.push(
                time_built(
                    &mut builder,
                    &mut service,
                    &installation,
                    &published,
                    &built_account,
                )
                .await,
            );
        }
        if i % 2 == 0 {
            event_times.push(
                time_with_event(
                    &mut builder,
                    &mut service,
                    &installation,
                    &published,
                    &event_account,
                )
                .await,
            );
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let total = started.elapsed();

    let w = (n / 10).clamp(10.min(n), 100);
    println!();
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>14} {:>8} {:>8} {:>9} {:>9}",
        "window",
        "service med",
        "service p95",
        "raw med",
        "raw p95",
        "ratio",
        "ratio95",
        "svc max",
        "raw max"
    );
    report(
        &format!("first {w} (fleet ~0)"),
        &svc_times[..w],
        &raw_times[..w],
    );
    report(
        &format!("last {w} (fleet ~{})", 5 * n),
        &svc_times[n - w..],
        &raw_times[n - w..],
    );
    report(&format!("all {n}"), &svc_times, &raw_times);
    use common::{record, Better};
    for (which, range) in [("first", 0..w), ("last", n - w..n)] {
        let (svc, raw, same) = (
            &svc_times[range.clone()],
            &raw_times[range.clone()],
            &same_times[range],
        );
        let what = format!("signup, median of the {which} {w}");
        record(
            "provision",
            &what,
            "ms",
            Better::Lower,
            ms(median(svc)),
            ("raw template SQL", ms(median(raw))),
        );
        record(
            "provision",
            &format!("{what}, same DDL"),
            "ms",
            Better::Lower,
            ms(median(svc)),
            ("raw, same DDL", ms(median(same))),
        );
    }
    record(
        "provision",
        &format!("signup, p95 of all {n}"),
        "ms",
        Better::Lower,
        ms(p95(&svc_times)),
        ("raw template SQL", ms(p95(&raw_times))),
    );
    println!();
    println!(
        "the same DDL as the service (role, schema with grants, history table, group joined last) sent raw in one query:"
    );
    report(
        &format!("first {w} vs service"),
        &svc_times[..w],
        &same_times[..w],
    );
    report(
        &format!("last {w} vs service"),
        &svc_times[n - w..],
        &same_times[n - w..],
    );
    report(&format!("all {n} vs service"), &svc_times, &same_times);
    println!();
    println!("signup with its verification token and mail in the outbox, vs signup without:");
    report(
        &format!("all {n}: with mail / without"),
        &mail_times,
        &svc_times,
    );
    record(
        "provision",
        &format!("signup with the verification mail, median of all {n}"),
        "ms",
        Better::Lower,
        ms(median(&mail_times)),
        ("signup without it", ms(median(&svc_times))),
    );
    println!();
    println!(
        "signup (with its mail) taking a spare whose schema was built ahead, vs the raw template SQL:"
    );
    report(&format!("first {w}"), &built_times[..w], &raw_times[..w]);
    report(
        &format!("last {w}"),
        &built_times[n - w..],
        &raw_times[n - w..],
    );
    report(&format!("all {n}"), &built_times, &raw_times);
    record(
        "provision",
        &format!("signup taking a built spare schema, median of all {n}"),
        "ms",
        Better::Lower,
        ms(median(&built_times)),
        ("raw template SQL", ms(median(&raw_times))),
    );
    println!();
    println!("signup taking a built spare with a webhook endpoint registered (its event row), vs without:");
    report(
        &format!("all {n}: with the event / without"),
        &event_times,
        &built_times,
    );
    record(
        "provision",
        &format!("signup writing its webhook event, median of all {n}"),
        "ms",
        Better::Lower,
        ms(median(&event_times)),
        ("signup without an endpoint", ms(median(&built_times))),
    );
    println!();
    println!(
        "flatness (last/first median): service {:.2}, raw {:.2}",
        ms(median(&svc_times[n - w..])) / ms(median(&svc_times[..w])),
        ms(median(&raw_times[n - w..])) / ms(median(&raw_times[..w]))
    );
    println!(
        "bcrypt at cost {cost} (not in the figures above): median {:.1} ms per signup",
        ms(median(&bcrypt_times))
    );
    println!(
        "{} schemas in {:.1} s ({:.1} tenants/s all five ways together, one session each, the spares' building included)",
        5 * n,
        total.as_secs_f64(),
        (5 * n) as f64 / total.as_secs_f64()
    );
    // Every relation a backend touches stays in its caches: the cost of
    // keeping one connection provisioning for ever.
    let memory = "SELECT (sum(total_bytes) / 1048576)::int FROM pg_backend_memory_contexts";
    let svc_mb: i32 = service.query_one(memory, &[]).await.unwrap().get(0);
    let raw_mb: i32 = raw.query_one(memory, &[]).await.unwrap().get(0);
    println!(
        "backend memory after {n} provisionings: service connection {svc_mb} MiB, raw connection {raw_mb} MiB"
    );

    drop(service);
    drop(pool);
    cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn time_service(
    service: &mut deadpool_postgres::Client,
    installation: &tenantry::db::Installation,
    templates: &Templates,
    account: &NewAccount,
) -> Duration {
    let t = Instant::now();
    provision(service, installation, templates, account)
        .await
        .expect("provision");
    t.elapsed()
}

/// `account` as an API signup makes it since accounts are verified, as
/// `name`: its own session and its verification token and mail.
fn with_mail(account: &NewAccount, name: &str, letters: &tenantry::mail::Letters) -> NewAccount {
    NewAccount {
        username: Username::parse(name).unwrap(),
        email: Email::parse(&format!("{name}@example.com")).unwrap(),
        refresh_token: account.refresh_token.as_ref().map(|r| {
            tenantry::provisioning::RefreshTokenRow {
                family_id: uuid::Uuid::new_v4(),
                hash: tenantry::auth::new_refresh_token().1,
                ..r.clone()
            }
        }),
        verification: Some(tenantry::provisioning::Verification::new(letters)),
        ..account.clone()
    }
}

/// A signup that takes a spare whose schema is built: the spare made and
/// built first, untimed, so that this signup (and no other) takes it.
/// [`time_built`] with a webhook endpoint registered for the signup only.
async fn time_with_event(
    builder: &mut tokio_postgres::Client,
    service: &mut deadpool_postgres::Client,
    installation: &tenantry::db::Installation,
    published: &Templates,
    account: &NewAccount,
) -> Duration {
    builder
        .batch_execute(
            "INSERT INTO tenantry.webhooks (url, secret) VALUES ('http://127.0.0.1:9/', 'whsec_AAAA')",
        )
        .await
        .unwrap();
    let took = time_built(builder, service, installation, published, account).await;
    builder
        .batch_execute("DELETE FROM tenantry.webhooks")
        .await
        .unwrap();
    took
}

async fn time_built(
    builder: &mut tokio_postgres::Client,
    service: &mut deadpool_postgres::Client,
    installation: &tenantry::db::Installation,
    templates: &Templates,
    account: &NewAccount,
) -> Duration {
    tenantry::tenancy::spares::refill(builder, installation, 1)
        .await
        .unwrap();
    assert!(
        tenantry::tenancy::spares::build_one(builder, installation, templates, 1, &[])
            .await
            .unwrap()
            .is_some()
    );
    let took = time_service(service, installation, templates, account).await;
    let left = tenantry::tenancy::spares::count(&*builder).await.unwrap();
    assert_eq!(left, 0, "the signup took the built spare");
    took
}

async fn time_raw(client: &tokio_postgres::Client, sql: &str) -> Duration {
    let t = Instant::now();
    client.batch_execute(sql).await.expect("raw provision");
    t.elapsed()
}

fn report(label: &str, svc: &[Duration], raw: &[Duration]) {
    let (sm, sp, rm, rp) = (median(svc), p95(svc), median(raw), p95(raw));
    println!(
        "{label:<28} {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>7.2}x {:>7.2}x {:>9.0} {:>9.0}",
        ms(sm),
        ms(sp),
        ms(rm),
        ms(rp),
        ms(sm) / ms(rm),
        ms(sp) / ms(rp),
        ms(*svc.iter().max().unwrap()),
        ms(*raw.iter().max().unwrap()),
    );
}

fn sorted(d: &[Duration]) -> Vec<Duration> {
    let mut v = d.to_vec();
    v.sort();
    v
}

fn median(d: &[Duration]) -> Duration {
    sorted(d)[d.len() / 2]
}

fn p95(d: &[Duration]) -> Duration {
    let v = sorted(d);
    v[((v.len() as f64 * 0.95).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn server_version(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0)
}

fn count_tables(sql: &str) -> usize {
    sql.matches("CREATE TABLE").count()
}
