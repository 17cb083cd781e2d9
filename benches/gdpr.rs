//! GDPR benchmark: exporting and erasing a large tenant, next to raw
//! PostgreSQL doing the same job on the same cluster.
//!
//! `cargo bench --bench gdpr -- [ROWS]` (or `scripts/bench-gdpr [ROWS]`,
//! default 100,000). Two tenants are provisioned and filled with ROWS rows
//! (experiences and messages, half each), plus a tenant with a tenth of
//! that. Reported:
//! - export: `tenancy::export::export` (one snapshot, streamed, signed)
//!   against `COPY (SELECT row_to_json(t) …) TO STDOUT` of every table;
//!   time, bytes, and this process's peak memory during each export (the
//!   high-water mark is reset before each, via /proc/self/clear_refs), for
//!   the small and the large tenant: flat memory means the two peaks match;
//! - erasure: `tenancy::erasure::erase` (count, mark, drop, verify, audit)
//!   against a raw `DROP SCHEMA … CASCADE; DROP ROLE …` of the twin tenant.

use std::time::Instant;

mod common;

use common::{bench_db, BenchDb};
use futures::StreamExt;
use tenantry::audit::Pseudonyms;
use tenantry::domain::{Email, Username};
use tenantry::provisioning::{provision, NewAccount};
use tenantry::tenancy::erasure::{erase, Requester};
use tenantry::tenancy::export::{export, ExportKey};

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::main]
async fn main() {
    let rows: i64 = common::arg(0, "ROWS", 100_000);
    let BenchDb {
        dir,
        cluster,
        target,
        installation,
        boot,
        ..
    } = bench_db("bench-gdpr", &[]).await;
    let templates = common::builtin_published(&boot, &installation).await;
    let pool = target.pool(1, &installation).unwrap();
    let sql = target.connect().await.unwrap();
    let pseudonyms = Pseudonyms::from_secret(b"bench-secret-bench-secret-bench-secret");
    let key = ExportKey::from_secret(b"bench-secret-bench-secret-bench-secret");

    let mut ids = Vec::new();
    for (name, n) in [("small", rows / 10), ("big", rows), ("twin", rows)] {
        let account = NewAccount {
            username: Username::parse(name).unwrap(),
            email: Email::parse(&format!("{name}@example.com")).unwrap(),
            password_hash: "x".into(),
            role: tenantry::auth::Role::User,
            refresh_token: None,
            idempotency_key: None,
            verification: None,
            audit: None,
        };
        let mut client = pool.get().await.unwrap();
        let t = provision(&mut client, &installation, &templates, &account)
            .await
            .unwrap();
        let s = t.schema.quoted();
        sql.batch_execute(&format!(
            "INSERT INTO {s}.experiences (title, organization, started_on, description, details)
             SELECT 'Engineer ' || i, 'Org ' || (i % 97), date '2000-01-01' + (i % 8000),
                    repeat('Built pipelines and dashboards. ', 3), jsonb_build_object('skills', jsonb_build_array('SQL', 'Rust'))
             FROM generate_series(1, {half}) i;
             INSERT INTO {s}.conversations (title) VALUES ('bench');
             INSERT INTO {s}.messages (conversation_id, author, content)
             SELECT (SELECT min(id) FROM {s}.conversations), 'user', 'Message number ' || i || ' with some text in it.'
             FROM generate_series(1, {rest}) i;
             ANALYZE {s}.experiences; ANALYZE {s}.messages;",
            half = n / 2,
            rest = n - n / 2
        ))
        .await
        .unwrap();
        ids.push((name, t.user_id, t.schema, t.role, n));
    }
    sql.batch_execute("CHECKPOINT").await.unwrap();

    let version: String = sql
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    common::record_fact("gdpr", "postgres", &version);
    common::record_fact(
        "gdpr",
        "size",
        &format!("tenants of {} and {rows} rows", rows / 10),
    );
    println!(
        "GDPR benchmark on PostgreSQL {version}, tenants of {} and {rows} rows\n",
        rows / 10
    );
    println!(
        "{:<44} {:>10} {:>12} {:>14}",
        "run", "time ms", "MB out", "peak RSS MiB"
    );
    let mut export_ms = Vec::new();
    for (name, user_id, schema, _, n) in ids.iter().take(2) {
        // Tenantry's export, drained as a client would.
        let mut client = target.connect().await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        reset_peak();
        let started = Instant::now();
        let id = *user_id;
        let key = key.clone();
        let task = tokio::spawn(async move { export(&mut client, id, &key, tx, None).await });
        let mut bytes = 0usize;
        while let Some(chunk) = rx.recv().await {
            bytes += chunk.len();
        }
        task.await.unwrap().unwrap();
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{:<44} {:>10.0} {:>12.1} {:>14.1}",
            format!("export {name} ({n} rows): tenantry"),
            ms,
            bytes as f64 / 1e6,
            peak_kib() as f64 / 1024.0
        );
        // Raw: the same rows as JSON through COPY, one table after another.
        let tables: Vec<String> = sql
            .query(
                "SELECT relname FROM pg_class WHERE relnamespace = $1::text::regnamespace AND relkind = 'r'
                 AND relname <> 'refinery_schema_history'",
                &[&schema.as_str()],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        reset_peak();
        let started = Instant::now();
        let mut raw_bytes = 0usize;
        let tx = {
            sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .unwrap();
            &sql
        };
        for table in &tables {
            let stream = tx
                .copy_out(&format!(
                    "COPY (SELECT row_to_json(t) FROM {}.\"{table}\" t) TO STDOUT",
                    schema.quoted()
                ))
                .await
                .unwrap();
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.next().await {
                raw_bytes += chunk.unwrap().len();
            }
        }
        sql.batch_execute("COMMIT").await.unwrap();
        let raw_ms = started.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{:<44} {:>10.0} {:>12.1} {:>14.1}",
            format!("export {name} ({n} rows): raw COPY"),
            raw_ms,
            raw_bytes as f64 / 1e6,
            peak_kib() as f64 / 1024.0
        );
        export_ms.push((ms, raw_ms));
    }
    for (i, (ms, raw)) in export_ms.iter().enumerate() {
        println!("export ratio ({}): {:.2}× raw", ids[i].0, ms / raw);
        common::record(
            "gdpr",
            &format!("export of {} rows", ids[i].4),
            "ms",
            common::Better::Lower,
            *ms,
            ("raw COPY in one snapshot", *raw),
        );
    }

    // Erasure of `big` through Tenantry, raw DROP of `twin`.
    let mut client = target.connect().await.unwrap();
    let started = Instant::now();
    let receipt = erase(
        &mut client,
        &Username::parse("big").unwrap(),
        &pseudonyms,
        &Requester {
            actor: "bench".into(),
            client: None,
            reason: "bench",
            only_unverified: false,
        },
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let erase_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (_, twin_id, twin_schema, twin_role, _) = &ids[2];
    let started = Instant::now();
    sql.batch_execute(&format!(
        "BEGIN; DROP SCHEMA {} CASCADE; DROP OWNED BY {r}; DROP ROLE {r};
         DELETE FROM tenantry.users WHERE id = '{twin_id}'; COMMIT;",
        twin_schema.quoted(),
        r = twin_role.quoted()
    ))
    .await
    .unwrap();
    let raw_erase_ms = started.elapsed().as_secs_f64() * 1000.0;
    common::record(
        "gdpr",
        &format!("erasure of {} rows", receipt.rows),
        "ms",
        common::Better::Lower,
        erase_ms,
        ("raw DROP SCHEMA + DROP ROLE", raw_erase_ms),
    );
    println!(
        "\nerasure of {} rows in {} tables: tenantry {:.0} ms (incl. counting rows for the receipt), raw DROP SCHEMA + DROP ROLE {:.0} ms: {:.2}× raw",
        receipt.rows,
        receipt.tables.len(),
        erase_ms,
        raw_erase_ms,
        erase_ms / raw_erase_ms
    );
    drop(client);
    drop(sql);
    drop(pool);
    cluster.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
