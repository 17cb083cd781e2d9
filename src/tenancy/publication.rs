//! Templates published in the control plane: `tenantry.templates` holds every
//! published version with its checksum and text, and every process reads the
//! set it provisions and migrates with from there. The built-in templates
//! and `TENANTRY_TEMPLATES_DIR` only *propose* versions: [`publish`] adds
//! the proposed versions after the newest published one once they have
//! built a tenant from nothing (in a transaction rolled back), and refuses
//! a proposal that disagrees with a published version (a published version
//! never changes; triggers hold the database to it as well).
//!
//! A running `serve` keeps the set in a [`Templates`] and learns of a new
//! version by a cheap check: every provisioning transaction starts with
//! `tenantry.provisioning_at(latest)`, which refuses it (TY003) once a newer
//! version is published, and the process then reads the set again
//! ([`Templates::refresh`]); `/health` and the maintenance loop check too.

use std::sync::{Arc, RwLock};

use tokio_postgres::{Client, GenericClient};

use crate::db::Installation;
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
    /// [`FINGERPRINT`]'s digest when this was read (`None`: not read from
    /// the database).
    fingerprint: Option<String>,
}

impl Published {
    /// A set read elsewhere, with the newest version published when it was
    /// read (a provisioning with it is refused once that is not the newest).
    pub fn new(set: Arc<TemplateSet>, newest: i32) -> Published {
        Published {
            set,
            newest,
            fingerprint: None,
        }
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
    /// One reading at a time: the set kept is always the last one read.
    reading: tokio::sync::Mutex<()>,
}

/// What tells a reading of `tenantry.templates` from another: the newest
/// version and a digest of every version's checksum and text.
const FINGERPRINT: &str = "SELECT max(version),
        md5(string_agg(version || ':' || checksum || ':' || coalesce(md5(sql), '-'), ',' ORDER BY version))
 FROM tenantry.templates";

impl Templates {
    pub fn new(published: Published) -> Templates {
        Templates {
            current: RwLock::new(Arc::new(published)),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// Publish `set` (refused where it disagrees with the published set, or
    /// when it does not build a tenant) and read the published set, with
    /// `set`'s baseline once checked: for
    /// tools that bootstrap a database themselves (benchmarks, tests).
    pub async fn publishing(
        client: &Client,
        installation: &Installation,
        set: TemplateSet,
        by: &str,
    ) -> Result<Templates, Problem> {
        let proposals = Proposals {
            set,
            explicit: true,
            by: by.to_owned(),
        };
        let publication = publish(client, client, installation, &proposals).await?;
        let mut published = load(client).await?;
        published.set = Arc::new(
            baseline_checked(client, installation, &proposals, &published, &publication).await?,
        );
        Ok(Templates::new(published))
    }

    /// The set to provision and migrate with.
    pub fn get(&self) -> Arc<TemplateSet> {
        self.published().set.clone()
    }

    pub fn published(&self) -> Arc<Published> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Read the set again when anything was published, or a text put back,
    /// since (one small query when nothing changed). Returns what it keeps.
    pub async fn refresh(&self, client: &impl GenericClient) -> Result<Arc<Published>, Problem> {
        let _one_at_a_time = self.reading.lock().await;
        let known = self.published();
        let row = client.query_one(FINGERPRINT, &[]).await?;
        let (newest, fingerprint): (Option<i32>, Option<String>) = (row.get(0), row.get(1));
        if newest == Some(known.newest) && fingerprint == known.fingerprint {
            return Ok(known);
        }
        // The baseline checked at start stays, while it stands for the
        // published versions it was written against.
        let mut fresh = load(client).await?;
        fresh.set = Arc::new(fresh.set.with_baseline_of(&known.set));
        let fresh = Arc::new(fresh);
        if fresh.set.latest() != known.set.latest() {
            tracing::info!(
                latest = fresh.set.latest().get(),
                "the published templates changed: new tenants are provisioned at this version"
            );
        }
        *self.current.write().expect("not poisoned") = fresh.clone();
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
    #[error(
        "nothing was published: a new version must first build a tenant from nothing, since a published one can never be taken back (fix the file and publish again)"
    )]
    DoesNotBuild(#[source] crate::provisioning::ProvisionError),
    #[error(
        "publishing waited {0} s for signups in flight to finish (it must not run beside them): try again"
    )]
    Busy(u64),
    #[error(transparent)]
    Baseline(crate::tenancy::baseline::BaselineError),
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
    let fingerprint: Option<String> = client.query_one(FINGERPRINT, &[]).await?.get(1);
    let rows = client.query(PUBLISHED, &[]).await?;
    let newest = rows.last().map(|r| r.get::<_, i32>("version"));
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
        fingerprint,
    })
}

/// Where proposals come from, and whether they were asked for.
#[derive(Debug, Clone)]
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

/// How long publishing waits for the signups in flight (which it must not
/// run beside) before it gives up.
const PUBLISH_WAIT_SECONDS: u64 = 10;

/// Publish what `proposals` add after the newest published version, and
/// put back the text of published versions whose text the database lacks
/// (name and checksum must match). New versions first build a tenant from
/// nothing, in a transaction rolled back; then they are inserted in one
/// transaction, under a lock that waits for provisioning transactions in
/// flight (at most [`PUBLISH_WAIT_SECONDS`]). Nothing to add takes no lock.
/// The tenant is built on `scratch`, a connection of its own (a template
/// runs there as the tenant would; the caller's session, which may hold a
/// fleet run's lock, stays out of its reach); tools may pass `client`.
pub async fn publish(
    client: &Client,
    scratch: &Client,
    installation: &Installation,
    proposals: &Proposals,
) -> Result<Publication, Problem> {
    fill_texts(client, &proposals.set).await?;
    let mut publication = Publication::default();
    if compare(client, proposals, &mut publication)
        .await?
        .is_none()
    {
        return Ok(publication);
    }
    match crate::provisioning::check_builds(scratch, installation, proposals.set.all()).await {
        Ok(()) => {}
        Err(crate::provisioning::ProvisionError::Postgres(e)) => return Err(e.into()),
        Err(e) => return Err(Problem::DoesNotBuild(e)),
    }
    // A baseline of the admin's that does not build what the versions
    // build stops the whole set (`serve` and the CLI refuse it after).
    if proposals.explicit {
        match crate::tenancy::baseline::check(scratch, installation, &proposals.set).await {
            Ok(()) => {}
            Err(crate::tenancy::baseline::BaselineError::Postgres(e)) => return Err(e.into()),
            Err(e) => return Err(Problem::Baseline(e)),
        }
    }
    client.batch_execute("BEGIN").await?;
    let result = insert_new(client, proposals).await;
    let end = client
        .batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await;
    match (result, end) {
        (Ok(publication), Ok(())) => Ok(publication),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e),
    }
}

/// Inside publishing's transaction: the lock, then (again: another process
/// may have published meanwhile) what the proposals add, inserted.
async fn insert_new(client: &Client, proposals: &Proposals) -> Result<Publication, Problem> {
    client
        .batch_execute(&format!(
            "SET LOCAL lock_timeout = '{PUBLISH_WAIT_SECONDS}s'; LOCK TABLE tenantry.templates IN EXCLUSIVE MODE"
        ))
        .await
        .map_err(|e| match e.code() {
            Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Problem::Busy(PUBLISH_WAIT_SECONDS)
            }
            _ => e.into(),
        })?;
    let mut publication = Publication::default();
    let Some(from) = compare(client, proposals, &mut publication).await? else {
        return Ok(publication);
    };
    let origin = format!(
        "{} (by {} on {})",
        proposals.set.origin(),
        proposals.by,
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "an unknown host".into())
    );
    for template in &proposals.set.all()[from..] {
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

/// Compare the proposals with the published versions: where the first new
/// version is in the proposals, if they add any. A disagreement is refused
/// for explicit proposals and noted (nothing added) for the built-in ones.
async fn compare(
    client: &Client,
    proposals: &Proposals,
    publication: &mut Publication,
) -> Result<Option<usize>, Problem> {
    let published = client
        .query(
            "SELECT version, name, checksum FROM tenantry.templates ORDER BY version",
            &[],
        )
        .await?;
    if let Some(disagreement) = disagreement(&published, &proposals.set) {
        if proposals.explicit {
            return Err(disagreement.into());
        }
        publication.diverged = Some(disagreement.to_string());
        return Ok(None);
    }
    let newest = published.last().map_or(0, |r| r.get::<_, i32>(0));
    Ok((proposals.set.latest().get() > newest).then_some(newest as usize))
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
    /// `serve` at start: publish, and refuse an explicit directory that
    /// disagrees with the published set. When signups in flight keep
    /// publishing waiting past its bound, start on the published set.
    Serve,
    /// `templates publish`: publish, refusing what `Serve` refuses, and
    /// failing when publishing has to wait too long.
    Publish,
    /// Every other command: it publishes nothing. On a database with no
    /// template yet, its proposals stand in (unpublished) for what it
    /// shows; commands that make tenants publish them first
    /// (`startup::Context::ready_to_provision`).
    Read,
}

/// What every process does once the system schema is up: put back missing
/// texts from the built-in templates and the proposals, publish (see
/// [`Opening`]; `scratch` as in [`publish`]), and read the published set.
pub async fn open(
    client: &Client,
    scratch: &Client,
    installation: &Installation,
    proposals: &Proposals,
    opening: Opening,
) -> Result<(Published, Publication), Problem> {
    fill_texts(client, &TemplateSet::builtin()?).await?;
    let empty: bool = client
        .query_one("SELECT NOT EXISTS (SELECT FROM tenantry.templates)", &[])
        .await?
        .get(0);
    let publication = match (opening, empty) {
        (Opening::Publish, _) => publish(client, scratch, installation, proposals).await?,
        (Opening::Serve, _) => match publish(client, scratch, installation, proposals).await {
            Err(busy @ Problem::Busy(_)) if !empty => {
                tracing::warn!(%busy, "starting on the published templates; publish later with `tenantry templates publish`");
                Publication::default()
            }
            other => other?,
        },
        (Opening::Read, true) => {
            // Unchecked: no baseline (a command that then makes tenants
            // publishes and reads the set again, `ready_to_provision`).
            let set = Arc::new(proposals.set.without_baseline());
            return Ok((Published::new(set, 0), Publication::default()));
        }
        (Opening::Read, false) => {
            fill_texts(client, &proposals.set).await?;
            let mut publication = Publication::default();
            compare(
                client,
                &Proposals {
                    explicit: false,
                    set: proposals.set.clone(),
                    by: proposals.by.clone(),
                },
                &mut publication,
            )
            .await?;
            publication
        }
    };
    if let Some(diverged) = &publication.diverged {
        tracing::warn!(
            "the proposed templates were not published, they disagree with the published ones: {diverged}"
        );
    }
    let mut published = load(client).await?;
    if opening != Opening::Read {
        published.set = Arc::new(
            baseline_checked(scratch, installation, proposals, &published, &publication).await?,
        );
    }
    Ok((published, publication))
}

/// The published set with the proposals' baseline, when it stands for the
/// published versions it was written against and builds what they build
/// (`tenancy::baseline::check`, on `scratch`); otherwise without one. A baseline from
/// `TENANTRY_TEMPLATES_DIR` that fails the check is refused; the built-in
/// one is then left unused, with a warning.
async fn baseline_checked(
    scratch: &Client,
    installation: &Installation,
    proposals: &Proposals,
    published: &Published,
    publication: &Publication,
) -> Result<TemplateSet, Problem> {
    let Some(proposed) = proposals.set.baseline() else {
        return Ok(published.set.without_baseline());
    };
    let file = proposed.template().file_name();
    let with = published.set.with_baseline_of(&proposals.set);
    if with.baseline().is_none() {
        tracing::warn!(
            file,
            "the baseline is not used: the published versions it stands for are not the ones it was written against"
        );
        return Ok(with);
    }
    if proposals.explicit && !publication.published.is_empty() {
        // `publish` checked it before it published them.
        return Ok(with);
    }
    match crate::tenancy::baseline::check(scratch, installation, &with).await {
        Ok(()) => {
            tracing::debug!(file, "baseline checked");
            Ok(with)
        }
        Err(crate::tenancy::baseline::BaselineError::Postgres(e)) if proposals.explicit => {
            Err(e.into())
        }
        Err(e) if proposals.explicit => Err(Problem::Baseline(e)),
        Err(e) => {
            tracing::warn!(error = %e, "the built-in baseline is not used");
            Ok(with.without_baseline())
        }
    }
}

/// Where `set` disagrees with a published version (`published`: rows of
/// version, name, checksum).
fn disagreement(published: &[tokio_postgres::Row], set: &TemplateSet) -> Option<IntegrityError> {
    published.iter().find_map(|row| {
        let (version, name, checksum): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        let t = set
            .all()
            .get(usize::try_from(version).ok()?.checked_sub(1)?)?;
        if t.name() != name {
            Some(IntegrityError::Renamed {
                published: format!("V{version}__{name}.sql"),
                found: t.file_name(),
                origin: set.origin().to_owned(),
            })
        } else if t.checksum().to_string() != checksum {
            Some(IntegrityError::Changed {
                file: t.file_name(),
                found: t.checksum().to_string(),
                applied: checksum,
                origin: set.origin().to_owned(),
            })
        } else {
            None
        }
    })
}
