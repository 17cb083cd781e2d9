//! Suspension: restriction of processing (GDPR art. 18), and the lever for
//! abuse and disputes.
//!
//! A suspended account keeps everything: its schema and rows, its registry
//! row (whose `status` the fleet plans from, so migrations still reach it),
//! its sessions. Only `tenantry.users.suspended_at` is set, and that makes
//! login, refresh and every request with a token answer 403
//! `account_suspended` (the routing guard's entry statement for tenant
//! routes, `CurrentUser` for the rest). Admins can still export and erase
//! it. Resuming clears it, and the same tokens work again.
//!
//! Each change is one transaction: the account row, the user's mail into
//! the outbox, and the audit entry last. Only tenants are suspended (the
//! name is looked up in the tenant registry): staff accounts are managed by
//! whoever runs the installation, not restricted from the admin routes.

use chrono::{DateTime, Utc};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::audit::{self, Action, Entry, Pseudonyms};
use crate::domain::Username;
use crate::mail::Letters;

/// Why an account is suspended, as the admin wrote it: at most
/// [`Reason::MAX_CHARS`] characters, no control characters but line breaks
/// and tabs. It is shown in the tenant's details and sent to the user; the
/// audit log only records that one was given (it may name people).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub const MAX_CHARS: usize = 500;

    /// `None` for a reason that is empty or only blanks.
    pub fn parse(raw: &str) -> Result<Option<Reason>, SuspensionError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        if trimmed.chars().count() > Reason::MAX_CHARS {
            return Err(SuspensionError::InvalidReason(format!(
                "the reason is longer than {} characters",
                Reason::MAX_CHARS
            )));
        }
        if trimmed
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(SuspensionError::InvalidReason(
                "the reason contains control characters".into(),
            ));
        }
        Ok(Some(Reason(trimmed.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuspensionError {
    #[error("no tenant named {0}")]
    NoSuchTenant(String),
    #[error("{0} is already suspended")]
    AlreadySuspended(String),
    #[error("{0} is not suspended")]
    NotSuspended(String),
    #[error("{0}")]
    InvalidReason(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Who changes it, for the audit entry.
#[derive(Debug, Clone)]
pub struct ChangedBy {
    /// An admin's pseudonym, or `cli`.
    pub actor: String,
    /// The client's address, pseudonymised (none from the CLI).
    pub client: Option<String>,
}

/// What a suspension or resumption did.
#[derive(Debug, Clone)]
pub struct Changed {
    pub user_id: Uuid,
    /// When the suspension began (`None` after a resumption).
    pub suspended_at: Option<DateTime<Utc>>,
}

/// Suspend `username`'s account. The caller wakes the mail sender after
/// this returns (the mail is committed with the change).
pub async fn suspend(
    client: &mut Client,
    username: &Username,
    reason: Option<&Reason>,
    by: &ChangedBy,
    pseudonyms: &Pseudonyms,
    letters: &Letters,
) -> Result<Changed, SuspensionError> {
    let change = Change::Suspend(reason);
    apply(client, username, change, by, pseudonyms, letters).await
}

/// Lift `username`'s suspension.
pub async fn resume(
    client: &mut Client,
    username: &Username,
    by: &ChangedBy,
    pseudonyms: &Pseudonyms,
    letters: &Letters,
) -> Result<Changed, SuspensionError> {
    apply(client, username, Change::Resume, by, pseudonyms, letters).await
}

enum Change<'a> {
    Suspend(Option<&'a Reason>),
    Resume,
}

async fn apply(
    client: &mut Client,
    username: &Username,
    change: Change<'_>,
    by: &ChangedBy,
    pseudonyms: &Pseudonyms,
    letters: &Letters,
) -> Result<Changed, SuspensionError> {
    let tx = client.transaction().await?;
    // The account row locked: two admins at once make one change and one
    // 409, never two mails.
    let account = tx
        .query_opt(
            "SELECT u.id, u.username, u.email, u.suspended_at IS NOT NULL AS suspended
             FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
             WHERE t.username = $1
             FOR UPDATE OF u",
            &[&username.as_str()],
        )
        .await?
        .ok_or_else(|| SuspensionError::NoSuchTenant(username.to_string()))?;
    let user_id: Uuid = account.get("id");
    let name: &str = account.get("username");
    let email: &str = account.get("email");
    let suspended: bool = account.get("suspended");
    let (mail, entry, suspended_at) = match change {
        Change::Suspend(reason) => {
            if suspended {
                return Err(SuspensionError::AlreadySuspended(username.to_string()));
            }
            let reason = reason.map(Reason::as_str);
            let at: DateTime<Utc> = tx
                .query_one(
                    "UPDATE tenantry.users SET suspended_at = now(), suspension_reason = $2
                     WHERE id = $1 RETURNING suspended_at",
                    &[&user_id, &reason],
                )
                .await?
                .get(0);
            (
                letters.suspended(user_id, name, email, reason),
                Entry::new(Action::TenantSuspended).detail("reason_given", reason.is_some()),
                Some(at),
            )
        }
        Change::Resume => {
            if !suspended {
                return Err(SuspensionError::NotSuspended(username.to_string()));
            }
            tx.execute(
                "UPDATE tenantry.users SET suspended_at = NULL, suspension_reason = NULL
                 WHERE id = $1",
                &[&user_id],
            )
            .await?;
            (
                letters.resumed(user_id, name, email),
                Entry::new(Action::TenantResumed),
                None,
            )
        }
    };
    crate::mail::enqueue(&tx, &mail).await?;
    crate::webhooks::record(
        &tx,
        &crate::webhooks::Event::tenant(
            if suspended_at.is_some() {
                crate::webhooks::EventType::TenantSuspended
            } else {
                crate::webhooks::EventType::TenantResumed
            },
            user_id,
            username.as_str(),
            serde_json::json!({}),
        ),
    )
    .await?;
    let entry = entry
        .actor(by.actor.clone())
        .subject(pseudonyms.user(user_id))
        .client(by.client.clone());
    audit::append(&tx, &entry).await?;
    tx.commit().await?;
    tracing::info!(
        tenant = %username,
        suspended = suspended_at.is_some(),
        "account suspension changed"
    );
    Ok(Changed {
        user_id,
        suspended_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_reason_is_no_reason_and_a_long_one_is_refused() {
        assert_eq!(Reason::parse("  \n").unwrap(), None);
        assert_eq!(
            Reason::parse(" abuse reports\n(3) ")
                .unwrap()
                .unwrap()
                .as_str(),
            "abuse reports\n(3)"
        );
        assert!(Reason::parse(&"é".repeat(Reason::MAX_CHARS)).is_ok());
        assert!(matches!(
            Reason::parse(&"é".repeat(Reason::MAX_CHARS + 1)),
            Err(SuspensionError::InvalidReason(_))
        ));
        assert!(matches!(
            Reason::parse("nul\0byte"),
            Err(SuspensionError::InvalidReason(_))
        ));
    }
}
