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
    /// `user`, `admin` or `auditor`.
    pub role: String,
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
    encoding: Arc<EncodingKey>,
    decoding: Arc<DecodingKey>,
    validation: Arc<Validation>,
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
            encoding: Arc::new(EncodingKey::from_secret(secret)),
            decoding: Arc::new(DecodingKey::from_secret(secret)),
            validation: Arc::new(validation),
        }
    }

    pub fn issue(
        &self,
        user_id: Uuid,
        username: &str,
        schema: Option<&str>,
        db_role: Option<&str>,
        role: &str,
    ) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id,
            username: username.to_owned(),
            schema: schema.map(str::to_owned),
            db_role: db_role.map(str::to_owned),
            role: role.to_owned(),
            typ: ACCESS_TYPE.into(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + ACCESS_TOKEN_SECONDS,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(AuthError::Sign)
    }

    /// The claims of a valid, unexpired token of ours; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|d| d.claims)
            .filter(|claims| claims.typ == ACCESS_TYPE)
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
            .issue(
                id,
                "alice",
                Some("tenant_alice"),
                Some("tnt_x_alice"),
                "user",
            )
            .unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, id);
        assert_eq!(claims.exp - claims.iat, 900);
        let other = JwtKeys::new(b"another-secret-another-secret-xx");
        assert!(other.verify(&token).is_none());
        assert!(keys.verify("not.a.token").is_none());
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
