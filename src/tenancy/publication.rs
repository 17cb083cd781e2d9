//! Templates published in the control plane: `tenantry.templates` holds every
//! published version with its checksum and text, and every process reads the
//! set it provisions and migrates with from there. The built-in templates
//! and `TENANTRY_TEMPLATES_DIR` only *propose* versions: [`publish`] adds
//! the proposed versions after the newest published one, and refuses a
//! proposal that disagrees with a published version (a published version
//! never changes; a trigger holds the database to it as well).
//!
//! A running `serve` keeps the set in a [`Templates`] and learns of a new
//! version by a cheap check: every provisioning transaction starts with
//! `tenantry.provisioning_at(latest)`, which refuses it (TY003) once a newer
//! version is published, and the process then reads the set again
//! ([`Templates::refresh`]); `/health` and the maintenance loop check too.

use std::sync::{Arc, RwLock};

use tokio_postgres::{Client, GenericClient};

use crate::tenancy::integrity::IntegrityError;
use crate::tenancy::templates::{TemplateError, TemplateSet};

/// The SQLSTATE `tenantry.provisioning_at` raises: a newer version was
/// published since this process read the set.
pub const NEWER_PUBLISHED: &str = "TY003";

/// What [`Templates::published`] returns: the usable set, and the newest
/// version published at all (greater when a version has no usable text).
#[derive(Debug, Clone)]
pub struct Published {
    set: Arc<TemplateSet>,
    newest: i32,
    /// How many published versions had a text when this was read: a text
    /// put back (`templates publish`) is read again.
    texts: i64,
}

impl Published {
    /// A set read elsewhere, with the newest version published when it was
    /// read (a provisioning with it is refused once that is not the newest).
    pub fn new(set: Arc<TemplateSet>, newest: i32) -> Published {
        let texts = set.all().len() as i64;
        Published { set, newest, texts }
    }

    pub fn set(&self) -> &Arc<TemplateSet> {
        &self.set
    }

    /// The newest version published, usable or not: what a provisioning
    /// transaction checks it is still the newest.
    pub fn newest(&self) -> i32 {
        self.newest
    }
}

/// The published set as this process last read it, shared by its requests.
#[derive(Debug)]
pub struct Templates {
    current: RwLock<Arc<Published>>,
}

impl Templates {
    pub fn new(published: Published) -> Templates {
        Templates {
            current: RwLock::new(Arc::new(published)),
        }
    }

    /// Publish `set` (refused where it disagrees with the published set) and
    /// read the published set: for tools that bootstrap a database
    /// themselves (benchmarks, tests).
    pub async fn publishing(
        client: &Client,
        set: TemplateSet,
        by: &str,
    ) -> Result<Templates, Problem> {
        let proposals = Proposals {
            set,
            explicit: true,
            by: by.to_owned(),
        };
        publish(client, &proposals).await?;
        Ok(Templates::new(load(client).await?))
    }

    /// The set to provision and migrate with.
    pub fn get(&self) -> Arc<TemplateSet> {
        self.published().set.clone()
    }

    pub fn published(&self) -> Arc<Published> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Read the set again when a newer version has been published since
    /// (one small query when nothing changed).
    pub async fn refresh(&self, client: &impl GenericClient) -> Result<Arc<Published>, Problem> {
        let known = self.published();
        let row = client
            .query_one(
                "SELECT max(version), count(sql) FROM tenantry.templates",
                &[],
            )
            .await?;
        let (newest, texts): (Option<i32>, i64) = (row.get(0), row.get(1));
        if newest == Some(known.newest) && texts == known.texts {
            return Ok(known);
        }
        let fresh = Arc::new(load(client).await?);
        let mut current = self.current.write().expect("not poisoned");
        if fresh.newest >= current.newest && fresh.set.latest() >= current.set.latest() {
            if fresh.set.latest() != current.set.latest() {
                tracing::info!(
                    latest = fresh.set.latest().get(),
                    "a newer template version is published: new tenants are provisioned at it"
                );
            }
            *current = fresh.clone();
        }
        Ok(fresh)
    }
}

/// Why the published set cannot be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    #[error(transparent)]
    Templates(#[from] TemplateError),
    #[error(
        "no template version is published in this database: run `tenantry templates publish` (the built-in templates) or `tenantry templates publish DIR`"
    )]
    NothingPublished,
    #[error(
        "template {file} is published, but {why}: run `tenantry templates publish DIR` with the directory that holds the file"
    )]
    Unusable { file: String, why: String },
}

impl From<tokio_postgres::Error> for Problem {
    fn from(e: tokio_postgres::Error) -> Self {
        Problem::Integrity(IntegrityError::Postgres(e))
    }
}

/// One published version, as `templates list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    pub version: i32,
    pub file: String,
    pub checksum: String,
    /// Where it was published from: a directory or the built-in templates,
    /// by whom, on which machine. `None`: recorded before templates were
    /// published with their text.
    pub origin: Option<String>,
    pub published_at: chrono::DateTime<chrono::Utc>,
    /// Whether the database has its text (and it matches the checksum).
    pub usable: bool,
}

const PUBLISHED: &str = "SELECT version, name, checksum, sql, origin, recorded_at
                         FROM tenantry.templates ORDER BY version";

/// Every published version.
pub async fn list(client: &impl GenericClient) -> Result<Vec<Listed>, tokio_postgres::Error> {
    let rows = client.query(PUBLISHED, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let (version, name): (i32, String) = (row.get("version"), row.get("name"));
            let checksum: String = row.get("checksum");
            let usable = text_of(&name, version, row.get("sql"), &checksum).is_ok();
            Listed {
                version,
                file: format!("V{version}__{name}.sql"),
                checksum,
                origin: row.get("origin"),
                published_at: row.get("recorded_at"),
                usable,
            }
        })
        .collect())
}

/// A published text, if it is there and gives its checksum.
fn text_of(
    name: &str,
    version: i32,
    sql: Option<String>,
    checksum: &str,
) -> Result<String, String> {
    let sql = sql.ok_or(
        "the database has no text for it (a tenantry before templates were published recorded it)",
    )?;
    let migration = refinery::Migration::unapplied(&format!("V{version}__{name}"), &sql)
        .map_err(|e| format!("its text cannot be read: {e}"))?;
    if migration.checksum().to_string() != checksum {
        return Err(
            "its text in the database does not give its checksum (it was changed outside tenantry)"
                .into(),
        );
    }
    Ok(sql)
}

/// The published set: the versions from V1 whose text is there, and the
/// newest version published at all. A version without usable text ends the
/// set (the fleet's integrity check then names it, with the fix).
pub async fn load(client: &impl GenericClient) -> Result<Published, Problem> {
    let rows = client.query(PUBLISHED, &[]).await?;
    let newest = rows.last().map(|r| r.get::<_, i32>("version"));
    let texts = rows
        .iter()
        .filter(|r| r.get::<_, Option<&str>>("sql").is_some())
        .count() as i64;
    let mut files = Vec::new();
    let mut unusable = None;
    for (expected, row) in (1..).zip(&rows) {
        let (version, name): (i32, String) = (row.get("version"), row.get("name"));
        let file = format!("V{version}__{name}.sql");
        if version != expected {
            unusable = Some(Problem::Unusable {
                file: format!("V{expected}"),
                why: format!("the next one published is {file}: versions must run without gaps"),
            });
            break;
        }
        match text_of(&name, version, row.get("sql"), row.get("checksum")) {
            Ok(sql) => files.push((file, sql)),
            Err(why) => {
                unusable = Some(Problem::Unusable { file, why });
                break;
            }
        }
    }
    let Some(newest) = newest else {
        return Err(Problem::NothingPublished);
    };
    if files.is_empty() {
        return Err(unusable.unwrap_or(Problem::NothingPublished));
    }
    if let Some(problem) = &unusable {
        tracing::warn!(%problem, "the published template set stops before its newest version");
    }
    let set = TemplateSet::from_files(files.into_iter(), "the published templates")?;
    Ok(Published {
        set: Arc::new(set),
        newest,
        texts,
    })
}

/// Where proposals come from, and whether they were asked for.
pub struct Proposals {
    pub set: TemplateSet,
    /// From `TENANTRY_TEMPLATES_DIR` (or a `templates publish DIR`): a
    /// disagreement with the published set is refused. The built-in
    /// templates only propose what continues the published set.
    pub explicit: bool,
    /// Who publishes, for `origin` (`serve`, `cli:alice`).
    pub by: String,
}

/// What [`publish`] did.
#[derive(Debug, Default)]
pub struct Publication {
    /// The versions it published, as file names.
    pub published: Vec<String>,
    /// The built-in templates disagree with the published ones from this
    /// version on: nothing of them was published (the installation has
    /// templates of its own).
    pub diverged: Option<String>,
}

/// Publish what `proposals` add after the newest published version, and
/// put back the text of published versions whose text the database lacks
/// (name and checksum must match). One transaction, under a lock that
/// waits for provisioning transactions in flight.
pub async fn publish(client: &Client, proposals: &Proposals) -> Result<Publication, Problem> {
    client
        .batch_execute("BEGIN; LOCK TABLE tenantry.templates IN EXCLUSIVE MODE")
        .await?;
    let result = publish_locked(client, proposals).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await?;
    result
}

async fn publish_locked(client: &Client, proposals: &Proposals) -> Result<Publication, Problem> {
    fill_texts(client, &proposals.set).await?;
    let published = client
        .query(
            "SELECT version, name, checksum FROM tenantry.templates ORDER BY version",
            &[],
        )
        .await?;
    let mut publication = Publication::default();
    for row in &published {
        let (version, name, checksum): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        let Some(proposed) = proposals
            .set
            .all()
            .get(usize::try_from(version - 1).unwrap_or(usize::MAX))
        else {
            // The proposals end here: they add nothing.
            return Ok(publication);
        };
        if proposed.name() != name || proposed.checksum().to_string() != checksum {
            let changed = IntegrityError::Changed {
                file: proposed.file_name(),
                found: proposed.checksum().to_string(),
                applied: checksum,
                origin: proposals.set.origin().to_owned(),
            };
            if proposals.explicit {
                return Err(changed.into());
            }
            publication.diverged = Some(changed.to_string());
            return Ok(publication);
        }
    }
    let origin = format!(
        "{} (by {} on {})",
        proposals.set.origin(),
        proposals.by,
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "an unknown host".into())
    );
    for template in &proposals.set.all()[published.len()..] {
        client
            .execute(
                "INSERT INTO tenantry.templates (version, name, checksum, sql, origin)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &template.version().get(),
                    &template.name(),
                    &template.checksum().to_string(),
                    &template.sql(),
                    &origin,
                ],
            )
            .await?;
        publication.published.push(template.file_name());
    }
    Ok(publication)
}

/// Put back the text of published versions that `set` has with the same
/// name and checksum, where the database lacks it (rows recorded before
/// texts were published) or has a wrong one. Harmless to repeat.
pub async fn fill_texts(
    client: &impl GenericClient,
    set: &TemplateSet,
) -> Result<u64, tokio_postgres::Error> {
    let versions: Vec<i32> = set.all().iter().map(|t| t.version().get()).collect();
    let names: Vec<&str> = set.all().iter().map(|t| t.name()).collect();
    let checksums: Vec<String> = set.all().iter().map(|t| t.checksum().to_string()).collect();
    let texts: Vec<&str> = set.all().iter().map(|t| t.sql()).collect();
    client
        .execute(
            "UPDATE tenantry.templates t SET sql = p.sql
             FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[]) AS p(version, name, checksum, sql)
             WHERE t.version = p.version AND t.name = p.name AND t.checksum = p.checksum
               AND t.sql IS DISTINCT FROM p.sql",
            &[&versions, &names, &checksums, &texts],
        )
        .await
}

/// When a process opens the database: whether it publishes its proposals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// `serve` at start, `fleet migrate`, `templates publish`.
    Publish,
    /// Every other command: it publishes only into a database that has no
    /// template yet (the first process on a new installation), and refuses
    /// an explicit directory that disagrees with the published set.
    Read,
}

/// What every process does once the system schema is up: fill in missing
/// texts from the built-in templates and the proposals, publish (see
/// [`Opening`]), and read the published set.
pub async fn open(
    client: &Client,
    proposals: &Proposals,
    opening: Opening,
) -> Result<(Published, Publication), Problem> {
    fill_texts(client, &TemplateSet::builtin()?).await?;
    let empty: bool = client
        .query_one("SELECT NOT EXISTS (SELECT FROM tenantry.templates)", &[])
        .await?
        .get(0);
    let publication = if opening == Opening::Publish || empty {
        publish(client, proposals).await?
    } else {
        fill_texts(client, &proposals.set).await?;
        if proposals.explicit {
            disagreement(client, &proposals.set).await?;
        }
        Publication::default()
    };
    if let Some(diverged) = &publication.diverged {
        tracing::warn!(
            "the built-in templates were not published, they disagree with the published ones: {diverged}"
        );
    }
    Ok((load(client).await?, publication))
}

/// Refuse `set` where it disagrees with a published version.
async fn disagreement(client: &impl GenericClient, set: &TemplateSet) -> Result<(), Problem> {
    let published = client
        .query(
            "SELECT version, name, checksum FROM tenantry.templates",
            &[],
        )
        .await?;
    for row in &published {
        let (version, name, checksum): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        let Some(t) = set.all().iter().find(|t| t.version().get() == version) else {
            continue;
        };
        if t.name() != name || t.checksum().to_string() != checksum {
            return Err(IntegrityError::Changed {
                file: t.file_name(),
                found: t.checksum().to_string(),
                applied: checksum,
                origin: set.origin().to_owned(),
            }
            .into());
        }
    }
    Ok(())
}
