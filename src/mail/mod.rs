//! Mail: what the service tells a user by email, and the outbox it goes
//! through.
//!
//! A change that causes a mail (signup, forgot-password, an email change, a
//! reset, a suspension) writes the mail into `tenantry.outbox` in its own
//! transaction ([`enqueue`], or [`ENQUEUE`] in a pipeline): the mail exists
//! exactly when the change committed. `serve` delivers it ([`delivery`]) over
//! SMTP, or as an `.eml` file under `<data dir>/mail/` when no SMTP server is
//! configured. [`Letters`] writes the mails; every mail that carries a token
//! carries it in a link, as a `token=` query parameter, in its plain text.

pub mod delivery;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// What kind of mail a row is (`tenantry.outbox.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    VerifyEmail,
    PasswordReset,
    PasswordResetDone,
    EmailChangeRequested,
    Suspended,
    Resumed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        self.text()
    }

    /// A reference that lives as long as the program, for bind parameters.
    fn text(self) -> &'static &'static str {
        match self {
            Kind::VerifyEmail => &"verify_email",
            Kind::PasswordReset => &"password_reset",
            Kind::PasswordResetDone => &"password_reset_done",
            Kind::EmailChangeRequested => &"email_change_requested",
            Kind::Suspended => &"tenant.suspended",
            Kind::Resumed => &"tenant.resumed",
        }
    }
}

/// One mail, ready for the outbox. Its `Debug` leaves the body out (it may
/// carry a token).
#[derive(Clone, PartialEq, Eq)]
pub struct Mail {
    pub kind: Kind,
    /// The user it concerns (its undelivered mail goes with an erasure).
    pub user_id: Uuid,
    pub to: String,
    pub subject: String,
    /// Plain text.
    pub body: String,
}

impl std::fmt::Debug for Mail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mail")
            .field("kind", &self.kind)
            .field("user_id", &self.user_id)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Put a mail into the outbox: `$1` kind, `$2` user id, `$3` recipient,
/// `$4` subject, `$5` body. Run it in the transaction of the change.
pub const ENQUEUE: &str = "INSERT INTO tenantry.outbox (kind, user_id, recipient, subject, body)
VALUES ($1, $2, $3, $4, $5)";

impl Mail {
    /// The parameters of [`ENQUEUE`], typed (for a pipeline's
    /// `execute_typed`).
    pub fn params(&self) -> [(&(dyn ToSql + Sync), Type); 5] {
        [
            (self.kind.text(), Type::TEXT),
            (&self.user_id, Type::UUID),
            (&self.to, Type::TEXT),
            (&self.subject, Type::TEXT),
            (&self.body, Type::TEXT),
        ]
    }
}

/// Write `mail` into the outbox in the caller's transaction.
pub async fn enqueue(
    client: &impl GenericClient,
    mail: &Mail,
) -> Result<(), tokio_postgres::Error> {
    let params = mail.params();
    client.execute_typed(ENQUEUE, &params).await.map(drop)
}

/// How long the tokens mailed to a user live.
pub const VERIFICATION_TOKEN_HOURS: i64 = 24;
pub const RESET_TOKEN_MINUTES: i64 = 30;

/// Writes the mails: the product's name, the public address links start
/// with, and a way to wake the sender when a transaction has committed one.
#[derive(Clone, Debug)]
pub struct Letters {
    /// `TENANTRY_PUBLIC_URL`, without a trailing slash.
    public_url: String,
    wake: Arc<Notify>,
    /// Where mail is written as files (no SMTP server), if it is.
    files: Option<std::path::PathBuf>,
}

impl Letters {
    pub fn new(public_url: &str) -> Letters {
        Letters {
            public_url: public_url.trim_end_matches('/').to_owned(),
            wake: Arc::new(Notify::new()),
            files: None,
        }
    }

    /// Mail is written as files under `dir` (no SMTP server).
    pub fn with_files(mut self, dir: Option<std::path::PathBuf>) -> Letters {
        self.files = dir;
        self
    }

    /// Remove the files of the outbox rows `ids` (an erased user's mail),
    /// when mail is written as files; how many.
    pub fn forget_files(&self, ids: &[i64]) -> usize {
        match &self.files {
            Some(dir) => delivery::forget_files(dir, ids),
            None => 0,
        }
    }

    /// Tell this process's sender that mail is waiting (after the commit).
    /// Other processes find it on their next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn woken(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn link(&self, path: &str, token: &str) -> String {
        format!("{}{path}?token={token}", self.public_url)
    }

    /// Signup: the account's address.
    pub fn verify_email(&self, user_id: Uuid, username: &str, to: &str, token: &str) -> Mail {
        self.verification(
            user_id,
            username,
            to,
            token,
            "If you did not sign up, ignore this mail.",
        )
    }

    /// An email change: the new address.
    pub fn verify_new_email(&self, user_id: Uuid, username: &str, to: &str, token: &str) -> Mail {
        self.verification(
            user_id,
            username,
            to,
            token,
            "Until then the account keeps its old address. If you did not ask for this change, ignore this mail.",
        )
    }

    fn verification(
        &self,
        user_id: Uuid,
        username: &str,
        to: &str,
        token: &str,
        otherwise: &str,
    ) -> Mail {
        let link = self.link("/verify-email", token);
        Mail {
            kind: Kind::VerifyEmail,
            user_id,
            to: to.to_owned(),
            subject: "Confirm your email address".into(),
            body: format!(
                "Hello {username},\n\n\
                 please confirm that {to} is your email address by opening this link\n\
                 (or by sending its token to POST /api/auth/verify-email):\n\n\
                 {link}\n\n\
                 The link works once, for {VERIFICATION_TOKEN_HOURS} hours. {otherwise}\n"
            ),
        }
    }

    /// Forgot-password, for an address that has an account.
    pub fn password_reset(&self, user_id: Uuid, username: &str, to: &str, token: &str) -> Mail {
        let link = self.link("/reset-password", token);
        Mail {
            kind: Kind::PasswordReset,
            user_id,
            to: to.to_owned(),
            subject: "Reset your password".into(),
            body: format!(
                "Hello {username},\n\n\
                 someone (hopefully you) asked to reset the password of your account.\n\
                 To choose a new one, open this link (or send its token and your new password\n\
                 to POST /api/auth/reset-password):\n\n\
                 {link}\n\n\
                 The link works once, for {RESET_TOKEN_MINUTES} minutes. If you did not ask, ignore this mail:\n\
                 your password stays as it is.\n"
            ),
        }
    }

    /// After a reset: every session was ended.
    pub fn password_reset_done(&self, user_id: Uuid, username: &str, to: &str) -> Mail {
        Mail {
            kind: Kind::PasswordResetDone,
            user_id,
            to: to.to_owned(),
            subject: "Your password was reset".into(),
            body: format!(
                "Hello {username},\n\n\
                 the password of your account was just reset, and every session was signed out.\n\
                 If this was not you, reset it again at once and tell us.\n"
            ),
        }
    }

    /// An email change, to the old address.
    pub fn email_change_requested(
        &self,
        user_id: Uuid,
        username: &str,
        old: &str,
        new: &str,
    ) -> Mail {
        Mail {
            kind: Kind::EmailChangeRequested,
            user_id,
            to: old.to_owned(),
            subject: "Your email address is being changed".into(),
            body: format!(
                "Hello {username},\n\n\
                 someone signed in to your account asked to change its email address to {new}.\n\
                 The change happens when the link sent to that address is used; until then\n\
                 this address stays the account's. If this was not you, change your password.\n"
            ),
        }
    }

    /// A suspension, with the reason the admin gave (if any).
    pub fn suspended(&self, user_id: Uuid, username: &str, to: &str, reason: Option<&str>) -> Mail {
        let reason = reason
            .map(|r| format!("The reason given: {r}\n\n"))
            .unwrap_or_default();
        Mail {
            kind: Kind::Suspended,
            user_id,
            to: to.to_owned(),
            subject: "Your account is suspended".into(),
            body: format!(
                "Hello {username},\n\n\
                 your account has been suspended: you cannot sign in or use it until it is resumed.\n\
                 Your data is kept as it is.\n\n\
                 {reason}Reply to this mail if you believe this is a mistake.\n"
            ),
        }
    }

    /// A suspension lifted.
    pub fn resumed(&self, user_id: Uuid, username: &str, to: &str) -> Mail {
        Mail {
            kind: Kind::Resumed,
            user_id,
            to: to.to_owned(),
            subject: "Your account is active again".into(),
            body: format!(
                "Hello {username},\n\n\
                 the suspension of your account was lifted: you can sign in and use it again.\n"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_mails_carry_the_token_in_a_link() {
        let letters = Letters::new("https://app.example.com/");
        let id = Uuid::new_v4();
        let m = letters.verify_email(id, "alice", "alice@example.com", "abc_DEF-1");
        assert!(m
            .body
            .contains("https://app.example.com/verify-email?token=abc_DEF-1\n"));
        let m = letters.password_reset(id, "alice", "alice@example.com", "xyz");
        assert!(m
            .body
            .contains("https://app.example.com/reset-password?token=xyz\n"));
    }
}
