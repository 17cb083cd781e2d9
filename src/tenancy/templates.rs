//! Tenant templates: the versioned SQL (`V<n>__<name>.sql`) that builds a
//! tenant schema. Parsed and checksummed with refinery's `Migration`, so a
//! tenant's `refinery_schema_history` table is one refinery itself reads.
//! Built into the binary; `TENANTRY_TEMPLATES_DIR` overrides at run time.
//!
//! A set may also hold one *baseline*, `B<m>__<name>.sql` (Flyway's name for
//! it): SQL that builds in one go what V1..V<m> build in turn, for schemas
//! made from nothing. It is a shortcut, never a version of its own: a tenant
//! built from it records V1..V<m> in its history, and it is used only where
//! the set's V1..V<m> are the ones it was written against
//! ([`TemplateSet::with_baseline_of`]) and after it was shown to build the
//! same schema as they do (`tenancy::baseline`).

use std::path::{Path, PathBuf};

use refinery::Migration;

use crate::domain::TemplateVersion;
use crate::tenancy::lint;

mod builtin {
    include!(concat!(env!("OUT_DIR"), "/templates.rs"));
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read templates from {dir}: {source}")]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template file {file} is not named V<version>__<name>.sql (or B<version>__<name>.sql for a baseline): {reason}")]
    BadName { file: String, reason: String },
    #[error("template version {0} appears twice")]
    Duplicate(i32),
    #[error("no tenant templates (files named V<n>__<name>.sql) found in {0}")]
    Empty(String),
    #[error("template V{missing} is missing from {origin}: versions must run 1, 2, 3, … without gaps (the next one found is {next}: number it V{missing})")]
    Gap {
        missing: i32,
        next: String,
        origin: String,
    },
    #[error("baseline {file} is refused: {reason}")]
    Baseline { file: String, reason: String },
    #[error("template {file} is refused (line {line}): {reason}")]
    Refused {
        file: String,
        line: usize,
        reason: String,
    },
}

/// One template version.
#[derive(Debug, Clone)]
pub struct Template {
    version: TemplateVersion,
    name: String,
    sql: String,
    checksum: u64,
    /// A baseline (`B<version>__<name>.sql`) rather than a version.
    baseline: bool,
}

impl Template {
    pub fn version(&self) -> TemplateVersion {
        self.version
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// refinery's checksum of name, version and SQL.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// `V<version>__<name>.sql` (`B…` for a baseline), as the admin named
    /// the file.
    pub fn file_name(&self) -> String {
        let kind = if self.baseline { 'B' } else { 'V' };
        format!("{kind}{}__{}.sql", self.version.get(), self.name)
    }
}

/// A set's baseline, with the checksums of the versions V1..V<m> it stands
/// for, as they were in the set it was read with.
#[derive(Debug, Clone)]
pub struct Baseline {
    template: Template,
    covers: Vec<u64>,
}

impl Baseline {
    pub fn template(&self) -> &Template {
        &self.template
    }
}

/// Every template version, ascending.
#[derive(Debug, Clone)]
pub struct TemplateSet {
    templates: Vec<Template>,
    origin: String,
    baseline: Option<Baseline>,
}

impl TemplateSet {
    /// The set built into the binary.
    pub fn builtin() -> Result<TemplateSet, TemplateError> {
        Self::from_files(
            builtin::BUILTIN
                .iter()
                .map(|(f, sql)| (f.to_string(), sql.to_string())),
            "the built-in templates",
        )
    }

    /// Read `V*.sql` from a directory.
    pub fn from_dir(dir: &Path) -> Result<TemplateSet, TemplateError> {
        let read_err = |source| TemplateError::Read {
            dir: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            if path.extension().is_some_and(|x| x == "sql") {
                let sql = std::fs::read_to_string(&path).map_err(read_err)?;
                files.push((
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    sql,
                ));
            }
        }
        Self::from_files(files.into_iter(), &dir.display().to_string())
    }

    /// The built-in set, or the directory's when one is configured.
    pub fn load(dir: Option<&Path>) -> Result<TemplateSet, TemplateError> {
        match dir {
            Some(d) => Self::from_dir(d),
            None => Self::builtin(),
        }
    }

    pub(crate) fn from_files(
        files: impl Iterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<TemplateSet, TemplateError> {
        let mut templates = Vec::new();
        let mut baselines = Vec::new();
        for (file, sql) in files {
            let stem = file.strip_suffix(".sql").unwrap_or(&file);
            let bad = |reason: String| TemplateError::BadName {
                file: file.clone(),
                reason,
            };
            // A baseline's name is read as a version's (refinery's rules):
            // `B5__x` as `V5__x`.
            let (baseline, versioned) = match stem.strip_prefix('B') {
                Some(rest) => (true, format!("V{rest}")),
                None if stem.starts_with('V') => (false, stem.to_owned()),
                None => {
                    return Err(bad(
                        "only versioned (V) templates and one baseline (B) are supported".into(),
                    ))
                }
            };
            let migration =
                Migration::unapplied(&versioned, &sql).map_err(|e| bad(e.to_string()))?;
            lint::check(&sql).map_err(|e| TemplateError::Refused {
                file: file.clone(),
                line: e.line,
                reason: e.reason,
            })?;
            let version = TemplateVersion::parse(i64::from(migration.version()))
                .map_err(|e| bad(e.to_string()))?;
            let template = Template {
                version,
                name: migration.name().to_owned(),
                checksum: migration.checksum(),
                sql,
                baseline,
            };
            if baseline {
                baselines.push(template);
            } else {
                templates.push(template);
            }
        }
        templates.sort_by_key(|t| t.version);
        for pair in templates.windows(2) {
            if pair[0].version == pair[1].version {
                return Err(TemplateError::Duplicate(pair[0].version.get()));
            }
        }
        if templates.is_empty() {
            return Err(TemplateError::Empty(origin.to_owned()));
        }
        for (expected, t) in (1..).zip(&templates) {
            if t.version.get() != expected {
                return Err(TemplateError::Gap {
                    missing: expected,
                    next: t.file_name(),
                    origin: origin.to_owned(),
                });
            }
        }
        let baseline = match baselines.len() {
            0 => None,
            1 => {
                let template = baselines.remove(0);
                let m = template.version.get();
                if m > templates.len() as i32 {
                    return Err(TemplateError::Baseline {
                        file: template.file_name(),
                        reason: format!(
                            "it stands for V1..V{m}, and the newest version in {origin} is V{}",
                            templates.len()
                        ),
                    });
                }
                let covers = templates[..m as usize].iter().map(|t| t.checksum).collect();
                Some(Baseline { template, covers })
            }
            _ => {
                return Err(TemplateError::Baseline {
                    file: baselines[1].file_name(),
                    reason: format!(
                        "{origin} holds another baseline ({}): keep one",
                        baselines[0].file_name()
                    ),
                })
            }
        };
        Ok(TemplateSet {
            templates,
            origin: origin.to_owned(),
            baseline,
        })
    }

    /// The set's baseline, if it has one (see the module's documentation).
    pub fn baseline(&self) -> Option<&Baseline> {
        self.baseline.as_ref()
    }

    /// This set with `other`'s baseline, when this set's V1..V<m> are the
    /// versions the baseline stands for (same checksums); otherwise without
    /// one. How a set read from the database gets the baseline of the
    /// files this process was started with.
    pub fn with_baseline_of(&self, other: &TemplateSet) -> TemplateSet {
        let baseline = other.baseline.as_ref().filter(|b| {
            self.templates.len() >= b.covers.len()
                && self
                    .templates
                    .iter()
                    .zip(&b.covers)
                    .all(|(t, c)| t.checksum == *c)
        });
        TemplateSet {
            templates: self.templates.clone(),
            origin: self.origin.clone(),
            baseline: baseline.cloned(),
        }
    }

    /// This set without its baseline.
    pub fn without_baseline(&self) -> TemplateSet {
        TemplateSet {
            baseline: None,
            ..self.clone()
        }
    }

    /// What to run to build a schema from nothing up to `to`, in order: the
    /// baseline (when it stands for `to` or less) and the versions after
    /// it, or every version. The history records V1..`to` either way.
    pub fn to_build(&self, to: TemplateVersion) -> Vec<&Template> {
        let all = self.between(0, to);
        match &self.baseline {
            Some(b) if b.template.version <= to => std::iter::once(&b.template)
                .chain(&all[b.covers.len()..])
                .collect(),
            _ => all.iter().collect(),
        }
    }

    /// Where the set was read from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// One version, if the set has it.
    pub fn get(&self, version: TemplateVersion) -> Option<&Template> {
        // Versions run 1..=n without gaps (checked at load).
        self.templates
            .get(usize::try_from(version.get()).ok()?.checked_sub(1)?)
    }

    /// The versions after `from`, up to and including `to`.
    pub fn between(&self, from: i32, to: TemplateVersion) -> &[Template] {
        let start = usize::try_from(from).unwrap_or(0).min(self.templates.len());
        let end = usize::try_from(to.get())
            .unwrap_or(0)
            .min(self.templates.len());
        &self.templates[start.min(end)..end]
    }

    /// The versions up to and including `version`.
    pub fn up_to(&self, version: TemplateVersion) -> TemplateSet {
        TemplateSet {
            templates: self.between(0, version).to_vec(),
            origin: self.origin.clone(),
            baseline: self
                .baseline
                .clone()
                .filter(|b| b.template.version <= version),
        }
    }

    pub fn all(&self) -> &[Template] {
        &self.templates
    }

    /// The version new tenants are provisioned at.
    pub fn latest(&self) -> TemplateVersion {
        self.templates.last().expect("a set is never empty").version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_set_has_the_product_versions_in_order() {
        let set = TemplateSet::builtin().unwrap();
        let names: Vec<_> = set
            .all()
            .iter()
            .map(|t| (t.version().get(), t.name()))
            .collect();
        assert_eq!(
            names,
            vec![
                (1, "experiences"),
                (2, "conversations"),
                (3, "summaries"),
                (4, "skills"),
                (5, "experience_search")
            ]
        );
        assert_eq!(set.latest().get(), 5);
        let baseline = set.baseline().expect("the built-in baseline");
        assert_eq!(baseline.template().file_name(), "B5__baseline.sql");
        let v = TemplateVersion::parse(5).unwrap();
        let run: Vec<_> = set.to_build(v).iter().map(|t| t.file_name()).collect();
        assert_eq!(run, ["B5__baseline.sql"]);
    }

    #[test]
    fn a_baseline_stands_for_the_versions_up_to_its_own_and_no_further() {
        let s = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "select 2"),
            ("V3__c.sql", "select 3"),
            ("B2__ab.sql", "select 12"),
        ])
        .unwrap();
        let v = |n| TemplateVersion::parse(n).unwrap();
        let run = |to| -> Vec<String> { s.to_build(v(to)).iter().map(|t| t.file_name()).collect() };
        assert_eq!(run(3), ["B2__ab.sql", "V3__c.sql"]);
        assert_eq!(run(2), ["B2__ab.sql"]);
        // Below the baseline: the versions themselves.
        assert_eq!(run(1), ["V1__a.sql"]);
        // Never a version of its own.
        assert_eq!(s.all().len(), 3);
        assert_eq!(s.latest().get(), 3);
        assert!(s.up_to(v(1)).baseline().is_none());
        assert!(s.up_to(v(2)).baseline().is_some());
    }

    #[test]
    fn a_baseline_is_kept_only_with_the_versions_it_was_written_against() {
        let local = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "select 2"),
            ("B2__ab.sql", "select 12"),
        ])
        .unwrap();
        let same = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "select 2"),
            ("V3__c.sql", "select 3"),
        ])
        .unwrap();
        assert!(same.with_baseline_of(&local).baseline().is_some());
        let other_v2 = set(&[("V1__a.sql", "select 1"), ("V2__b.sql", "select 22")]).unwrap();
        assert!(other_v2.with_baseline_of(&local).baseline().is_none());
        let shorter = set(&[("V1__a.sql", "select 1")]).unwrap();
        assert!(shorter.with_baseline_of(&local).baseline().is_none());
    }

    #[test]
    fn a_baseline_past_the_newest_version_or_a_second_one_is_refused() {
        let err = set(&[("V1__a.sql", "select 1"), ("B2__ab.sql", "select 12")]).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Baseline { file, .. } if file == "B2__ab.sql"),
            "{err}"
        );
        assert!(err.to_string().contains("newest version"), "{err}");
        let err = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "select 2"),
            ("B1__a.sql", "select 1"),
            ("B2__ab.sql", "select 12"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("keep one"), "{err}");
        let err = set(&[("V1__a.sql", "select 1"), ("B1__a.sql", "COMMIT")]).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Refused { file, .. } if file == "B1__a.sql"),
            "{err}"
        );
    }

    #[test]
    fn a_badly_named_template_is_refused() {
        let err = TemplateSet::from_files(
            vec![("experiences.sql".to_string(), "select 1".to_string())].into_iter(),
            "test",
        )
        .unwrap_err();
        assert!(matches!(err, TemplateError::BadName { .. }));
    }

    #[test]
    fn checksums_change_with_the_sql() {
        let a = TemplateSet::from_files(
            vec![("V1__a.sql".into(), "select 1".into())].into_iter(),
            "t",
        )
        .unwrap();
        let b = TemplateSet::from_files(
            vec![("V1__a.sql".into(), "select 2".into())].into_iter(),
            "t",
        )
        .unwrap();
        assert_ne!(a.all()[0].checksum(), b.all()[0].checksum());
    }

    fn set(files: &[(&str, &str)]) -> Result<TemplateSet, TemplateError> {
        TemplateSet::from_files(
            files.iter().map(|(f, s)| (f.to_string(), s.to_string())),
            "test",
        )
    }

    #[test]
    fn a_gap_in_the_versions_is_refused_naming_the_missing_one() {
        let err = set(&[("V1__a.sql", "select 1"), ("V3__c.sql", "select 3")]).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Gap { missing: 2, next, .. } if next == "V3__c.sql"),
            "{err}"
        );
    }

    #[test]
    fn a_template_with_commit_is_refused_at_load_naming_the_file() {
        let err = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "CREATE TABLE t (id int);\nCOMMIT;"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("V2__b.sql") && text.contains("line 2"),
            "{text}"
        );
        assert!(text.contains("COMMIT is not allowed"), "{text}");
    }

    #[test]
    fn between_gives_the_pending_versions() {
        let s = set(&[
            ("V1__a.sql", "select 1"),
            ("V2__b.sql", "select 2"),
            ("V3__c.sql", "select 3"),
        ])
        .unwrap();
        let v = |n| TemplateVersion::parse(n).unwrap();
        let names: Vec<_> = s.between(1, v(3)).iter().map(|t| t.name()).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(s.between(3, v(3)).is_empty());
        assert_eq!(s.get(v(2)).unwrap().name(), "b");
        assert!(s.get(v(4)).is_none());
    }

    #[test]
    fn duplicate_and_empty_template_sets_are_refused() {
        let err = set(&[("V1__a.sql", "select 1"), ("V1__b.sql", "select 2")]).unwrap_err();
        assert!(matches!(err, TemplateError::Duplicate(1)), "{err}");
        let err = set(&[]).unwrap_err();
        assert!(matches!(err, TemplateError::Empty(_)), "{err}");
        let dir = std::env::temp_dir().join(format!("tenantry-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            TemplateSet::from_dir(&dir),
            Err(TemplateError::Empty(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
