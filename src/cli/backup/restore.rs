//! `tenantry restore DIR`: into an empty database only, as the backup's
//! service role, in one transaction (the roles, the dump, the database's
//! own privileges); then the files that live outside the database.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::files::{self, Backup, Manifest, Placement, SecretSource};
use super::{roles, tools};
use crate::cli::{count, Failure};
use crate::configuration::{DatabaseTarget, Settings};
use crate::db::{Target, BOOTSTRAP_LOCK};
use crate::domain::InstallationId;

/// The system migrations this binary knows (the bootstrap's own set).
mod system {
    refinery::embed_migrations!("system_migrations");
}

/// What PostgreSQL keeps with the database itself rather than in it, so a
/// dump without `--create` leaves it out: `PUBLIC` loses `TEMPORARY` and
/// `CONNECT` on the database (the migration that first did it, run again:
/// it is idempotent).
const DATABASE_PRIVILEGES: &str = include_str!("../../../system_migrations/V7__routing.sql");

/// `tenantry restore DIR`.
pub async fn restore(settings: Settings, dir: &Path) -> Result<(), Failure> {
    let (backup, plan) = open(dir).await?;
    let m = &backup.manifest;
    // What goes outside the database is decided before anything changes.
    let anchors = anchors_to_place(&backup, &settings)?;
    let secret = secret_to_place(&backup, &settings)?;

    let target = super::resolve(&settings, Some(m.relations)).await?;
    let client = target.connect().await?;
    super::refuse_citus(&client, "restore").await?;
    check_service_role(&client, m, &settings).await?;
    // Held to the end: a `serve` or another command starting on this
    // database meanwhile waits, then finds the restored installation
    // instead of bootstrapping a new one under the restore.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    check_empty(&client, &super::where_(&target)).await?;
    let existing = roles::existing(&client, &plan).await?;
    check_other_roles(&client, &m.other_roles).await?;
    let programs = Programs::find(&target, &backup).await?;
    super::warn_about_locks(&*client, m.relations + plan.len() as i64, "the restore").await?;

    eprintln!(
        "restore: making {}{} and restoring the database, in one transaction, with {} and {}",
        count(plan.len() - existing.len(), "role", "roles"),
        if existing.is_empty() {
            String::new()
        } else {
            format!(" (taking over {} that exist)", existing.len())
        },
        programs.pg_restore.display(),
        programs.psql.display()
    );
    let took = tools::restore_in_one_transaction(
        &programs.pg_restore,
        &programs.psql,
        &backup.dir.join(files::DUMP),
        &programs.env,
        &prelude(&plan, &existing),
        &postlude(&plan),
    )
    .await?;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&BOOTSTRAP_LOCK])
        .await?;
    eprintln!("restore: database restored in {:.1} s", took.as_secs_f64());

    place_files(&settings, anchors, secret)?;
    println!(
        "restored installation {} from {}: {}, {}, {}; system schema V{}",
        m.installation_id,
        dir.display(),
        count(m.tenants, "tenant", "tenants"),
        count(m.users, "account", "accounts"),
        count(plan.len(), "role", "roles"),
        m.system_migration
    );
    let upgrade = if i64::from(m.system_migration) < known_system_migration() {
        format!(
            " (it brings the system schema to V{})",
            known_system_migration()
        )
    } else {
        String::new()
    };
    println!(
        "next: `tenantry serve`{upgrade}; `tenantry fleet check` and `tenantry audit verify` check the result"
    );
    Ok(())
}

/// The backup, its files checked, and the roles it makes (exit 2 for a
/// directory that is not a whole backup, or one of a newer Tenantry).
async fn open(dir: &Path) -> Result<(Backup, roles::Plan), Failure> {
    eprintln!("restore: checking the files of {}", dir.display());
    let owned = dir.to_owned();
    let backup = tokio::task::spawn_blocking(move || Backup::open(&owned)).await??;
    let m = &backup.manifest;
    let bad = |e: String| Failure::Usage(format!("{}: {e}", dir.display()));
    let id = InstallationId::parse(&m.installation_id).map_err(|e| bad(e.to_string()))?;
    let plan = roles::Plan::new(&id, &m.roles)
        .map_err(bad)?
        .with_routers(&id, m.routers);
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
    Ok((backup, plan))
}

/// The programs a restore runs, and how they connect.
struct Programs {
    pg_restore: PathBuf,
    psql: PathBuf,
    env: Vec<(&'static str, OsString)>,
}

impl Programs {
    /// Found, and the dump read once by this `pg_restore` (a dump of a
    /// newer one is refused here, before any change).
    async fn find(target: &Target, backup: &Backup) -> Result<Programs, Failure> {
        let bindir = super::server_bindir(target);
        let programs = Programs {
            pg_restore: tools::find("pg_restore", bindir)?,
            psql: tools::find("psql", bindir)?,
            env: tools::libpq_conninfo(&target.connector, "tenantry restore")
                .map_err(Failure::Usage)?,
        };
        for program in [&programs.pg_restore, &programs.psql] {
            tools::refuse_without_restrict(program).await?;
        }
        let contents = tools::list(&programs.pg_restore, &backup.dir.join(files::DUMP)).await?;
        if contents
            .lines()
            .any(|l| !l.starts_with(';') && l.contains(" BLOB "))
        {
            return Err(Failure::Usage(
                "the dump holds large objects, which Tenantry never makes; restore it by hand with pg_restore"
                    .into(),
            ));
        }
        Ok(programs)
    }
}

/// What the restore's transaction does before the dump's SQL: the roles,
/// and, for the length of the transaction, `CREATE` for the group on the
/// schemas it creates. `pg_restore` gives each tenant's tables to the
/// tenant role right after creating them, which PostgreSQL allows only when
/// the new owner may create in the schema; the dump grants that (on the
/// tenant's own schema) only at its end, with all privileges. Lent through
/// the group, it is taken back in [`postlude`], in the same transaction, so
/// no one ever sees it.
fn prelude(plan: &roles::Plan, existing: &HashSet<String>) -> String {
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
-- Router roles come back without a login and without tenants: `serve`
-- gives them a new password and hands them their tenants and spares
-- (db::routers).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_attribute
               WHERE attrelid = 'tenantry.installation'::pg_catalog.regclass
                 AND attname = 'routers') THEN
        UPDATE tenantry.installation SET routers = 0;
        UPDATE tenantry.spare_roles SET router = -1;
        DELETE FROM tenantry.router_logins;
    END IF;
END
$$;
{DATABASE_PRIVILEGES}"
    )
}

/// The backup's anchor file and how it goes to `TENANTRY_AUDIT_ANCHOR_FILE`;
/// a different file there is refused.
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

/// The backup's secret and where it goes, when that is the embedded data
/// dir; otherwise says what to do about the secret.
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

/// Once the database is restored: the anchor file and the data dir's
/// secret, never over a different file (checked before).
fn place_files(
    settings: &Settings,
    anchors: Option<(Vec<u8>, Placement)>,
    secret: Option<(Vec<u8>, PathBuf)>,
) -> Result<(), Failure> {
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
    Ok(())
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

/// Roles outside the installation that the dump's objects name must exist.
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
    fn this_binary_knows_the_system_migrations_in_the_tree() {
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/system_migrations"))
            .unwrap()
            .count();
        assert_eq!(known_system_migration(), files as i64);
    }

    #[test]
    fn what_the_prelude_lends_the_postlude_takes_back() {
        let id = InstallationId::parse("ab12cd34").unwrap();
        let plan = roles::Plan::new(
            &id,
            &[roles::TenantRole {
                name: "tnt_ab12cd34_alice".into(),
                login: false,
                in_group: true,
            }],
        )
        .unwrap();
        let prelude = prelude(&plan, &HashSet::new());
        assert!(prelude.contains(
            r#"ALTER DEFAULT PRIVILEGES GRANT CREATE ON SCHEMAS TO "tnt_ab12cd34__tenants";"#
        ));
        let postlude = postlude(&plan);
        assert!(postlude.contains(
            r#"ALTER DEFAULT PRIVILEGES REVOKE CREATE ON SCHEMAS FROM "tnt_ab12cd34__tenants";"#
        ));
        assert!(postlude.contains("REVOKE TEMPORARY, CONNECT ON DATABASE"));
        assert!(!postlude.contains("COMMIT"), "the caller commits");
    }
}
