//! One typed `Settings`, read from the environment and validated at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the database is.
#[derive(Clone, Debug)]
pub enum DatabaseTarget {
    /// `DATABASE_URL` was given: use it, start nothing.
    Url(SecretString),
    /// No `DATABASE_URL`: a private cluster under the data dir.
    Embedded,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub database: DatabaseTarget,
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    /// `None` in embedded mode until the data dir's generated secret is read.
    pub jwt_secret: Option<SecretString>,
    pub bcrypt_cost: u32,
    pub templates_dir: Option<PathBuf>,
    /// Largest pool the service keeps.
    pub pool_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("JWT_SECRET is required when DATABASE_URL is set (at least 32 bytes)")]
    MissingJwtSecret,
}

impl Settings {
    /// Read and validate the environment.
    pub fn from_env() -> Result<Settings, SettingsError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let database = match get("DATABASE_URL") {
            Some(url) => {
                url.parse::<tokio_postgres::Config>()
                    .map_err(|e| SettingsError::Invalid {
                        name: "DATABASE_URL",
                        reason: e.to_string(),
                    })?;
                DatabaseTarget::Url(SecretString(url))
            }
            None => DatabaseTarget::Embedded,
        };
        let data_dir =
            PathBuf::from(get("TENANTRY_DATA_DIR").unwrap_or_else(|| ".tenantry".into()));
        let bind = get("TENANTRY_BIND")
            .unwrap_or_else(|| "127.0.0.1:8080".into())
            .parse()
            .map_err(|e: std::net::AddrParseError| SettingsError::Invalid {
                name: "TENANTRY_BIND",
                reason: format!("{e} (expected host:port, e.g. 127.0.0.1:8080)"),
            })?;
        let jwt_secret = match get("JWT_SECRET") {
            Some(s) if s.len() < 32 => {
                return Err(SettingsError::Invalid {
                    name: "JWT_SECRET",
                    reason: "must be at least 32 bytes".into(),
                })
            }
            Some(s) => Some(SecretString(s)),
            None => None,
        };
        let bcrypt_cost = match get("BCRYPT_COST") {
            None => 12,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|c| (4..=31).contains(c))
                .ok_or(SettingsError::Invalid {
                    name: "BCRYPT_COST",
                    reason: "must be an integer from 4 to 31".into(),
                })?,
        };
        let pool_size = match get("TENANTRY_POOL_SIZE") {
            None => 16,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or(SettingsError::Invalid {
                    name: "TENANTRY_POOL_SIZE",
                    reason: "must be an integer from 1 to 1000".into(),
                })?,
        };
        Ok(Settings {
            database,
            data_dir,
            bind,
            jwt_secret,
            bcrypt_cost,
            templates_dir: get("TENANTRY_TEMPLATES_DIR").map(PathBuf::from),
            pool_size,
        })
    }
}

impl Settings {
    /// The HS256 key for `serve`: `JWT_SECRET`, or in embedded mode the one
    /// generated into the data dir. Only `serve` needs one, so only it asks.
    pub fn jwt_secret(&self) -> Result<SecretString, SettingsError> {
        match (&self.jwt_secret, &self.database) {
            (Some(s), _) => Ok(s.clone()),
            (None, DatabaseTarget::Url(_)) => Err(SettingsError::MissingJwtSecret),
            (None, DatabaseTarget::Embedded) => {
                crate::embedded::generated_secret(&self.data_dir.join("jwt_secret"))
                    .map(SecretString)
                    .map_err(|e| SettingsError::Invalid {
                        name: "TENANTRY_DATA_DIR",
                        reason: e.to_string(),
                    })
            }
        }
    }
}

/// A string that never shows up in `Debug` output or logs.
#[derive(Clone)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: String) -> Self {
        SecretString(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn defaults_need_no_configuration() {
        let s = Settings::from_lookup(lookup(&[])).unwrap();
        assert!(matches!(s.database, DatabaseTarget::Embedded));
        assert_eq!(s.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(s.bcrypt_cost, 12);
    }

    #[test]
    fn a_database_url_requires_a_jwt_secret() {
        let s = Settings::from_lookup(lookup(&[("DATABASE_URL", "postgres://x@localhost/db")]))
            .unwrap();
        assert!(matches!(
            s.jwt_secret(),
            Err(SettingsError::MissingJwtSecret)
        ));
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = Settings::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://x:hunter2@localhost/db"),
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef-secret"),
        ]))
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("-secret"));
    }

    #[test]
    fn a_bad_bcrypt_cost_is_refused() {
        assert!(Settings::from_lookup(lookup(&[("BCRYPT_COST", "99")])).is_err());
    }
}
