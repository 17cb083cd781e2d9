//! A backup directory: the files in it, the manifest that describes them,
//! and writing it so that nothing half-made ever looks like a backup.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::roles::TenantRole;
use crate::cli::Failure;

/// What the backup is: written last, so a directory without it is no backup.
pub const MANIFEST: &str = "manifest.json";
/// `pg_dump --format=custom` of the database.
pub const DUMP: &str = "database.dump";
/// The installation's roles as DDL (what the dump leaves out).
pub const ROLES: &str = "roles.sql";
/// A copy of the audit anchor file.
pub const ANCHORS: &str = "audit-anchors";
/// The secret generated into the embedded data dir.
pub const SECRET: &str = "jwt_secret";

/// The manifest's format; a restore refuses any other.
pub const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tenantry_version: String,
    pub created_at: DateTime<Utc>,
    pub installation_id: String,
    /// The last system migration applied to the database.
    pub system_migration: i32,
    pub postgres_version: String,
    /// The role that owns the database's objects (the tenant roles' aside):
    /// a restore connects as a role of this name.
    pub service_role: String,
    pub database: String,
    pub tenants: i64,
    pub users: i64,
    /// Relations in the database: the restore's one transaction locks each.
    pub relations: i64,
    pub roles: Vec<TenantRole>,
    /// How many router roles (`db::routers`) the installation had: a
    /// restore makes them without a login, since the database grants them
    /// what routing reads, and `serve` gives them one and their tenants.
    #[serde(default)]
    pub routers: usize,
    /// Roles outside the installation that own objects or hold privileges
    /// in the database: they must exist where it is restored.
    pub other_roles: Vec<String>,
    pub secret: Secret,
    /// SHA-256 (hex) of each file beside the manifest.
    pub files: BTreeMap<String, String>,
}

/// The installation's secret (`JWT_SECRET`): it signs tokens and exports
/// and keys the audit log's pseudonyms, so a restored installation should
/// run with the same one.
#[derive(Debug, Serialize, Deserialize)]
pub struct Secret {
    pub source: SecretSource,
    /// [`secret_check`] of it: a restore compares the secret it will run with.
    pub check: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    /// Generated into the embedded data dir; in the backup as [`SECRET`].
    DataDir,
    /// `JWT_SECRET` (or `_FILE`): the admin keeps it; not in the backup.
    Environment,
    /// `DATABASE_URL` without `JWT_SECRET`: the backup could not tell.
    Unknown,
}

/// A value that tells two secrets apart without revealing either.
pub fn secret_check(secret: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"tenantry backup: secret check");
    hex::encode(&mac.finalize().into_bytes()[..16])
}

fn usage(context: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::Usage(format!("{context} {}: {e}", path.display()))
}

fn other(context: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::Other(format!("{context} {}: {e}", path.display()))
}

/// A backup being written. A DIR that does not exist is written as a
/// hidden sibling and renamed to DIR at the end, so it appears whole or not
/// at all. A DIR that exists and is empty (a mount point, say, onto which no
/// rename can land) gets a hidden directory inside it, whose files move up
/// at the end with the manifest last; a restore refuses a directory without
/// one. Dropped before [`Staging::finish`], it removes what it wrote.
#[derive(Debug)]
pub struct Staging {
    dest: PathBuf,
    work: PathBuf,
    inside: bool,
    done: bool,
}

impl Staging {
    /// Refuse (exit 2) a DIR that is not empty or not a directory, or whose
    /// parent does not exist; make the hidden directory (0700: a backup
    /// holds password hashes and perhaps the secret).
    pub fn prepare(dest: &Path) -> Result<Staging, Failure> {
        let (work, inside) = match fs::metadata(dest) {
            Ok(meta) if meta.is_dir() => {
                let mut entries = fs::read_dir(dest).map_err(|e| usage("cannot read", dest, e))?;
                if entries.next().is_some() {
                    return Err(Failure::Usage(format!(
                        "{} exists and is not empty: back up into a new or an empty directory",
                        dest.display()
                    )));
                }
                (dest.join(".tenantry-backup-partial"), true)
            }
            Ok(_) => {
                return Err(Failure::Usage(format!(
                    "{} exists and is not a directory",
                    dest.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = dest.file_name().ok_or_else(|| {
                    Failure::Usage(format!("{} names no directory", dest.display()))
                })?;
                let parent = match dest.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if !parent.is_dir() {
                    return Err(Failure::Usage(format!(
                        "{} does not exist: create it first, or back up elsewhere",
                        parent.display()
                    )));
                }
                let hidden = format!(".{}.partial-{}", name.to_string_lossy(), std::process::id());
                (parent.join(hidden), false)
            }
            Err(e) => return Err(usage("cannot read", dest, e)),
        };
        DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .map_err(|e| usage("cannot write a backup into", dest, e))?;
        Ok(Staging {
            dest: dest.to_owned(),
            work,
            inside,
            done: false,
        })
    }

    /// Where the files go meanwhile.
    pub fn path(&self) -> &Path {
        &self.work
    }

    /// Write one file (0600), synced.
    pub fn write(&self, name: &str, content: &[u8]) -> Result<(), Failure> {
        write_private(&self.work.join(name), content)
    }

    /// Write the manifest (with the checksums of the files beside it) and
    /// put the backup in place.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<PathBuf, Failure> {
        let mut names: Vec<String> = fs::read_dir(&self.work)
            .map_err(|e| other("cannot read", &self.work, e))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(|e| other("cannot read", &self.work, e))?;
        names.sort();
        for name in &names {
            let path = self.work.join(name);
            manifest.files.insert(
                name.clone(),
                sha256_file(&path).map_err(|e| other("cannot read", &path, e))?,
            );
        }
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.write(MANIFEST, &json)?;
        sync_dir(&self.work)?;
        if self.inside {
            names.push(MANIFEST.into());
            for name in &names {
                fs::rename(self.work.join(name), self.dest.join(name))
                    .map_err(|e| other("cannot move into", &self.dest, e))?;
            }
            fs::remove_dir(&self.work).map_err(|e| other("cannot remove", &self.work, e))?;
            sync_dir(&self.dest)?;
        } else {
            fs::rename(&self.work, &self.dest)
                .map_err(|e| other("cannot rename the finished backup to", &self.dest, e))?;
            if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        self.done = true;
        Ok(self.dest.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

/// A backup to restore, its files checked against the manifest.
#[derive(Debug)]
pub struct Backup {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Backup {
    /// Read the manifest and check every file it names (exit 2 when the
    /// directory is not a whole backup, or a file changed since).
    /// Blocking: it reads the whole dump.
    pub fn open(dir: &Path) -> Result<Backup, Failure> {
        if !dir.is_dir() {
            return Err(Failure::Usage(format!(
                "{} is not a directory (give the directory `tenantry backup` wrote)",
                dir.display()
            )));
        }
        let path = dir.join(MANIFEST);
        let text = fs::read(&path).map_err(|e| {
            Failure::Usage(format!(
                "{} is not a backup: cannot read its {MANIFEST} ({e}); a backup that did not finish has none",
                dir.display()
            ))
        })?;
        let format = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("format")?.as_u64());
        if format != Some(u64::from(FORMAT)) {
            return Err(Failure::Usage(format!(
                "{}: not a manifest this version reads (format {}, expected {FORMAT})",
                path.display(),
                format.map_or("missing".into(), |f| f.to_string())
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        for name in [DUMP, ROLES] {
            if !manifest.files.contains_key(name) {
                return Err(Failure::Usage(format!(
                    "{}: the manifest lists no {name}",
                    path.display()
                )));
            }
        }
        for (name, expected) in &manifest.files {
            if name.contains('/') || name == MANIFEST {
                return Err(Failure::Usage(format!(
                    "{}: lists a file it may not: {name}",
                    path.display()
                )));
            }
            let file = dir.join(name);
            let actual = sha256_file(&file).map_err(|e| usage("cannot read", &file, e))?;
            if &actual != expected {
                return Err(Failure::Usage(format!(
                    "{} is damaged: its checksum is not the one in the manifest",
                    file.display()
                )));
            }
        }
        Ok(Backup {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// A file of the backup, if it has it.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        self.manifest
            .files
            .contains_key(name)
            .then(|| self.dir.join(name))
    }
}

/// What putting a file of the backup where it belongs (the anchor file, the
/// data dir's secret) comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Nothing there: copy it.
    Copy,
    /// The same file is there already.
    Same,
    /// The file there begins with the backup's and goes on (anchors written
    /// since the backup): kept.
    Longer,
}

/// Decide how `backup`'s content goes to where `there` holds `existing`;
/// `None` when they differ (never overwritten).
pub fn placement(backup: &[u8], existing: Option<&[u8]>, may_be_longer: bool) -> Option<Placement> {
    match existing {
        None => Some(Placement::Copy),
        Some(e) if e == backup => Some(Placement::Same),
        Some(e) if may_be_longer && e.starts_with(backup) => Some(Placement::Longer),
        Some(_) => None,
    }
}

/// Read a file that may not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Failure> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(usage("cannot read", path, e)),
    }
}

/// Write a file that must not exist yet (0600), synced; its directory is
/// made when missing.
pub fn write_new(path: &Path, content: &[u8]) -> Result<(), Failure> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| other("cannot create", dir, e))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| other("cannot write", path, e))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(|e| other("cannot write", path, e))
}

fn write_private(path: &Path, content: &[u8]) -> Result<(), Failure> {
    let _ = fs::remove_file(path);
    write_new(path, content)
}

fn sync_dir(dir: &Path) -> Result<(), Failure> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| other("cannot sync", dir, e))
}

/// SHA-256 of a file, read in blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tenantry-backup-files-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            tenantry_version: "0".into(),
            created_at: Utc::now(),
            installation_id: "ab12cd34".into(),
            system_migration: 1,
            postgres_version: "15".into(),
            service_role: "svc".into(),
            database: "db".into(),
            tenants: 0,
            users: 0,
            relations: 0,
            roles: Vec::new(),
            routers: 0,
            other_roles: Vec::new(),
            secret: Secret {
                source: SecretSource::Unknown,
                check: None,
            },
            files: BTreeMap::new(),
        }
    }

    fn finished(dest: &Path) -> PathBuf {
        let staging = Staging::prepare(dest).unwrap();
        staging.write(DUMP, b"dump").unwrap();
        staging.write(ROLES, b"roles").unwrap();
        staging.finish(manifest()).unwrap()
    }

    #[test]
    fn a_new_directory_appears_whole_and_opens_as_a_backup() {
        let root = scratch("new");
        let dest = root.join("b");
        finished(&dest);
        let names: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b"], "no partial directory is left beside it");
        let backup = Backup::open(&dest).unwrap();
        assert_eq!(backup.manifest.files.len(), 2);
        assert_eq!(backup.file(DUMP), Some(dest.join(DUMP)));
        assert_eq!(backup.file(ANCHORS), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_empty_directory_is_filled_and_a_full_one_refused() {
        let root = scratch("empty");
        finished(&root);
        let mut names: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [DUMP, MANIFEST, ROLES]);
        assert!(matches!(Staging::prepare(&root), Err(Failure::Usage(_))));
        assert!(matches!(
            Staging::prepare(&root.join(DUMP)),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(
            Staging::prepare(&root.join("missing/b")),
            Err(Failure::Usage(_))
        ));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_unfinished_backup_leaves_nothing() {
        let root = scratch("unfinished");
        let staging = Staging::prepare(&root.join("b")).unwrap();
        staging.write(DUMP, b"half").unwrap();
        drop(staging);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_changed_file_or_a_missing_manifest_is_refused() {
        let root = scratch("damaged");
        let dest = finished(&root.join("b"));
        fs::write(dest.join(DUMP), b"dump, changed").unwrap();
        let Err(Failure::Usage(message)) = Backup::open(&dest) else {
            panic!("a damaged dump opens")
        };
        assert!(message.contains("damaged"), "{message}");
        fs::remove_file(dest.join(MANIFEST)).unwrap();
        assert!(matches!(Backup::open(&dest), Err(Failure::Usage(_))));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn files_are_placed_only_where_nothing_else_is() {
        assert_eq!(placement(b"a\n", None, true), Some(Placement::Copy));
        assert_eq!(placement(b"a\n", Some(b"a\n"), true), Some(Placement::Same));
        assert_eq!(
            placement(b"a\n", Some(b"a\nb\n"), true),
            Some(Placement::Longer)
        );
        assert_eq!(placement(b"a\n", Some(b"a\nb\n"), false), None);
        assert_eq!(placement(b"a\n", Some(b"c\n"), true), None);
    }

    #[test]
    fn secret_checks_tell_secrets_apart_without_showing_them() {
        let check = secret_check("test-secret-test-secret-test-secret-0123");
        assert_eq!(
            check,
            secret_check("test-secret-test-secret-test-secret-0123")
        );
        assert_ne!(check, secret_check("another-secret-another-secret-0123456"));
        assert!(!check.contains("test"));
        assert_eq!(check.len(), 32);
    }
}
