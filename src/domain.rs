//! Validated domain types. Each is a private-field newtype that can only be
//! built by `parse`, so holding one is proof that the value passed the rules
//! of DESIGN.md. Only [`SchemaName`] and [`RoleName`] ever reach SQL text, and
//! only through their `quoted()` form.

use std::fmt;
use std::sync::LazyLock;

use postgres_protocol::escape::escape_identifier;
use regex::Regex;

/// Why a field was rejected. `field` names the input field (it becomes the
/// error code `invalid_<field>` at the HTTP edge).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ValidationError {
            field,
            reason: reason.into(),
        }
    }
}

static USERNAME_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z0-9_]{2,31}$").expect("valid regex"));
static EMAIL_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
        .expect("valid regex")
});

/// Names that would be confusing or dangerous as a tenant (they collide with
/// PostgreSQL's own schemas and roles, or with ours).
const RESERVED_USERNAMES: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "postgres",
    "public",
    "system",
    "tenantry",
    "reference",
    "information_schema",
    "superuser",
    "current_user",
    "session_user",
    "current_role",
    "user",
    "none",
    "null",
    "default",
    "all",
    "api",
    "auth",
    "health",
    "metrics",
    "support",
    "security",
    "auditor",
];

/// A tenant's username: trimmed, lower-cased, `^[a-z][a-z0-9_]{2,31}$`, no
/// `__`, no trailing `_`, not reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// A name no user can have (`parse` refuses `__`): the tenant that
    /// publishing builds from nothing and rolls back. `tag`: hex digits.
    pub fn scratch(tag: &str) -> Username {
        assert!(tag.len() <= 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()));
        Username(format!("template__check_{tag}"))
    }

    pub fn parse(raw: &str) -> Result<Username, ValidationError> {
        // Refuse absurd input before doing any work on it.
        if raw.len() > 256 {
            return Err(ValidationError::new(
                "username",
                "must be 3 to 32 characters",
            ));
        }
        let name = raw.trim().to_lowercase();
        if name.len() < 3 || name.len() > 32 {
            return Err(ValidationError::new(
                "username",
                "must be 3 to 32 characters",
            ));
        }
        if !USERNAME_RE.is_match(&name) {
            return Err(ValidationError::new(
                "username",
                "must start with a letter and contain only a-z, 0-9 and _",
            ));
        }
        if name.contains("__") {
            return Err(ValidationError::new(
                "username",
                "must not contain two underscores in a row",
            ));
        }
        if name.ends_with('_') {
            return Err(ValidationError::new(
                "username",
                "must not end with an underscore",
            ));
        }
        if name.starts_with("pg_") || RESERVED_USERNAMES.contains(&name.as_str()) {
            return Err(ValidationError::new("username", "is reserved"));
        }
        Ok(Username(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant schema, `tenant_<username>`.
    pub fn schema(&self) -> SchemaName {
        SchemaName(format!("tenant_{}", self.0))
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated schema name. Built only from a [`Username`] (or read back from
/// the registry, where only such names are ever written).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Re-validate a schema name read from the registry.
    pub fn parse(raw: &str) -> Result<SchemaName, ValidationError> {
        let rest = raw
            .strip_prefix("tenant_")
            .ok_or_else(|| ValidationError::new("schema", "must start with tenant_"))?;
        Ok(Username::parse(rest)
            .map_err(|e| ValidationError::new("schema", e.reason))?
            .schema())
    }

    /// A spare tenant schema (`tenancy::spares`): `tenant__s<16 hex>`, a
    /// name no username gives (a username has no double underscore).
    pub fn spare() -> SchemaName {
        SchemaName(format!("tenant__s{:016x}", rand::random::<u64>()))
    }

    /// Re-validate a spare schema's name read from `tenantry.spare_roles`.
    pub fn parse_spare(raw: &str) -> Result<SchemaName, ValidationError> {
        match raw.strip_prefix("tenant__s") {
            Some(hex)
                if hex.len() == 16
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(SchemaName(raw.to_owned()))
            }
            _ => Err(ValidationError::new(
                "schema",
                "a spare schema is tenant__s and 16 hex digits",
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub fn quoted(&self) -> String {
        escape_identifier(&self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A database role name managed by Tenantry: `tnt_<installation>__t<16 hex>`
/// for a tenant role made ahead of its tenant (`tenancy::spares`; every
/// tenant on plain PostgreSQL since issue 28), `tnt_<installation>_<username>`
/// for a tenant on Citus and for the tenants made before,
/// `tnt_<installation>__tenants` for the group every tenant role belongs to. The installation id keeps several Tenantry databases in one
/// cluster (roles are cluster-wide) from colliding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoleName(String);

static INSTALLATION_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]{8}$").expect("valid regex"));

/// The per-database installation id (8 lower-case alphanumerics), stored in
/// `tenantry.installation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallationId(String);

impl InstallationId {
    pub fn parse(raw: &str) -> Result<InstallationId, ValidationError> {
        if INSTALLATION_RE.is_match(raw) {
            Ok(InstallationId(raw.to_owned()))
        } else {
            Err(ValidationError::new(
                "installation",
                "must be 8 lower-case letters or digits",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tenant_role(&self, username: &Username) -> RoleName {
        RoleName(format!("tnt_{}_{}", self.0, username.as_str()))
    }

    /// A new tenant role name that carries no username: `tnt_<id>__t` and
    /// 16 random hex digits (the double underscore keeps it apart from
    /// every username's role, `t` from the group).
    pub fn anonymous_tenant_role(&self) -> RoleName {
        RoleName(format!("tnt_{}__t{:016x}", self.0, rand::random::<u64>()))
    }

    /// Router `k` (`db::routers`): `tnt_<id>__r<k>`, apart from every tenant
    /// role and the group by its double underscore and `r`.
    pub fn router_role(&self, k: usize) -> RoleName {
        RoleName(format!("tnt_{}__r{k}", self.0))
    }

    /// What every router's name starts with.
    pub fn router_prefix(&self) -> String {
        format!("tnt_{}__r", self.0)
    }

    /// `tnt_<id>__tenants`: the double underscore keeps it apart from every
    /// tenant role (usernames never contain `__`), also from the role of a
    /// user named `tenants`.
    pub fn group_role(&self) -> RoleName {
        RoleName(format!("tnt_{}__tenants", self.0))
    }
}

impl RoleName {
    /// Re-validate a tenant role name read from the registry or the catalog:
    /// `tnt_<installation id>__t<16 hex>` or `tnt_<installation id>_<valid username>`.
    pub fn parse(raw: &str) -> Result<RoleName, ValidationError> {
        let invalid = || {
            ValidationError::new(
                "role",
                "must be tnt_<installation>__t<16 hex> or tnt_<installation>_<username>",
            )
        };
        let rest = raw.strip_prefix("tnt_").ok_or_else(invalid)?;
        let (id, name) = rest.split_at_checked(8).ok_or_else(invalid)?;
        let name = name.strip_prefix('_').ok_or_else(invalid)?;
        let id = InstallationId::parse(id).map_err(|_| invalid())?;
        if let Some(tag) = name.strip_prefix("_t") {
            return if tag.len() == 16 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                Ok(RoleName(raw.to_owned()))
            } else {
                Err(invalid())
            };
        }
        let username = Username::parse(name).map_err(|_| invalid())?;
        if username.as_str() != name {
            return Err(invalid());
        }
        Ok(id.tenant_role(&username))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn quoted(&self) -> String {
        escape_identifier(&self.0)
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email address: syntactically valid, lower-cased, at most 254 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Email, ValidationError> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() || email.len() > 254 {
            return Err(ValidationError::new(
                "email",
                "must be a valid address of at most 254 characters",
            ));
        }
        if !EMAIL_RE.is_match(&email) {
            return Err(ValidationError::new("email", "is not a valid address"));
        }
        Ok(Email(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Passwords shorter than 72 bytes that still make the top of every leaked
/// password list; refused whatever their length.
const COMMON_PASSWORDS: &str = include_str!("common_passwords.txt");

static COMMON: LazyLock<std::collections::HashSet<&'static str>> = LazyLock::new(|| {
    COMMON_PASSWORDS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// A password that passed the rules: at least 12 characters, at most 72 bytes
/// (bcrypt's limit: longer is refused, never truncated), not a common one.
/// `Debug` never shows it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn parse(raw: &str) -> Result<Password, ValidationError> {
        if raw.chars().count() < 12 {
            return Err(ValidationError::new(
                "password",
                "must be at least 12 characters",
            ));
        }
        if raw.len() > 72 {
            return Err(ValidationError::new(
                "password",
                "must be at most 72 bytes (bcrypt's limit)",
            ));
        }
        if raw.contains('\0') {
            return Err(ValidationError::new(
                "password",
                "must not contain NUL characters",
            ));
        }
        if COMMON.contains(raw.to_lowercase().as_str()) {
            return Err(ValidationError::new(
                "password",
                "is too common; choose another",
            ));
        }
        Ok(Password(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A tenant template version (`V<n>__name.sql`), always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TemplateVersion(i32);

impl TemplateVersion {
    pub fn parse(n: i64) -> Result<TemplateVersion, ValidationError> {
        if n >= 1 && n <= i64::from(i32::MAX) {
            Ok(TemplateVersion(n as i32))
        } else {
            Err(ValidationError::new(
                "template_version",
                "must be a positive integer",
            ))
        }
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

impl fmt::Display for TemplateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_trimmed_and_lower_cased() {
        assert_eq!(Username::parse("  Alice_1 ").unwrap().as_str(), "alice_1");
    }

    #[test]
    fn hostile_usernames_are_rejected() {
        for bad in [
            "",
            "ab",
            "a\"; drop table x; --",
            "bob'",
            "1abc",
            "_abc",
            "abc_",
            "a__b",
            "pg_catalog",
            "admin",
            "PUBLIC",
            "аdmin", // Cyrillic a
            "ａｄｍｉｎｘ",
            "robert\u{200b}",
            &"a".repeat(33),
            &"x".repeat(10_000),
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn schema_and_role_names_are_quoted() {
        let u = Username::parse("carol").unwrap();
        assert_eq!(u.schema().quoted(), "\"tenant_carol\"");
        let inst = InstallationId::parse("ab12cd34").unwrap();
        assert_eq!(inst.tenant_role(&u).as_str(), "tnt_ab12cd34_carol");
        assert_eq!(SchemaName::parse("tenant_carol").unwrap(), u.schema());
        assert!(SchemaName::parse("tenant_pg_x").is_err());
    }

    #[test]
    fn spare_schemas_are_no_username_s_schema() {
        let a = SchemaName::spare();
        assert_ne!(a, SchemaName::spare());
        assert_eq!(SchemaName::parse_spare(a.as_str()).unwrap(), a);
        assert!(SchemaName::parse(a.as_str()).is_err(), "{a}");
        for bad in [
            "tenant__s0123456789abcde",
            "tenant__s0123456789abcdef0",
            "tenant__s0123456789ABCDEF",
            "tenant_s0123456789abcdef",
            "tenant_alice",
        ] {
            assert!(SchemaName::parse_spare(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn anonymous_tenant_roles_parse_and_carry_no_username() {
        let inst = InstallationId::parse("ab12cd34").unwrap();
        let a = inst.anonymous_tenant_role();
        let b = inst.anonymous_tenant_role();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("tnt_ab12cd34__t"), "{a}");
        assert_eq!(RoleName::parse(a.as_str()).unwrap(), a);
        assert_ne!(a, inst.group_role());
        for bad in [
            "tnt_ab12cd34__t0123456789abcde",
            "tnt_ab12cd34__t0123456789abcdef0",
            "tnt_ab12cd34__t0123456789ABCDEF",
            "tnt_ab12cd34__tenants",
            "tnt_ab12cd34__x0123456789abcdef",
        ] {
            assert!(RoleName::parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(RoleName::parse("tnt_ab12cd34_carol").is_ok());
    }

    #[test]
    fn no_username_maps_to_the_group_role_or_another_installation() {
        let inst = InstallationId::parse("ab12cd34").unwrap();
        let other = InstallationId::parse("ab12cd35").unwrap();
        for name in ["tenants", "tenants_", "_tenants", "ab12cd35_bob", "bob"] {
            let Ok(u) = Username::parse(name) else {
                continue;
            };
            let role = inst.tenant_role(&u);
            assert_ne!(role, inst.group_role(), "{name}");
            assert_ne!(role, other.group_role(), "{name}");
            assert_ne!(role, other.tenant_role(&Username::parse("bob").unwrap()));
            // Every tenant role reads back as one; the group never does.
            assert_eq!(RoleName::parse(role.as_str()).unwrap(), role);
        }
        assert!(RoleName::parse(inst.group_role().as_str()).is_err());
    }

    #[test]
    fn passwords_follow_the_length_rules() {
        assert!(Password::parse("short").is_err());
        assert!(Password::parse("correct horse battery").is_ok());
        assert!(Password::parse(&"é".repeat(37)).is_err()); // 74 bytes
        assert!(Password::parse("password1234").is_err());
        assert!(
            !format!("{:?}", Password::parse("correct horse battery").unwrap()).contains("horse")
        );
    }

    #[test]
    fn emails_are_lower_cased_and_checked() {
        assert_eq!(
            Email::parse(" Bob@Example.COM ").unwrap().as_str(),
            "bob@example.com"
        );
        assert!(Email::parse("not-an-email").is_err());
        assert!(Email::parse("a@b").is_err());
    }
}
