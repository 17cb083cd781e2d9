//! Passwords (bcrypt, always off the async runtime), access tokens (HS256
//! JWT, 15 minutes, issuer/audience checked, algorithm pinned) and refresh
//! tokens (opaque, stored only as a SHA-256 hash).

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::audit::Pseudonyms;
use crate::domain::Password;

pub const ISSUER: &str = "tenantry";
pub const AUDIENCE: &str = "tenantry-api";
pub const ACCESS_TOKEN_SECONDS: i64 = 15 * 60;
/// The `typ` claim of an access token.
pub const ACCESS_TYPE: &str = "access";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed: {0}")]
    Hash(#[from] bcrypt::BcryptError),
    #[error("password hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("cannot sign token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Hash a password at `cost` on a blocking thread, keeping the caller's span.
pub async fn hash_password(password: &Password, cost: u32) -> Result<String, AuthError> {
    let password = password.clone();
    let span = tracing::Span::current();
    Ok(tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        bcrypt::hash(password.expose(), cost)
    })
    .await??)
}

/// Verify a password against a stored hash on a blocking thread. A
/// malformed stored hash verifies as false.
pub async fn verify_password(candidate: String, hash: String) -> Result<bool, AuthError> {
    let span = tracing::Span::current();
    Ok(tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        bcrypt::verify(candidate, &hash).unwrap_or(false)
    })
    .await?)
}

/// What an account may do. Stored as text in `tenantry.users.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A tenant: their own data, through `/api`.
    User,
    /// Staff: every `/admin` route.
    Admin,
    /// Staff: the audit log only.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    /// The registry's text; anything else is no role at all.
    pub fn parse(raw: &str) -> Option<Role> {
        match raw {
            "user" => Some(Role::User),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a token is issued to.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    pub user_id: Uuid,
    pub username: &'a str,
    pub schema: Option<&'a str>,
    pub db_role: Option<&'a str>,
    pub role: Role,
    pub generation: i32,
    pub session: Option<Uuid>,
}

/// Password hashing for the service: bcrypt at the configured cost, with
/// at most one hash or verification per core at a time (a flood of logins
/// queues here instead of starving every other request of CPU).
#[derive(Clone)]
pub struct Hasher {
    cost: u32,
    cores: usize,
    permits: Arc<tokio::sync::Semaphore>,
    /// A real hash at the configured cost, verified against for unknown
    /// users so that they take as long as known ones.
    dummy: Arc<str>,
}

impl Hasher {
    pub async fn new(cost: u32) -> Result<Hasher, AuthError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let permits = Arc::new(tokio::sync::Semaphore::new(cores));
        let dummy = hash_password(
            &Password::parse("tenantry-dummy-password").expect("a valid password"),
            cost,
        )
        .await?;
        Ok(Hasher {
            cost,
            cores,
            permits,
            dummy: dummy.into(),
        })
    }

    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// Take every permit (what a flood of logins does): hashing waits
    /// until the returned permit is dropped. For tests of the bound.
    pub async fn hold_all_permits(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits
            .acquire_many(self.cores as u32)
            .await
            .expect("never closed")
    }

    pub async fn hash(&self, password: &Password) -> Result<String, AuthError> {
        let _permit = self.permits.acquire().await.expect("never closed");
        hash_password(password, self.cost).await
    }

    /// Verify against `hash`, or against the dummy hash when there is none
    /// (then the answer is always false, after the same work).
    pub async fn verify(&self, candidate: String, hash: Option<String>) -> Result<bool, AuthError> {
        let _permit = self.permits.acquire().await.expect("never closed");
        let known = hash.is_some();
        let verified =
            verify_password(candidate, hash.unwrap_or_else(|| self.dummy.to_string())).await?;
        Ok(verified && known)
    }

    /// A stored hash made at another cost (or not parseable as bcrypt) is
    /// replaced at the next successful login.
    pub fn needs_rehash(&self, hash: &str) -> bool {
        bcrypt_cost(hash) != Some(self.cost)
    }
}

/// The cost of a bcrypt hash (`$2b$12$…` → 12).
pub fn bcrypt_cost(hash: &str) -> Option<u32> {
    let mut parts = hash.split('$');
    let (Some(""), Some(_variant), Some(cost)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    cost.parse().ok()
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// User id.
    pub sub: Uuid,
    pub username: String,
    /// The tenant schema (absent for accounts without a tenant).
    pub schema: Option<String>,
    /// The tenant's database role.
    pub db_role: Option<String>,
    pub role: Role,
    /// The account's token generation when this was issued; a token of an
    /// older generation is refused (see `tenantry.users.token_generation`).
    #[serde(rename = "gen")]
    pub generation: i32,
    /// The session (refresh-token family) it was issued in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
    /// Always `access`: no other token of ours (nor one without it) can
    /// stand in for an access token.
    pub typ: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

/// Signing and verification keys for access tokens.
#[derive(Clone)]
pub struct JwtKeys {
    /// The current key: signs every new token.
    current: Arc<SigningKey>,
    /// `JWT_PREVIOUS_SECRET`'s: its tokens stay valid until they expire.
    previous: Option<Arc<SigningKey>>,
    validation: Arc<Validation>,
}

/// One HS256 key and its id (`kid`): the first 16 hex digits of a SHA-256
/// of the secret, so that a token names its key without revealing it.
struct SigningKey {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl SigningKey {
    fn new(secret: &[u8]) -> SigningKey {
        let digest = Sha256::new()
            .chain_update(b"tenantry jwt kid\0")
            .chain_update(secret)
            .finalize();
        SigningKey {
            id: hex::encode(&digest[..8]),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(<redacted>)")
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> JwtKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        JwtKeys {
            current: Arc::new(SigningKey::new(secret)),
            previous: None,
            validation: Arc::new(validation),
        }
    }

    /// The same, also accepting tokens signed with `previous` (the secret
    /// before a rotation, `JWT_PREVIOUS_SECRET`) until they expire.
    pub fn with_previous(mut self, previous: &[u8]) -> JwtKeys {
        self.previous = Some(Arc::new(SigningKey::new(previous)));
        self
    }

    /// The `kid` new tokens carry.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    pub fn issue(&self, subject: &Subject<'_>) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: subject.user_id,
            username: subject.username.to_owned(),
            schema: subject.schema.map(str::to_owned),
            db_role: subject.db_role.map(str::to_owned),
            role: subject.role,
            generation: subject.generation,
            sid: subject.session,
            typ: ACCESS_TYPE.into(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + ACCESS_TOKEN_SECONDS,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.current.id.clone());
        jsonwebtoken::encode(&header, &claims, &self.current.encoding).map_err(AuthError::Sign)
    }

    /// The claims of a valid, unexpired token of ours; `None` for anything
    /// else. The token's `kid` picks the key: the current one or the
    /// previous one; any other `kid` is refused. A token without a `kid`
    /// (issued before keys had ids) is checked against the current key.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let decode = |key: &SigningKey| {
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
                .ok()
                .map(|d| d.claims)
                .filter(|claims| claims.typ == ACCESS_TYPE)
        };
        match header.kid.as_deref() {
            // Issued before tokens named their key: either key may have
            // signed it (an upgrade and a rotation within its lifetime).
            None => decode(&self.current).or_else(|| self.previous.as_deref().and_then(decode)),
            Some(kid) if kid == self.current.id => decode(&self.current),
            Some(kid) => decode(self.previous.as_deref().filter(|p| p.id == kid)?),
        }
    }
}

/// How long a refresh token lives: 7 days (`INSERT_REFRESH_TOKEN`).
pub const REFRESH_TOKEN_SECONDS: i64 = 7 * 24 * 3600;

/// The one insert of a refresh token, with its lifetime: `$1` family id,
/// `$2` user id, `$3` the token's hash, `$4` the user agent (text, may be
/// NULL; see [`user_agent`]). Signup, login and rotation use it.
pub const INSERT_REFRESH_TOKEN: &str = "\
INSERT INTO tenantry.refresh_tokens (family_id, user_id, token_hash, expires_at, user_agent)
VALUES ($1, $2, $3, now() + interval '7 days', $4)";

/// Whether a session (one refresh-token family, grouped by `family_id`)
/// is live: none of its tokens revoked, its latest unused and unexpired.
/// The `HAVING` of the queries that list or count sessions.
pub const LIVE_SESSION: &str =
    "bool_and(revoked_at IS NULL) AND bool_or(used_at IS NULL AND expires_at > now())";

/// End every session of user `$1` (revoke-all, a password reset, an
/// erasure): all their refresh tokens revoked; how many.
pub const REVOKE_ALL_SESSIONS: &str = "\
UPDATE tenantry.refresh_tokens SET revoked_at = now()
 WHERE user_id = $1 AND revoked_at IS NULL";

/// The key `tenantry.login_throttle` counts failed sign-ins under: the
/// name as presented (trimmed, lower-cased, at most 64 characters, so an
/// unknown name is counted exactly like an existing one), as a keyed hash.
/// Whatever someone types at a login (a name, an email) is never stored,
/// and erasing an account can still find its rows (by name and by email).
pub fn throttle_key(pseudonyms: &Pseudonyms, presented: &str) -> String {
    let normalised: String = presented.trim().to_lowercase().chars().take(64).collect();
    pseudonyms.name(&normalised)
}

/// A request's `User-Agent`, as stored with its session: at most 512
/// characters, control characters dropped.
pub fn user_agent(raw: Option<&str>) -> Option<String> {
    let cleaned: String = raw?.chars().filter(|c| !c.is_control()).take(512).collect();
    (!cleaned.is_empty()).then_some(cleaned)
}

/// A new opaque refresh token and the hash that is stored for it.
pub fn new_refresh_token() -> (String, Vec<u8>) {
    let bytes: [u8; 32] = rand::rng().random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = refresh_token_hash(&token);
    (token, hash)
}

pub fn refresh_token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_its_key_only() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef");
        let id = Uuid::new_v4();
        let token = keys
            .issue(&Subject {
                user_id: id,
                username: "alice",
                schema: Some("tenant_alice"),
                db_role: Some("tnt_x_alice"),
                role: Role::User,
                generation: 3,
                session: None,
            })
            .unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, id);
        assert_eq!((claims.role, claims.generation), (Role::User, 3));
        assert_eq!(claims.exp - claims.iat, 900);
        let other = JwtKeys::new(b"another-secret-another-secret-xx");
        assert!(other.verify(&token).is_none());
        assert!(keys.verify("not.a.token").is_none());
    }

    #[test]
    fn after_a_rotation_old_tokens_verify_until_they_expire_and_unknown_kids_do_not() {
        let subject = Subject {
            user_id: Uuid::new_v4(),
            username: "alice",
            schema: None,
            db_role: None,
            role: Role::User,
            generation: 0,
            session: None,
        };
        let old = JwtKeys::new(b"the old secret, long enough to sign");
        let before = old.issue(&subject).unwrap();
        let rotated = JwtKeys::new(b"the new secret, long enough to sign")
            .with_previous(b"the old secret, long enough to sign");
        assert_ne!(rotated.key_id(), old.key_id());
        let after = rotated.issue(&subject).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
            Some(rotated.key_id())
        );
        assert!(
            rotated.verify(&before).is_some(),
            "an old token still works"
        );
        assert!(rotated.verify(&after).is_some());
        // The old process does not know the new key.
        assert!(old.verify(&after).is_none());
        // A kid that is neither: refused, even when the signature is the
        // current key's.
        let claims = jsonwebtoken::decode::<Claims>(
            &after,
            &DecodingKey::from_secret(b"the new secret, long enough to sign"),
            &rotated.validation,
        )
        .unwrap()
        .claims;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("0000000000000000".into());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(b"the new secret, long enough to sign"),
        )
        .unwrap();
        assert!(rotated.verify(&forged).is_none());
        // A token from before tokens named their key, signed with the old
        // secret: still good while that secret is the previous one.
        let kidless = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"the old secret, long enough to sign"),
        )
        .unwrap();
        assert!(rotated.verify(&kidless).is_some());
        assert!(JwtKeys::new(b"the new secret, long enough to sign")
            .verify(&kidless)
            .is_none());
        // Once the previous secret is dropped, its tokens end.
        let later = JwtKeys::new(b"the new secret, long enough to sign");
        assert!(later.verify(&before).is_none());
        assert!(later.verify(&after).is_some());
    }

    #[test]
    fn the_cost_of_a_hash_is_read_from_it() {
        let hash = bcrypt::hash("x", 5).unwrap();
        assert_eq!(bcrypt_cost(&hash), Some(5));
        assert_eq!(bcrypt_cost("plain"), None);
    }

    #[test]
    fn throttle_keys_are_keyed_hashes_of_the_name_as_presented() {
        let a = Pseudonyms::from_secret(b"one secret, long enough to be a key");
        let b = Pseudonyms::from_secret(b"another secret, long enough as well");
        let key = throttle_key(&a, " Alice@Example.com ");
        assert_eq!(key, throttle_key(&a, "alice@example.com"));
        assert_ne!(key, throttle_key(&b, "alice@example.com"));
        assert!(key.starts_with("n_") && !key.contains("alice"));
        assert_eq!(
            throttle_key(&a, &"x".repeat(100)),
            throttle_key(&a, &"x".repeat(64))
        );
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let (a, ha) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(ha, refresh_token_hash(&a));
        assert_eq!(ha.len(), 32);
    }
}
