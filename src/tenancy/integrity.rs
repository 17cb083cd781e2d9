//! Template integrity: the control plane remembers the template set it has
//! applied (`tenantry.templates`: version, name, checksum). A binary whose
//! set disagrees with it — a file edited after it was applied, a version
//! that is gone, or tenants at a version newer than the binary knows — is
//! refused before it provisions or migrates anything: the same version
//! would otherwise mean different tables in different tenants.

use tokio_postgres::GenericClient;

use crate::tenancy::templates::TemplateSet;

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(
        "template {file} has changed since it was applied to this database (checksum {found}, applied {applied}): \
         applied templates must never change; restore the file and put the change in a new version"
    )]
    Changed {
        file: String,
        found: String,
        applied: String,
    },
    #[error(
        "template {file} was applied to this database but is missing from {origin}: \
         run with TENANTRY_TEMPLATES_DIR pointing at the directory that holds it (every command and `serve` need \
         the same templates), or restore the file"
    )]
    Missing { file: String, origin: String },
    #[error(
        "{count} tenant(s) are at template version {version}, newer than the latest this binary knows (V{latest}): \
         run a newer tenantry, or point TENANTRY_TEMPLATES_DIR at the newer templates"
    )]
    TenantsAhead {
        count: i64,
        version: i32,
        latest: i32,
    },
    #[error("cannot read the applied template set: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// Check `set` against what this database has applied. Reads only.
pub async fn verify(client: &impl GenericClient, set: &TemplateSet) -> Result<(), IntegrityError> {
    let applied = client
        .query(
            "SELECT version, name, checksum FROM tenantry.templates ORDER BY version",
            &[],
        )
        .await?;
    for row in &applied {
        let version: i32 = row.get("version");
        let name: String = row.get("name");
        let checksum: String = row.get("checksum");
        let file = format!("V{version}__{name}.sql");
        let found = set.all().iter().find(|t| t.version().get() == version);
        match found {
            None => {
                return Err(IntegrityError::Missing {
                    file,
                    origin: set.origin().to_owned(),
                })
            }
            Some(t) if t.name() != name || t.checksum().to_string() != checksum => {
                return Err(IntegrityError::Changed {
                    file: if t.name() == name {
                        file
                    } else {
                        t.file_name()
                    },
                    found: t.checksum().to_string(),
                    applied: checksum,
                })
            }
            Some(_) => {}
        }
    }
    let ahead = client
        .query_one(
            "SELECT max(template_version), count(*) FILTER (WHERE template_version > $1)
             FROM tenantry.tenants",
            &[&set.latest().get()],
        )
        .await?;
    let count: i64 = ahead.get(1);
    if count > 0 {
        return Err(IntegrityError::TenantsAhead {
            count,
            version: ahead.get::<_, Option<i32>>(0).unwrap_or_default(),
            latest: set.latest().get(),
        });
    }
    Ok(())
}

/// Check `set`, then record its versions as applied: from now on this
/// binary provisions at its latest version. Safe when several processes do
/// it at once (existing rows are left alone and checked again).
pub async fn verify_and_record(
    client: &impl GenericClient,
    set: &TemplateSet,
) -> Result<(), IntegrityError> {
    verify(client, set).await?;
    let versions: Vec<i32> = set.all().iter().map(|t| t.version().get()).collect();
    let names: Vec<&str> = set.all().iter().map(|t| t.name()).collect();
    let checksums: Vec<String> = set.all().iter().map(|t| t.checksum().to_string()).collect();
    client
        .execute(
            "INSERT INTO tenantry.templates (version, name, checksum)
             SELECT * FROM unnest($1::int4[], $2::text[], $3::text[])
             ON CONFLICT (version) DO NOTHING",
            &[&versions, &names, &checksums],
        )
        .await?;
    // Another process may have recorded a different set in between.
    verify(client, set).await
}
