//! One typed `Settings`, read from the environment and validated at start.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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
    /// `JWT_PREVIOUS_SECRET`: the secret before a rotation; access tokens
    /// it signed stay valid until they expire.
    pub jwt_previous_secret: Option<SecretString>,
    pub bcrypt_cost: u32,
    pub templates_dir: Option<PathBuf>,
    /// Largest pool the service keeps.
    pub pool_size: usize,
    /// Abuse controls (`TENANTRY_RATE_LIMIT_*`, `TENANTRY_LOGIN_MAX_FAILURES`,
    /// `TENANTRY_TRUSTED_PROXIES`).
    pub limits: Limits,
    /// How long a request's body may take to arrive (idle between chunks,
    /// and in all) before the request is cut off with 408.
    pub client_timeout: Duration,
    /// Where the audit chain's anchors are appended
    /// (`TENANTRY_AUDIT_ANCHOR_FILE`, default `<data dir>/audit-anchors`).
    pub audit_anchor_file: PathBuf,
    /// How often `serve` anchors the audit chain and purges expired rows
    /// (`TENANTRY_MAINTENANCE_INTERVAL`, seconds).
    pub maintenance_interval: Duration,
    /// `TENANTRY_TENANT_QUOTA_BYTES`: the bytes a tenant's schema may take
    /// before its writes are refused (`tenancy::usage`), unless it has a
    /// quota of its own; 0 is none.
    pub tenant_quota_bytes: u64,
    /// `TENANTRY_USAGE_INTERVAL` (seconds): how often `serve` measures every
    /// tenant's usage (and at start); 0 never.
    pub usage_interval: Option<Duration>,
    /// `TENANTRY_METRICS_TOKEN`: the bearer token `/metrics` asks for; unset,
    /// it answers loopback clients only.
    pub metrics_token: Option<SecretString>,
    /// `TENANTRY_EXPORT_CONCURRENCY`: exports streamed at once, each on a
    /// database connection of its own (one per user at a time).
    pub export_concurrency: usize,
    /// `TENANTRY_SPARE_ROLES`: tenant roles `serve` keeps made ahead of
    /// signups (`tenancy::spares`), refilled below half; 0 makes each
    /// signup make its own.
    pub spare_roles: usize,
    /// `TENANTRY_SPARE_SCHEMAS`: how many of the spares `serve` keeps with
    /// their schema built at the newest template version (in the
    /// background, one at a time), so that a signup runs no template; 0
    /// makes each signup run them. At most `spare_roles`.
    pub spare_schemas: usize,
    /// `TENANTRY_ROUTER_ROLES`: how many router roles the request pool's
    /// connections log in as, each a member of its share of the tenant
    /// roles (`db::routers`); 0 makes them log in as the service.
    pub router_roles: usize,
    /// `TENANTRY_CITUS_ROUTING`: on Citus, where tenants' requests go.
    pub citus_routing: CitusRouting,
    /// `TENANTRY_CITUS_REFRESH_INTERVAL`: how often direct routing reads the
    /// tenants' placements again without a reason (seconds; 0: only after a
    /// move, a miss or a stale hit).
    pub citus_refresh_interval: Option<Duration>,
    /// `TENANTRY_EXTRA_CONNECTIONS`: connections `serve` opens outside its
    /// pool at most (exports, fleet runs, `/health`'s spare, the mail
    /// sender, the builder of spare schemas); default the export
    /// concurrency + 12.
    pub extra_connections: usize,
    /// `TENANTRY_EXPORT_TIMEOUT` (seconds): how long one export may run,
    /// however fast its client reads.
    pub export_timeout: Duration,
    /// `TENANTRY_STATEMENT_TIMEOUT` (seconds, `0` = none): how long one
    /// statement of a tenant's request may run.
    pub statement_timeout: Duration,
    /// `TENANTRY_TLS_CERT` and `TENANTRY_TLS_KEY`: `serve` speaks HTTPS.
    pub tls: Option<TlsFiles>,
    /// Mail and accounts (`TENANTRY_SMTP_URL`, `TENANTRY_MAIL_*`,
    /// `TENANTRY_PUBLIC_URL`, `TENANTRY_UNVERIFIED_TTL`).
    pub mail: MailSettings,
    /// Webhook delivery (`TENANTRY_WEBHOOK_*`).
    pub webhooks: WebhookSettings,
}

/// The PEM files of `serve`'s HTTPS certificate chain and private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How mail is sent, and how long unverified accounts are kept.
#[derive(Clone, Debug)]
pub struct MailSettings {
    /// `TENANTRY_SMTP_URL`; unset: `.eml` files under `<data dir>/mail/`.
    pub smtp_url: Option<SecretString>,
    /// `TENANTRY_MAIL_FROM`.
    pub from: String,
    /// `TENANTRY_PUBLIC_URL`: where the links in mails point (default
    /// `http://<TENANTRY_BIND>`).
    pub public_url: String,
    /// `TENANTRY_MAIL_MAX_ATTEMPTS`: attempts before a mail is dead.
    pub max_attempts: u32,
    /// `TENANTRY_MAIL_BACKOFF_MS`: the first retry's delay; it doubles with
    /// each attempt (with jitter), up to an hour.
    pub backoff: Duration,
    /// `TENANTRY_MAIL_RETENTION` (seconds): how long delivered rows are kept.
    pub retention: Duration,
    /// `TENANTRY_UNVERIFIED_TTL` (seconds, `0` keeps them): accounts that
    /// never verified their address are erased after it.
    pub unverified_ttl: Option<Duration>,
}

/// How `serve` delivers webhooks (`webhooks::delivery`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSettings {
    /// `TENANTRY_WEBHOOK_MAX_ATTEMPTS`: attempts before a delivery is dead.
    pub max_attempts: u32,
    /// `TENANTRY_WEBHOOK_BACKOFF_MS`: the first retry's delay; it doubles
    /// with each attempt (with jitter), up to an hour.
    pub backoff: Duration,
    /// `TENANTRY_WEBHOOK_TIMEOUT` (seconds): one attempt's limit, connect
    /// and answer.
    pub timeout: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            max_attempts: 10,
            backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Requests per minute; `0` turns a limit off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Per client IP on `/api/auth/*`.
    pub auth_per_minute: u32,
    /// Per client IP on other requests without a valid access token.
    pub anon_per_minute: u32,
    /// Per user (a valid access token) everywhere else.
    pub user_per_minute: u32,
    /// Failed logins in 15 minutes before an account name is locked (0: never).
    pub login_max_failures: u32,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// The per-IP limits (`auth`, `anon`) count across every process on
    /// the database, not only in this one (benchmarks turn it off to
    /// measure its cost).
    pub shared: bool,
    /// The per-user limit counted in the database too: off, as measured
    /// (docs/benchmarks.md); benchmarks turn it on to measure it.
    pub shared_user: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            auth_per_minute: 10,
            anon_per_minute: 20,
            user_per_minute: 100,
            login_max_failures: 10,
            trusted_proxies: Vec::new(),
            shared: true,
            shared_user: false,
        }
    }
}

impl Limits {
    /// Every limit off (tests and benchmarks that create many accounts).
    pub fn off() -> Limits {
        Limits {
            auth_per_minute: 0,
            anon_per_minute: 0,
            user_per_minute: 0,
            login_max_failures: 0,
            trusted_proxies: Vec::new(),
            shared: true,
            shared_user: false,
        }
    }
}

/// Where `serve` sends a tenant's request on Citus (`db::direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CitusRouting {
    /// Straight to the worker that holds the tenant (the default).
    #[default]
    Direct,
    /// Through the coordinator, as the tenant's role.
    Coordinator,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
    /// Well-formed, but naming something that cannot be used (a file that
    /// cannot be read).
    #[error("{name}: {reason}")]
    Unusable { name: &'static str, reason: String },
    #[error("JWT_SECRET is required when DATABASE_URL is set (at least 32 bytes; or JWT_SECRET_FILE naming a file that holds it)")]
    MissingJwtSecret,
}

impl Settings {
    /// Read and validate the environment.
    pub fn from_env() -> Result<Settings, SettingsError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        // A secret comes from its variable or from the file its `_FILE`
        // variable names (Docker and Kubernetes secrets), never both.
        let secret = |name: &'static str| -> Result<Option<String>, SettingsError> {
            read_secret(name, get(name), get(&format!("{name}_FILE")))
        };
        let database = match secret("DATABASE_URL")? {
            Some(url) => {
                // libpq's TLS parameters are ours to apply; the rest is
                // tokio-postgres's to check. The certificate files are read
                // now, so a missing one stops the start.
                let invalid = |reason: String| SettingsError::Invalid {
                    name: "DATABASE_URL",
                    reason,
                };
                let (rest, ssl) = crate::postgres_tls::split(&url).map_err(invalid)?;
                let config = rest
                    .parse::<tokio_postgres::Config>()
                    .map_err(|e| invalid(e.to_string()))?;
                crate::postgres_tls::check(&config, &ssl).map_err(invalid)?;
                crate::postgres_tls::Tls::new(&ssl).map_err(|reason| SettingsError::Unusable {
                    name: "DATABASE_URL",
                    reason,
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
        let jwt_secret = match secret("JWT_SECRET")? {
            Some(s) if s.len() < 32 => {
                return Err(SettingsError::Invalid {
                    name: "JWT_SECRET",
                    reason: "must be at least 32 bytes".into(),
                })
            }
            Some(s) => Some(SecretString(s)),
            None => None,
        };
        let jwt_previous_secret = match secret("JWT_PREVIOUS_SECRET")? {
            Some(s) if s.len() < 32 => {
                return Err(SettingsError::Invalid {
                    name: "JWT_PREVIOUS_SECRET",
                    reason: "must be at least 32 bytes".into(),
                })
            }
            Some(s) if jwt_secret.as_ref().is_some_and(|current| current.0 == s) => {
                return Err(SettingsError::Invalid {
                    name: "JWT_PREVIOUS_SECRET",
                    reason: "is the same as JWT_SECRET: set it to the secret before the rotation"
                        .into(),
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
        let number = |name: &'static str, default: u32, max: u32| -> Result<u32, SettingsError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.trim().parse::<u32>().ok().filter(|n| *n <= max).ok_or(
                    SettingsError::Invalid {
                        name,
                        reason: format!("must be an integer from 0 to {max}"),
                    },
                ),
            }
        };
        let trusted_proxies = match get("TENANTRY_TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<IpAddr>().map_err(|_| SettingsError::Invalid {
                        name: "TENANTRY_TRUSTED_PROXIES",
                        reason: format!(
                            "{s:?} is not an IP address (expected a comma-separated list)"
                        ),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let limits = Limits {
            auth_per_minute: number("TENANTRY_RATE_LIMIT_AUTH", 10, 1_000_000)?,
            anon_per_minute: number("TENANTRY_RATE_LIMIT_ANON", 20, 1_000_000)?,
            user_per_minute: number("TENANTRY_RATE_LIMIT_USER", 100, 1_000_000)?,
            login_max_failures: number("TENANTRY_LOGIN_MAX_FAILURES", 10, 1_000_000)?,
            trusted_proxies,
            shared: true,
            shared_user: false,
        };
        let client_timeout =
            Duration::from_secs(number("TENANTRY_CLIENT_TIMEOUT", 10, 3600)?.max(1).into());
        let maintenance_interval = Duration::from_secs(
            number("TENANTRY_MAINTENANCE_INTERVAL", 60, 86_400)?
                .max(1)
                .into(),
        );
        let tenant_quota_bytes = match get("TENANTRY_TENANT_QUOTA_BYTES") {
            None => 0,
            Some(v) => parse_bytes(&v).map_err(|reason| SettingsError::Invalid {
                name: "TENANTRY_TENANT_QUOTA_BYTES",
                reason,
            })?,
        };
        let usage_interval = match number("TENANTRY_USAGE_INTERVAL", 300, 86_400)? {
            0 => None,
            secs => Some(Duration::from_secs(secs.into())),
        };
        let audit_anchor_file = get("TENANTRY_AUDIT_ANCHOR_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("audit-anchors"));
        let metrics_token = match secret("TENANTRY_METRICS_TOKEN")? {
            Some(t) if t.len() < 16 => {
                return Err(SettingsError::Invalid {
                    name: "TENANTRY_METRICS_TOKEN",
                    reason: "must be at least 16 characters".into(),
                })
            }
            other => other.map(SecretString),
        };
        let export_concurrency = number("TENANTRY_EXPORT_CONCURRENCY", 4, 1000)?.max(1) as usize;
        let spare_roles = number("TENANTRY_SPARE_ROLES", 1000, 10_000)? as usize;
        let spare_schemas = number("TENANTRY_SPARE_SCHEMAS", 100, 10_000)? as usize;
        let router_roles = number("TENANTRY_ROUTER_ROLES", 8, 64)? as usize;
        let citus_refresh_interval = match number("TENANTRY_CITUS_REFRESH_INTERVAL", 10, 86_400)? {
            0 => None,
            secs => Some(Duration::from_secs(secs.into())),
        };
        let citus_routing = match get("TENANTRY_CITUS_ROUTING").as_deref() {
            None | Some("direct") => CitusRouting::Direct,
            Some("coordinator") => CitusRouting::Coordinator,
            Some(_) => {
                return Err(SettingsError::Invalid {
                    name: "TENANTRY_CITUS_ROUTING",
                    reason: "must be `direct` or `coordinator`".into(),
                })
            }
        };
        let extra_connections = number(
            "TENANTRY_EXTRA_CONNECTIONS",
            export_concurrency as u32 + 12,
            10_000,
        )? as usize;
        if extra_connections < export_concurrency + 3 {
            return Err(SettingsError::Invalid {
                name: "TENANTRY_EXTRA_CONNECTIONS",
                reason: format!(
                    "must be at least TENANTRY_EXPORT_CONCURRENCY + 3 ({}): the exports, the mail sender, the webhook sender and /health's spare",
                    export_concurrency + 3
                ),
            });
        }
        let export_timeout = Duration::from_secs(
            number("TENANTRY_EXPORT_TIMEOUT", 600, 86_400)?
                .max(1)
                .into(),
        );
        let statement_timeout =
            Duration::from_secs(number("TENANTRY_STATEMENT_TIMEOUT", 5, 3600)?.into());
        let smtp_url = match secret("TENANTRY_SMTP_URL")? {
            None => None,
            Some(url) => {
                crate::mail::delivery::SmtpTarget::parse(&url).map_err(|reason| {
                    SettingsError::Invalid {
                        name: "TENANTRY_SMTP_URL",
                        reason,
                    }
                })?;
                Some(SecretString(url))
            }
        };
        let from =
            get("TENANTRY_MAIL_FROM").unwrap_or_else(|| "Tenantry <tenantry@localhost>".into());
        if from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(SettingsError::Invalid {
                name: "TENANTRY_MAIL_FROM",
                reason: "must be an address, e.g. \"Tenantry <no-reply@example.com>\"".into(),
            });
        }
        let tls = match (get("TENANTRY_TLS_CERT"), get("TENANTRY_TLS_KEY")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (cert, _) => {
                return Err(SettingsError::Invalid {
                    name: if cert.is_some() {
                        "TENANTRY_TLS_KEY"
                    } else {
                        "TENANTRY_TLS_CERT"
                    },
                    reason: "HTTPS needs both TENANTRY_TLS_CERT and TENANTRY_TLS_KEY".into(),
                })
            }
        };
        let public_url = match get("TENANTRY_PUBLIC_URL") {
            None if tls.is_some() => format!("https://{bind}"),
            None => format!("http://{bind}"),
            Some(u) => {
                let parsed = url::Url::parse(&u)
                    .ok()
                    .filter(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some());
                if parsed.is_none() {
                    return Err(SettingsError::Invalid {
                        name: "TENANTRY_PUBLIC_URL",
                        reason: "must be an http:// or https:// URL".into(),
                    });
                }
                u.trim_end_matches('/').to_owned()
            }
        };
        let webhooks = WebhookSettings {
            max_attempts: number("TENANTRY_WEBHOOK_MAX_ATTEMPTS", 10, 1000)?.max(1),
            backoff: Duration::from_millis(
                number("TENANTRY_WEBHOOK_BACKOFF_MS", 5000, 3_600_000)?
                    .max(1)
                    .into(),
            ),
            timeout: Duration::from_secs(
                number("TENANTRY_WEBHOOK_TIMEOUT", 10, 300)?.max(1).into(),
            ),
        };
        let mail = MailSettings {
            smtp_url,
            from,
            public_url,
            max_attempts: number("TENANTRY_MAIL_MAX_ATTEMPTS", 10, 1000)?.max(1),
            backoff: Duration::from_millis(
                number("TENANTRY_MAIL_BACKOFF_MS", 5000, 3_600_000)?
                    .max(1)
                    .into(),
            ),
            retention: Duration::from_secs(
                number("TENANTRY_MAIL_RETENTION", 7 * 86_400, 365 * 86_400)?.into(),
            ),
            unverified_ttl: match number("TENANTRY_UNVERIFIED_TTL", 604_800, 10 * 365 * 86_400)? {
                0 => None,
                s => Some(Duration::from_secs(s.into())),
            },
        };
        Ok(Settings {
            tls,
            mail,
            webhooks,
            export_concurrency,
            spare_roles,
            spare_schemas,
            router_roles,
            citus_routing,
            citus_refresh_interval,
            extra_connections,
            export_timeout,
            statement_timeout,
            metrics_token,
            limits,
            client_timeout,
            audit_anchor_file,
            maintenance_interval,
            tenant_quota_bytes,
            usage_interval,
            database,
            data_dir,
            bind,
            jwt_secret,
            jwt_previous_secret,
            bcrypt_cost,
            templates_dir: match get("TENANTRY_TEMPLATES_DIR").map(PathBuf::from) {
                Some(dir) if !dir.is_dir() => {
                    return Err(SettingsError::Invalid {
                        name: "TENANTRY_TEMPLATES_DIR",
                        reason: format!(
                            "{} is not a directory (it names the directory of V<n>__<name>.sql files to propose; unset it to use the published templates)",
                            dir.display()
                        ),
                    })
                }
                dir => dir,
            },
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

impl MailSettings {
    /// The defaults: `.eml` files, links to `public_url`.
    pub fn new(public_url: impl Into<String>) -> MailSettings {
        MailSettings {
            smtp_url: None,
            from: "Tenantry <tenantry@localhost>".into(),
            public_url: public_url.into(),
            max_attempts: 10,
            backoff: Duration::from_millis(5000),
            retention: Duration::from_secs(7 * 86_400),
            unverified_ttl: Some(Duration::from_secs(604_800)),
        }
    }
}

/// `name`'s value: `value`, or the contents of the file `file` names
/// (one trailing line ending dropped); both, an unreadable file or an empty
/// one is an error naming the variable.
fn read_secret(
    name: &'static str,
    value: Option<String>,
    file: Option<String>,
) -> Result<Option<String>, SettingsError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(SettingsError::Invalid {
            name,
            reason: format!("set either {name} or {name}_FILE, not both"),
        }),
        (value, None) => Ok(value),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| SettingsError::Invalid {
                name,
                reason: format!("{name}_FILE: cannot read {path}: {e}"),
            })?;
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            if text.is_empty() {
                return Err(SettingsError::Invalid {
                    name,
                    reason: format!("{name}_FILE: {path} is empty"),
                });
            }
            Ok(Some(text.to_owned()))
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

/// A number of bytes, optionally with a unit (`10MB`, `1 GiB`).
fn not_a_size(raw: &str) -> String {
    format!(
        "{raw:?} is not a size: give bytes, e.g. 500000000, 500MB (10^6 bytes each) or 2GiB (2^30)"
    )
}

pub fn parse_bytes(raw: &str) -> Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let unit = unit.trim();
    let scale: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(not_a_size(raw)),
    };
    if digits.is_empty() {
        return Err(not_a_size(raw));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| format!("{raw:?} is not a size PostgreSQL can hold"))
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
    fn limits_have_the_documented_defaults_and_zero_turns_them_off() {
        let s = Settings::from_lookup(lookup(&[])).unwrap();
        assert_eq!(s.limits, Limits::default());
        assert_eq!(
            (
                s.limits.auth_per_minute,
                s.limits.anon_per_minute,
                s.limits.user_per_minute
            ),
            (10, 20, 100)
        );
        let s = Settings::from_lookup(lookup(&[
            ("TENANTRY_RATE_LIMIT_AUTH", "0"),
            ("TENANTRY_TRUSTED_PROXIES", "10.0.0.1, ::1"),
        ]))
        .unwrap();
        assert_eq!(s.limits.auth_per_minute, 0);
        assert_eq!(s.limits.trusted_proxies.len(), 2);
        assert!(Settings::from_lookup(lookup(&[("TENANTRY_RATE_LIMIT_USER", "-1")])).is_err());
        assert!(
            Settings::from_lookup(lookup(&[("TENANTRY_TRUSTED_PROXIES", "10.0.0.0/8x")])).is_err()
        );
    }

    #[test]
    fn secrets_come_from_files_without_their_trailing_newline_and_not_from_both() {
        let dir = std::env::temp_dir().join(format!("tenantry-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("jwt");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef-from-file\r\n").unwrap();
        let url = dir.join("url");
        std::fs::write(&url, "postgres://x:pw@localhost/db\n").unwrap();
        let (secret_path, url_path) = (
            secret.to_string_lossy().into_owned(),
            url.to_string_lossy().into_owned(),
        );
        let s = Settings::from_lookup(lookup(&[
            ("JWT_SECRET_FILE", &secret_path),
            ("DATABASE_URL_FILE", &url_path),
        ]))
        .unwrap();
        assert_eq!(
            s.jwt_secret().unwrap().expose(),
            "0123456789abcdef0123456789abcdef-from-file"
        );
        assert!(
            matches!(&s.database, DatabaseTarget::Url(u) if u.expose() == "postgres://x:pw@localhost/db")
        );
        let both = Settings::from_lookup(lookup(&[
            ("JWT_SECRET", "0123456789abcdef0123456789abcdef-inline"),
            ("JWT_SECRET_FILE", &secret_path),
        ]));
        assert!(both.unwrap_err().to_string().contains("not both"));
        let missing =
            Settings::from_lookup(lookup(&[("TENANTRY_SMTP_URL_FILE", "/nonexistent/smtp")]));
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("TENANTRY_SMTP_URL_FILE"));
        std::fs::write(&url, "\n").unwrap();
        assert!(Settings::from_lookup(lookup(&[("DATABASE_URL_FILE", &url_path)])).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_bcrypt_cost_is_refused() {
        assert!(Settings::from_lookup(lookup(&[("BCRYPT_COST", "99")])).is_err());
    }
}
