//! `tenantry backup DIR` and `tenantry restore DIR`: the whole installation
//! (its roles, its database, the audit anchors and the embedded data dir's
//! secret) backed up and restored as the service role, which is all a
//! managed PostgreSQL gives. `pg_dump` alone leaves the tenant roles out
//! (roles belong to the cluster) and `pg_dumpall --roles-only` needs a
//! superuser; so the roles are read from the catalog in the dump's own
//! snapshot and made again, the way provisioning makes them, before
//! `pg_restore` puts back everything that belongs to them.
//!
//! A backup is a directory (docs/backups.md): `manifest.json` (what it is,
//! with the checksum of every other file), `roles.sql`, `database.dump`
//! (`pg_dump --format=custom`), `audit-anchors` and `jwt_secret` when there
//! are. A restore goes only into an empty database, and leaves it either
//! restored or as it was.

mod files;
mod roles;
mod tools;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use tokio_postgres::IsolationLevel;

use crate::cli::{count, Failure};
use crate::configuration::{DatabaseTarget, Settings};
use crate::db::{Target, BOOTSTRAP_LOCK};
use crate::domain::InstallationId;
use crate::embedded::{Cluster, ClusterError};
use files::{Backup, Manifest, Placement, Secret, SecretSource, Staging};

/// The system migrations this binary knows (the bootstrap's own set).
mod system {
    refinery::embed_migrations!("system_migrations");
}

/// What PostgreSQL keeps with the database itself rather than in it, so a
/// dump without `--create` leaves it out: `PUBLIC` loses `TEMPORARY` and
/// `CONNECT` on the database (the migration that first did it, run again:
/// it is idempotent).
const DATABASE_PRIVILEGES: &str = include_str!("../../../system_migrations/V7__routing.sql");

/// `tenantry backup DIR`.
pub async fn backup(settings: Settings, dir: &Path) -> Result<(), Failure> {
    let staging = Staging::prepare(dir)?;
    if let DatabaseTarget::Embedded = settings.database {
        // Not a new empty cluster in a mistyped data dir.
        if !settings.data_dir.join("pgdata/PG_VERSION").exists() {
            return Err(Failure::Usage(format!(
                "there is no embedded cluster under {} (TENANTRY_DATA_DIR) to back up; \
                 set TENANTRY_DATA_DIR to the installation's data dir, or DATABASE_URL",
                settings.data_dir.display()
            )));
        }
    }
    let target = resolve(&settings, None).await?;
    let mut client = target.connect().await?;
    refuse_citus(&client, "back up").await?;
    let installed: bool = client
        .query_one(
            "SELECT to_regclass('tenantry.installation') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !installed {
        return Err(Failure::Other(format!(
            "{} holds no Tenantry installation: nothing to back up",
            where_(&target)
        )));
    }
    let pg_dump = tools::find("pg_dump", server_bindir(&target))?;
    let env = tools::libpq_conninfo(&target.config, "tenantry backup").map_err(Failure::Usage)?;

    // The anchor file before the snapshot: every anchor in the copy then
    // names an entry the dump holds (`serve` anchors the chain's committed
    // head), so `audit verify` of the restored log agrees with it.
    if let Some(anchors) = files::read_optional(&settings.audit_anchor_file)? {
        staging.write(files::ANCHORS, &anchors)?;
    }
    let secret = backed_up_secret(&settings, &staging)?;

    // One snapshot for the registry, the roles and the dump: a signup or
    // an erasure meanwhile is in all three or in none.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let snapshot: String = tx
        .query_one("SELECT pg_catalog.pg_export_snapshot()", &[])
        .await?
        .get(0);
    let facts = Facts::read(&tx).await?;
    let id = InstallationId::parse(&facts.installation_id)
        .map_err(|e| Failure::Other(format!("bad tenantry.installation row: {e}")))?;
    let found = roles::read(&tx, &id).await?;
    for note in &found.left_out {
        eprintln!("note: not in the backup (Tenantry did not make it): {note}");
    }
    let other_roles = other_roles(&tx, &id).await?;
    if !other_roles.is_empty() {
        eprintln!(
            "note: objects in this database belong to, or are granted to, roles outside the installation: {}; \
             they are not in the backup, and must exist wherever it is restored",
            other_roles.join(", ")
        );
    }
    let plan = roles::Plan::new(&id, &found.tenants).map_err(Failure::Other)?;
    staging.write(files::ROLES, plan.script(&id).as_bytes())?;
    eprintln!(
        "backup: installation {} ({}, {}, system schema V{}): {} roles written; dumping the database with {}",
        id.as_str(),
        count(facts.tenants, "tenant", "tenants"),
        count(facts.users, "account", "accounts"),
        facts.system_migration,
        plan.len(),
        pg_dump.display()
    );
    let dump = staging.path().join(files::DUMP);
    let mut args: Vec<OsString> = vec![
        "--format=custom".into(),
        "--no-password".into(),
        format!("--snapshot={snapshot}").into(),
    ];
    let mut file_arg = OsString::from("--file=");
    file_arg.push(&dump);
    args.push(file_arg);
    let took = tools::run(&pg_dump, &args, &env, "dumping the database", Some(&dump)).await?;
    tx.commit().await?;
    // pg_dump makes it by the umask; like everything in a backup it holds
    // password hashes.
    std::fs::set_permissions(&dump, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| Failure::Other(format!("cannot restrict {}: {e}", dump.display())))?;
    let size = std::fs::metadata(&dump).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "backup: database dumped in {:.1} s ({}); writing the manifest",
        took.as_secs_f64(),
        tools::bytes(size)
    );

    let manifest = Manifest {
        format: files::FORMAT,
        tenantry_version: env!("CARGO_PKG_VERSION").into(),
        created_at: chrono::Utc::now(),
        installation_id: facts.installation_id,
        system_migration: facts.system_migration,
        postgres_version: facts.server_version,
        service_role: facts.service_role,
        database: facts.database,
        tenants: facts.tenants,
        users: facts.users,
        relations: facts.relations,
        roles: found.tenants,
        other_roles,
        secret,
        files: Default::default(),
    };
    let (tenants, users) = (manifest.tenants, manifest.users);
    let dest = tokio::task::spawn_blocking(move || staging.finish(manifest)).await??;
    println!(
        "backed up installation {} to {}: {}, {}, database dump {}",
        id.as_str(),
        dest.display(),
        count(tenants, "tenant", "tenants"),
        count(users, "account", "accounts"),
        tools::bytes(size)
    );
    Ok(())
}

/// What the restore's transaction does before the dump's SQL: the roles,
/// and, for the length of the transaction, `CREATE` for the group on the
/// schemas it creates. `pg_restore` gives each tenant's tables to the
/// tenant role right after creating them, which PostgreSQL allows only when
/// the new owner may create in the schema; the dump grants that (on the
/// tenant's own schema) only at its end, with all privileges. Held through
/// the group, it is taken back in [`postlude`], in the same transaction, so
/// no one ever sees it.
fn prelude(plan: &roles::Plan, existing: &std::collections::HashSet<String>) -> String {
    format!(
        "SET client_min_messages = warning;\n{}ALTER DEFAULT PRIVILEGES GRANT CREATE ON SCHEMAS TO {};\n",
        plan.sql(existing),
        plan.group().quoted()
    )
}

/// What the restore's transaction does after the dump's SQL: take back
/// what [`prelude`] lent (the group never has `CREATE` anywhere), and the
/// database's own privileges ([`DATABASE_PRIVILEGES`]).
fn postlude(plan: &roles::Plan) -> String {
    let group = plan.group().quoted();
    // The group's name is a validated role name quoted as an identifier:
    // a-z, 0-9, _ and the two double quotes, nothing that ends a literal.
    format!(
        "ALTER DEFAULT PRIVILEGES REVOKE CREATE ON SCHEMAS FROM {group};
DO $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT n.nspname FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
             WHERE a.grantee = '{group}'::pg_catalog.regrole AND a.privilege_type = 'CREATE' LOOP
        EXECUTE pg_catalog.format('REVOKE CREATE ON SCHEMA %I FROM {group}', s.nspname);
    END LOOP;
END
$$;
{DATABASE_PRIVILEGES}"
    )
}

/// `tenantry restore DIR`.
pub async fn restore(settings: Settings, dir: &Path) -> Result<(), Failure> {
    eprintln!("restore: checking the files of {}", dir.display());
    let owned = dir.to_owned();
    let backup = tokio::task::spawn_blocking(move || Backup::open(&owned)).await??;
    let m = &backup.manifest;
    let id = InstallationId::parse(&m.installation_id)
        .map_err(|e| Failure::Usage(format!("{}: {e}", dir.display())))?;
    let plan = roles::Plan::new(&id, &m.roles)
        .map_err(|e| Failure::Usage(format!("{}: {e}", dir.display())))?;
    let known = known_system_migration();
    if i64::from(m.system_migration) > known {
        return Err(Failure::Usage(format!(
            "this backup is of a newer Tenantry (system schema V{}, tenantry {}); this one knows V{known}: \
             restore it with that version or a newer one",
            m.system_migration, m.tenantry_version
        )));
    }
    eprintln!(
        "restore: installation {} as backed up at {} by tenantry {}: {}, {}, system schema V{}",
        id.as_str(),
        m.created_at.to_rfc3339(),
        m.tenantry_version,
        count(m.tenants, "tenant", "tenants"),
        count(m.users, "account", "accounts"),
        m.system_migration
    );
    // What goes outside the database is decided before anything changes.
    let anchors = anchors_to_place(&backup, &settings)?;
    let secret = secret_to_place(&backup, &settings)?;

    let target = resolve(&settings, Some(m.relations)).await?;
    let client = target.connect().await?;
    refuse_citus(&client, "restore").await?;
    check_service_role(&client, m, &settings).await?;
    // Held to the end: a `serve` or another command starting on this
    // database meanwhile waits, then finds the restored installation
    // instead of bootstrapping a new one under the restore.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    check_empty(&client, &where_(&target)).await?;
    let existing = roles::existing(&client, &plan).await?;
    check_other_roles(&client, &m.other_roles).await?;
    let pg_restore = tools::find("pg_restore", server_bindir(&target))?;
    let psql = tools::find("psql", server_bindir(&target))?;
    let env = tools::libpq_conninfo(&target.config, "tenantry restore").map_err(Failure::Usage)?;
    let dump = backup.dir.join(files::DUMP);
    let contents = tools::list(&pg_restore, &dump).await?;
    if contents
        .lines()
        .any(|l| !l.starts_with(';') && l.contains(" BLOB "))
    {
        return Err(Failure::Usage(
            "the dump holds large objects, which Tenantry never makes; restore it by hand with pg_restore".into(),
        ));
    }
    warn_about_locks(&client, m.relations + plan.len() as i64).await?;

    eprintln!(
        "restore: making {}{} and restoring the database, in one transaction, with {} and {}",
        count(plan.len() - existing.len(), "role", "roles"),
        if existing.is_empty() {
            String::new()
        } else {
            format!(" (taking over {} that exist)", existing.len())
        },
        pg_restore.display(),
        psql.display()
    );
    let took = tools::restore_in_one_transaction(
        &pg_restore,
        &psql,
        &dump,
        &env,
        &prelude(&plan, &existing),
        &postlude(&plan),
    )
    .await?;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    eprintln!("restore: database restored in {:.1} s", took.as_secs_f64());

    if let Some((content, placement)) = anchors {
        let path = &settings.audit_anchor_file;
        match placement {
            Placement::Copy => {
                files::write_new(path, &content)?;
                eprintln!("restore: audit anchors written to {}", path.display());
            }
            Placement::Same => {}
            Placement::Longer => eprintln!(
                "note: {} holds the backup's audit anchors and later ones: kept; `audit verify` reports \
                 the entries written after the backup as removed (the restore did remove them)",
                path.display()
            ),
        }
    }
    if let Some((content, path)) = secret {
        files::write_new(&path, &content)?;
        eprintln!(
            "restore: the installation's secret written to {}",
            path.display()
        );
    }
    println!(
        "restored installation {} from {}: {}, {}, {}; system schema V{}",
        id.as_str(),
        dir.display(),
        count(m.tenants, "tenant", "tenants"),
        count(m.users, "account", "accounts"),
        count(plan.len(), "role", "roles"),
        m.system_migration
    );
    println!(
        "next: `tenantry serve` (it brings the system schema to V{known}); \
         `tenantry fleet check` and `tenantry audit verify` check the result"
    );
    Ok(())
}

/// The database, as every command reaches it. For a restore into an
/// embedded cluster that is not running yet, it is started with a lock
/// table large enough for the restore's one transaction, which locks every
/// relation: `relations` of the backup, and the table holds
/// `max_locks_per_transaction` × (200 connections + 22 background slots).
async fn resolve(settings: &Settings, relations: Option<i64>) -> Result<Target, Failure> {
    if let DatabaseTarget::Embedded = settings.database {
        let data_dir = settings.data_dir.clone();
        let locks = relations.and_then(locks_for);
        let running = tokio::task::spawn_blocking(move || {
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
        let (cluster, running) = running;
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

/// `max_locks_per_transaction` for `relations` locked at once, when the
/// default (64) is too small.
fn locks_for(relations: i64) -> Option<u32> {
    /// The embedded cluster's connections plus PostgreSQL 15's default
    /// background slots (autovacuum workers + 1, worker processes, WAL senders).
    const SLOTS: i64 = 200 + 4 + 8 + 10;
    let needed = relations.max(0) * 5 / 4 + 1000;
    let per_slot = u32::try_from(needed / SLOTS + 1).unwrap_or(u32::MAX);
    (per_slot > 64).then_some(per_slot)
}

/// The embedded cluster's server binaries: its `pg_dump` and `pg_restore`
/// are of the server's version.
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
            target.config.get_dbname().unwrap_or("?")
        ),
    }
}

async fn refuse_citus(client: &tokio_postgres::Client, what: &str) -> Result<(), Failure> {
    let citus: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    if citus {
        return Err(Failure::Usage(format!(
            "this database is a Citus coordinator: `tenantry {what}` covers plain PostgreSQL only, \
             whose one database holds every tenant; a Citus cluster's tenants live on its workers, \
             so use Citus's own backup of every node (docs/backups.md)"
        )));
    }
    Ok(())
}

/// The installation's facts, in the snapshot of the dump.
struct Facts {
    installation_id: String,
    service_role: String,
    database: String,
    server_version: String,
    system_migration: i32,
    tenants: i64,
    users: i64,
    relations: i64,
}

impl Facts {
    async fn read(tx: &tokio_postgres::Transaction<'_>) -> Result<Facts, tokio_postgres::Error> {
        // Relations made after initdb (oid 16384 on): what a restore locks.
        let row = tx
            .query_one(
                "SELECT i.id, current_user::text, current_database()::text,
                        current_setting('server_version'),
                        (SELECT max(version) FROM tenantry.refinery_schema_history),
                        (SELECT count(*) FROM tenantry.tenants),
                        (SELECT count(*) FROM tenantry.users),
                        (SELECT count(*) FROM pg_catalog.pg_class WHERE oid >= 16384)
                 FROM tenantry.installation i",
                &[],
            )
            .await?;
        Ok(Facts {
            installation_id: row.get(0),
            service_role: row.get(1),
            database: row.get(2),
            server_version: row.get(3),
            system_migration: row.get::<_, Option<i32>>(4).unwrap_or(0),
            tenants: row.get(5),
            users: row.get(6),
            relations: row.get(7),
        })
    }
}

/// Roles outside the installation (and not the service) that own objects
/// or hold privileges in this database: `pg_restore` needs them.
async fn other_roles(
    tx: &tokio_postgres::Transaction<'_>,
    id: &InstallationId,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let prefix = format!("tnt_{}_", id.as_str());
    Ok(tx
        .query(
            "SELECT DISTINCT a.rolname::text FROM pg_catalog.pg_shdepend d
             JOIN pg_catalog.pg_roles a ON a.oid = d.refobjid
             WHERE d.refclassid = 'pg_catalog.pg_authid'::regclass
               AND d.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
               AND a.rolname <> current_user AND NOT starts_with(a.rolname, $1)
             ORDER BY 1",
            &[&prefix],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The installation's secret: the data dir's generated one goes into the
/// backup; `JWT_SECRET` stays with the admin, and the backup records a
/// check value of it so that a restore can tell whether it runs with the
/// same one.
fn backed_up_secret(settings: &Settings, staging: &Staging) -> Result<Secret, Failure> {
    let source = match (&settings.jwt_secret, &settings.database) {
        (Some(_), _) => SecretSource::Environment,
        (None, DatabaseTarget::Embedded) => SecretSource::DataDir,
        (None, DatabaseTarget::Url(_)) => {
            eprintln!(
                "note: JWT_SECRET is not set, so the backup cannot tell which secret the installation runs with: \
                 keep the service's JWT_SECRET with the backup"
            );
            return Ok(Secret {
                source: SecretSource::Unknown,
                check: None,
            });
        }
    };
    let secret = settings
        .jwt_secret()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if source == SecretSource::DataDir {
        staging.write(files::SECRET, secret.expose().as_bytes())?;
    }
    Ok(Secret {
        source,
        check: Some(files::secret_check(secret.expose())),
    })
}

/// The backup's anchor file, and how it goes to `TENANTRY_AUDIT_ANCHOR_FILE`;
/// another installation's (or another history's) file there is refused.
fn anchors_to_place(
    backup: &Backup,
    settings: &Settings,
) -> Result<Option<(Vec<u8>, Placement)>, Failure> {
    let Some(file) = backup.file(files::ANCHORS) else {
        return Ok(None);
    };
    let content = std::fs::read(&file)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
    let path = &settings.audit_anchor_file;
    let existing = files::read_optional(path)?;
    match files::placement(&content, existing.as_deref(), true) {
        Some(placement) => Ok(Some((content, placement))),
        None => Err(Failure::Usage(format!(
            "{} (TENANTRY_AUDIT_ANCHOR_FILE) exists and holds other anchors than the backup's; it is never \
             overwritten: move it away, or point TENANTRY_AUDIT_ANCHOR_FILE elsewhere",
            path.display()
        ))),
    }
}

/// The backup's secret, when it goes into the embedded data dir: its
/// content and path. Otherwise says what to do about the secret.
fn secret_to_place(
    backup: &Backup,
    settings: &Settings,
) -> Result<Option<(Vec<u8>, PathBuf)>, Failure> {
    let recorded = &backup.manifest.secret;
    let differs = |secret: &str| recorded.check.as_deref() != Some(&files::secret_check(secret));
    match (
        &settings.jwt_secret,
        &settings.database,
        backup.file(files::SECRET),
    ) {
        (Some(secret), _, file) if recorded.check.is_some() && differs(secret.expose()) => {
            let keep = match file {
                Some(file) => format!("set JWT_SECRET_FILE to a copy of {}", file.display()),
                None => "set JWT_SECRET to the one it ran with".into(),
            };
            eprintln!(
                "warning: JWT_SECRET is not the secret this installation ran with: its audit pseudonyms \
                 and signed exports will not match the old ones; to keep them, {keep}"
            );
            Ok(None)
        }
        (Some(_), _, _) => Ok(None),
        (None, DatabaseTarget::Embedded, Some(file)) => {
            let content = std::fs::read(&file)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
            let path = settings.data_dir.join("jwt_secret");
            match files::placement(&content, files::read_optional(&path)?.as_deref(), false) {
                Some(Placement::Copy) => Ok(Some((content, path))),
                Some(_) => Ok(None),
                None => Err(Failure::Usage(format!(
                    "{} holds another secret than the backup's: this data dir belongs to another \
                     installation; restore into a data dir of its own",
                    path.display()
                ))),
            }
        }
        (None, DatabaseTarget::Url(_), Some(file)) => {
            eprintln!(
                "note: the installation's secret is {}: set JWT_SECRET_FILE to a copy of it for `serve` and the other commands",
                file.display()
            );
            Ok(None)
        }
        (None, _, None) if recorded.source == SecretSource::Environment => {
            eprintln!(
                "note: the installation ran with JWT_SECRET: set the same one for `serve` and the other commands"
            );
            Ok(None)
        }
        (None, _, None) => Ok(None),
    }
}

/// The backup's objects belong to its service role: a restore runs as a
/// role of that name, able to make roles.
async fn check_service_role(
    client: &tokio_postgres::Client,
    manifest: &Manifest,
    settings: &Settings,
) -> Result<(), Failure> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolcreaterole OR r.rolsuper
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let (user, can_create): (String, bool) = (row.get(0), row.get(1));
    if user != manifest.service_role {
        let how = match settings.database {
            DatabaseTarget::Embedded => format!(
                "the embedded cluster's service role is {user}: restore it with DATABASE_URL, as a role \
                 named {} owning an empty database (docs/backups.md)",
                manifest.service_role
            ),
            DatabaseTarget::Url(_) => format!(
                "connect as a role named {} (LOGIN CREATEROLE, owning an empty database; docs/backups.md)",
                manifest.service_role
            ),
        };
        return Err(Failure::Usage(format!(
            "the backup's objects belong to the role {}, and this connection is {user}: {how}",
            manifest.service_role
        )));
    }
    if !can_create {
        return Err(Failure::Usage(format!(
            "the role {user} cannot create roles: it needs CREATEROLE, as the service role always does"
        )));
    }
    Ok(())
}

/// Restore goes into an empty database only: never over an installation.
async fn check_empty(client: &tokio_postgres::Client, place: &str) -> Result<(), Failure> {
    let row = client
        .query_one(
            "SELECT to_regclass('tenantry.users') IS NOT NULL,
                    coalesce(array_agg(n.nspname::text ORDER BY n.nspname), '{}')
             FROM pg_catalog.pg_namespace n
             WHERE n.nspname IN ('tenantry', 'reference') OR n.nspname LIKE 'tenant\\_%'",
            &[],
        )
        .await?;
    let (installed, schemas): (bool, Vec<String>) = (row.get(0), row.get(1));
    if installed {
        return Err(Failure::Usage(format!(
            "{place} holds a Tenantry installation already (tenantry.users exists); a restore never \
             overwrites one: restore into a new, empty database"
        )));
    }
    if !schemas.is_empty() {
        let shown: Vec<&str> = schemas.iter().take(5).map(String::as_str).collect();
        return Err(Failure::Usage(format!(
            "{place} is not empty: it has the schema(s) {}{}; restore into a new, empty database",
            shown.join(", "),
            if schemas.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

async fn check_other_roles(
    client: &tokio_postgres::Client,
    roles: &[String],
) -> Result<(), Failure> {
    if roles.is_empty() {
        return Ok(());
    }
    let present: Vec<String> = client
        .query(
            "SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolname::text = ANY($1::text[])",
            &[&roles],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&str> = roles
        .iter()
        .filter(|r| !present.contains(r))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Failure::Usage(format!(
            "objects in the backup belong to, or are granted to, roles this cluster does not have: {}; \
             create them first",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Say when the server's lock table looks too small for the restore's one
/// transaction (it may still fit: the table has some slack).
async fn warn_about_locks(client: &tokio_postgres::Client, relations: i64) -> Result<(), Failure> {
    let size: i64 = client.query_one(tools::LOCK_TABLE_SIZE, &[]).await?.get(0);
    if relations + 1000 > size {
        eprintln!(
            "warning: the restore locks about {relations} relations in one transaction and this server's lock \
             table holds about {size}: if it fails with \"out of shared memory\", raise max_locks_per_transaction \
             (to {} or more) and restart the server",
            locks_for(relations).unwrap_or(64)
        );
    }
    Ok(())
}

/// The last system migration this binary has.
fn known_system_migration() -> i64 {
    system::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_installation_needs_no_larger_lock_table() {
        assert_eq!(locks_for(0), None);
        assert_eq!(locks_for(10_000), None);
        // 10,000 tenants of about 40 relations each.
        let locks = locks_for(400_000).unwrap();
        assert!(u64::from(locks) * 222 >= 400_000 * 5 / 4, "{locks}");
    }

    #[test]
    fn this_binary_knows_the_system_migrations_in_the_tree() {
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/system_migrations"))
            .unwrap()
            .count();
        assert_eq!(known_system_migration(), files as i64);
    }
}
