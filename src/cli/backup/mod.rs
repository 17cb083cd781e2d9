//! `tenantry backup DIR` and `tenantry restore DIR`: the whole installation
//! (its roles, its database, the audit anchors and the embedded data dir's
//! secret) backed up and restored as the service role, which is all a
//! managed PostgreSQL gives. `pg_dump` alone leaves the tenant roles out
//! (roles belong to the cluster) and `pg_dumpall --roles-only` needs a
//! superuser; so the roles are read from the catalog in the dump's own
//! snapshot and made again, the way provisioning makes them, in the
//! restore's one transaction, before everything that belongs to them.
//!
//! A backup is a directory (docs/backups.md): `manifest.json` (what it is,
//! with the checksum of every other file), `roles.sql`, `database.dump`
//! (`pg_dump --format=custom`), `audit-anchors` and `jwt_secret` when there
//! are. A restore goes only into an empty database, and leaves it either
//! restored or as it was.

mod files;
mod make;
mod restore;
mod roles;
mod tools;

use std::path::Path;

pub use make::backup;
pub use restore::restore;

use crate::cli::Failure;
use crate::configuration::{DatabaseTarget, Settings};
use crate::db::Target;
use crate::embedded::{Cluster, ClusterError};

/// The database, as every command reaches it. For a restore into an
/// embedded cluster that is not running yet, it is started with a lock
/// table large enough for the restore's one transaction, which locks each
/// of the backup's `relations`.
async fn resolve(settings: &Settings, relations: Option<i64>) -> Result<Target, Failure> {
    if let DatabaseTarget::Embedded = settings.database {
        let data_dir = settings.data_dir.clone();
        let locks = relations.and_then(locks_for);
        let (cluster, running) = tokio::task::spawn_blocking(move || {
            let cluster = Cluster::open(&data_dir)?;
            let locks = locks.map(|n| n.to_string());
            let extra: Vec<(&str, &str)> = locks
                .iter()
                .map(|n| ("max_locks_per_transaction", n.as_str()))
                .collect();
            let running = cluster.ensure_running(&extra)?;
            Ok::<_, ClusterError>((cluster, running))
        })
        .await??;
        if running.started_here {
            eprintln!(
                "note: started the embedded PostgreSQL under {} (port {}); it keeps running for the next command: `tenantry db stop` stops it",
                cluster.data_dir().display(),
                running.port
            );
        }
    }
    Ok(Target::resolve(settings).await?)
}

/// `max_locks_per_transaction` for `relations` locked at once on the
/// embedded cluster, when the default (64) is too small.
fn locks_for(relations: i64) -> Option<u32> {
    /// The embedded cluster's connections plus PostgreSQL's default
    /// background slots (autovacuum workers + 1, worker processes, WAL
    /// senders): what `max_locks_per_transaction` is multiplied by.
    const SLOTS: i64 = 200 + 4 + 8 + 10;
    let needed = relations.max(0) * 5 / 4 + 1000;
    let per_slot = u32::try_from(needed / SLOTS + 1).unwrap_or(u32::MAX);
    (per_slot > 64).then_some(per_slot)
}

/// Say when the server's lock table looks too small for `locks` held by
/// `what` in one transaction (it may still fit: the table has some slack,
/// and other sessions hold some).
async fn warn_about_locks(
    client: &impl tokio_postgres::GenericClient,
    locks: i64,
    what: &str,
) -> Result<(), Failure> {
    let row = client.query_one(tools::LOCK_TABLE, &[]).await?;
    let (per_slot, slots): (i64, i64) = (row.get(0), row.get(1));
    let needed = locks + 1000;
    if needed > per_slot * slots {
        eprintln!(
            "warning: {what} locks about {locks} relations in one transaction, and this server's lock table \
             holds about {}: if it fails with \"out of shared memory\", set max_locks_per_transaction to {} \
             or more (it is {per_slot}) and restart the server (docs/backups.md, \"Large installations\")",
            per_slot * slots,
            needed / slots.max(1) + 1
        );
    }
    Ok(())
}

/// The embedded cluster's server binaries: its `pg_dump`, `pg_restore` and
/// `psql` are of the server's version.
fn server_bindir(target: &Target) -> Option<&Path> {
    target
        .embedded
        .as_ref()
        .map(|(cluster, _)| cluster.bindir())
}

/// Where the command works, for its messages.
fn where_(target: &Target) -> String {
    match &target.embedded {
        Some((cluster, _)) => format!(
            "the embedded cluster under {}",
            cluster.data_dir().display()
        ),
        None => format!(
            "database {} (DATABASE_URL)",
            target.connector.config().get_dbname().unwrap_or("?")
        ),
    }
}

/// A Citus coordinator's tenants live on its workers, which no dump of the
/// coordinator holds: refused (exit 2).
async fn refuse_citus(client: &tokio_postgres::Client, what: &str) -> Result<(), Failure> {
    if crate::db::citus::is_coordinator(client).await? {
        return Err(Failure::Usage(format!(
            "this database is a Citus coordinator: `tenantry {what}` covers plain PostgreSQL only, \
             whose one database holds every tenant; a Citus cluster's tenants live on its workers, \
             so use Citus's own backup of every node (docs/backups.md)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_installation_needs_no_larger_lock_table() {
        assert_eq!(locks_for(0), None);
        assert_eq!(locks_for(10_000), None);
        // 10,000 tenants of 64 relations each.
        let locks = locks_for(640_000).unwrap();
        assert!(u64::from(locks) * 222 >= 640_000 * 5 / 4, "{locks}");
    }
}
