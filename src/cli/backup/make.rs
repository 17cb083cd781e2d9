//! `tenantry backup DIR`: the roles and the facts of the manifest read in
//! the snapshot that `pg_dump` then dumps.

use std::ffi::OsString;
use std::path::Path;

use tokio_postgres::{IsolationLevel, Transaction};

use super::files::{self, Manifest, Secret, SecretSource, Staging};
use super::{roles, tools};
use crate::cli::{count, Failure};
use crate::configuration::{DatabaseTarget, Settings};
use crate::db::Target;
use crate::domain::InstallationId;

/// `tenantry backup DIR`.
pub async fn backup(settings: Settings, dir: &Path) -> Result<(), Failure> {
    let staging = Staging::prepare(dir)?;
    let target = source(&settings).await?;
    let mut client = target.connect().await?;
    check_source(&client, &target).await?;
    let pg_dump = tools::find("pg_dump", super::server_bindir(&target))?;
    let env =
        tools::libpq_conninfo(&target.connector, "tenantry backup").map_err(Failure::Usage)?;

    // The anchor file before the snapshot: every anchor in the copy then
    // names an entry the dump holds (`serve` anchors the chain's committed
    // head), so `audit verify` of the restored log agrees with it.
    match files::read_optional(&settings.audit_anchor_file)? {
        Some(anchors) => staging.write(files::ANCHORS, &anchors)?,
        None => eprintln!(
            "note: no audit anchor file at {} (TENANTRY_AUDIT_ANCHOR_FILE) yet: `serve` writes the first anchor within TENANTRY_MAINTENANCE_INTERVAL; the backup has none",
            settings.audit_anchor_file.display()
        ),
    }
    let secret = backed_up_secret(&settings, &staging)?;

    // No spare's built schema is renamed while the database is dumped
    // (`db::BACKUP_LOCK_CLASS`): taken before the snapshot, held until the
    // dump is done (a session lock: it ends with this connection).
    client
        .execute(
            "SELECT pg_catalog.pg_advisory_lock($1, 0)",
            &[&crate::db::BACKUP_LOCK_CLASS],
        )
        .await?;
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
    let state = Snapshot::read(&tx).await?;
    staging.write(files::ROLES, state.plan.script(&state.id).as_bytes())?;
    eprintln!(
        "backup: installation {} ({}, {}, system schema V{}): {} written; dumping the database with {}",
        state.id.as_str(),
        count(state.facts.tenants, "tenant", "tenants"),
        count(state.facts.users, "account", "accounts"),
        state.facts.system_migration,
        count(state.plan.len(), "role", "roles"),
        pg_dump.display()
    );
    super::warn_about_locks(&tx, state.facts.tables, "pg_dump").await?;
    let size = dump(&pg_dump, &env, &snapshot, &staging).await?;
    tx.commit().await?;
    client
        .execute(
            "SELECT pg_catalog.pg_advisory_unlock($1, 0)",
            &[&crate::db::BACKUP_LOCK_CLASS],
        )
        .await?;

    let (id, tenants, users) = (state.id.clone(), state.facts.tenants, state.facts.users);
    let manifest = state.manifest(secret);
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

/// The database to back up, as every command reaches it; on the embedded
/// cluster, only one that exists (not a new, empty one in a mistyped data
/// dir).
async fn source(settings: &Settings) -> Result<Target, Failure> {
    if let DatabaseTarget::Embedded = settings.database {
        if !settings.data_dir.join("pgdata/PG_VERSION").exists() {
            return Err(Failure::Usage(format!(
                "there is no embedded cluster under {} (TENANTRY_DATA_DIR) to back up; \
                 set TENANTRY_DATA_DIR to the installation's data dir, or DATABASE_URL",
                settings.data_dir.display()
            )));
        }
    }
    super::resolve(settings, None).await
}

async fn check_source(client: &tokio_postgres::Client, target: &Target) -> Result<(), Failure> {
    super::refuse_citus(client, "backup").await?;
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
            super::where_(target)
        )));
    }
    Ok(())
}

/// `pg_dump` of the exported `snapshot` into the backup; returns the
/// dump's size.
async fn dump(
    pg_dump: &Path,
    env: &[(&'static str, OsString)],
    snapshot: &str,
    staging: &Staging,
) -> Result<u64, Failure> {
    let dump = staging.path().join(files::DUMP);
    let mut file = OsString::from("--file=");
    file.push(&dump);
    let args: Vec<OsString> = vec![
        "--format=custom".into(),
        "--no-password".into(),
        format!("--snapshot={snapshot}").into(),
        // The routers' live passwords stay out (`serve` gives restored
        // routers new ones: db::routers).
        "--exclude-table-data=tenantry.router_logins".into(),
        file,
    ];
    let took = tools::run(pg_dump, &args, env, "dumping the database", Some(&dump)).await?;
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
    Ok(size)
}

/// What the backup records of the installation, read in the dump's
/// snapshot.
struct Snapshot {
    id: InstallationId,
    facts: Facts,
    roles: Vec<roles::TenantRole>,
    routers: usize,
    plan: roles::Plan,
    other_roles: Vec<String>,
}

impl Snapshot {
    async fn read(tx: &Transaction<'_>) -> Result<Snapshot, Failure> {
        let facts = Facts::read(tx).await?;
        let id = InstallationId::parse(&facts.installation_id)
            .map_err(|e| Failure::Other(format!("bad tenantry.installation row: {e}")))?;
        let found = roles::read(tx, &id).await?;
        for note in &found.left_out {
            eprintln!("note: not in the backup (Tenantry did not make it): {note}");
        }
        let other_roles = other_roles(tx, &id).await?;
        if !other_roles.is_empty() {
            eprintln!(
                "note: objects in this database belong to, or are granted to, roles outside the installation: {}; \
                 they are not in the backup, and must exist wherever it is restored",
                other_roles.join(", ")
            );
        }
        let plan = roles::Plan::new(&id, &found.tenants)
            .map_err(Failure::Other)?
            .with_routers(&id, found.routers);
        Ok(Snapshot {
            id,
            facts,
            routers: found.routers,
            roles: found.tenants,
            plan,
            other_roles,
        })
    }

    fn manifest(self, secret: Secret) -> Manifest {
        let facts = self.facts;
        Manifest {
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
            roles: self.roles,
            routers: self.routers,
            other_roles: self.other_roles,
            secret,
            files: Default::default(),
        }
    }
}

/// The installation's facts for the manifest.
struct Facts {
    installation_id: String,
    service_role: String,
    database: String,
    server_version: String,
    system_migration: i32,
    tenants: i64,
    users: i64,
    /// Relations made after initdb (oid 16384 on): each is locked by the
    /// restore's one transaction.
    relations: i64,
    /// Tables, each of which `pg_dump` locks.
    tables: i64,
}

impl Facts {
    async fn read(tx: &Transaction<'_>) -> Result<Facts, tokio_postgres::Error> {
        let row = tx
            .query_one(
                "SELECT i.id, current_user::text, current_database()::text,
                        current_setting('server_version'),
                        (SELECT max(version) FROM tenantry.refinery_schema_history),
                        (SELECT count(*) FROM tenantry.tenants),
                        (SELECT count(*) FROM tenantry.users),
                        (SELECT count(*) FROM pg_catalog.pg_class WHERE oid >= 16384),
                        (SELECT count(*) FROM pg_catalog.pg_class
                         WHERE oid >= 16384 AND relkind IN ('r', 'p', 'm', 'f'))
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
            tables: row.get(8),
        })
    }
}

/// Roles outside the installation (and not the service) that own objects
/// or hold privileges in this database: a restore needs them to exist.
async fn other_roles(
    tx: &Transaction<'_>,
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
/// check value of it, so that a restore can tell whether it runs with the
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
