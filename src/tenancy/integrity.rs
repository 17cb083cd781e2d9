//! Template integrity: the control plane holds the published template set
//! (`tenantry.templates`, see `tenancy::publication`). A set that disagrees
//! with it — a file changed after it was published, a published version
//! whose text this process could not read, or tenants at a version newer
//! than the set — is refused before anything is provisioned or migrated
//! with it: the same version would otherwise mean different tables in
//! different tenants.

use tokio_postgres::GenericClient;

use crate::tenancy::templates::TemplateSet;

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(
        "template {file} has changed since it was published (checksum {found} in {origin}, published {applied}): \
         published templates never change; restore the file (`tenantry templates show N` prints the published text) and put the change in a new version"
    )]
    Changed {
        file: String,
        found: String,
        applied: String,
        origin: String,
    },
    #[error(
        "template {published} is published; {found} in {origin} has its number but another name: \
         name the file {published} (a published version never changes, its name included)"
    )]
    Renamed {
        published: String,
        found: String,
        origin: String,
    },
    #[error(
        "template {file} is published, but its text is not in the database or does not give its checksum: \
         run `tenantry templates publish DIR` with the directory that holds the file"
    )]
    Missing { file: String },
    #[error(
        "{count} tenant(s) are at template version {version}, newer than the latest published one (V{latest}): \
         publish the templates they were built from (`tenantry templates publish DIR`)"
    )]
    TenantsAhead {
        count: i64,
        version: i32,
        latest: i32,
    },
    #[error("cannot read the published template set: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// Check `set` against what this database has published. Reads only.
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
            None => return Err(IntegrityError::Missing { file }),
            Some(t) if t.name() != name => {
                return Err(IntegrityError::Renamed {
                    published: file,
                    found: t.file_name(),
                    origin: set.origin().to_owned(),
                })
            }
            Some(t) if t.checksum().to_string() != checksum => {
                return Err(IntegrityError::Changed {
                    file,
                    found: t.checksum().to_string(),
                    applied: checksum,
                    origin: set.origin().to_owned(),
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
