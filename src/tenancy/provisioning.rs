//! Provisioning: a user, their database role and their schema at the latest
//! template version, all in ONE transaction. A failure (or a kill) at any
//! instant rolls everything back: the tenant is complete, or absent.
//!
//! On plain PostgreSQL the role is a spare made ahead ([`spares`]), taken
//! in the same transaction (a rollback leaves it a spare), so a signup
//! changes no role and resets no session's membership cache; with none
//! left, the transaction makes one.
//!
//! On Citus the role and the empty schema go first, in a transaction of
//! their own ([`Reservation`]): Citus propagates the objects a new schema's
//! tables depend on (their sequences) through connections of its own as
//! the extension's owner, which cannot see a schema this transaction has
//! not committed (a non-superuser service fails with `schema … does not
//! exist`). The head start is written down in `tenantry.pending_tenants`
//! under a session-level advisory lock on the name, and the transaction
//! that completes the tenant deletes that row. A failure drops the role and
//! schema again at once; a kill leaves the row, whose lock dies with its
//! session, and the next signup of the name, `serve`'s maintenance or
//! `fleet check --repair` sweeps it. Either way no registry row, shard or
//! half-made tenant is ever visible.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::audit::{self, Action, Entry, Pseudonyms};
use crate::auth::Role;
use crate::db::{self, Installation};
use crate::domain::{Email, RoleName, SchemaName, TemplateVersion, Username};
use crate::tenancy::apply::{ApplyStep, Request, TemplateApplication};
use crate::tenancy::publication::{self, Templates};
use crate::tenancy::spares;

pub use crate::tenancy::apply::HISTORY_TABLE;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("username {0} is already taken")]
    UsernameTaken(String),
    #[error("email is already registered")]
    EmailTaken,
    #[error("tenant template {file} failed: {source}")]
    Template {
        /// As the admin named it (`V5__x.sql`, or `B5__x.sql` for a
        /// baseline).
        file: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The published templates could not be read (or kept changing).
    #[error("{0}")]
    Published(String),
    #[error("provisioning failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl ProvisionError {
    /// A newer template version was published since the set was read.
    pub fn newer_published(&self) -> bool {
        matches!(self, ProvisionError::Postgres(e)
            if e.code().map(|c| c.code()) == Some(publication::NEWER_PUBLISHED))
    }

    /// A template step was refused a privilege (SQLSTATE 42501): first of
    /// all `SET ROLE` to the tenant's role, which rides with the first
    /// template. (Not the message text: it is in the server's language.)
    pub fn role_refused(&self) -> bool {
        matches!(self, ProvisionError::Template { source, .. }
            if source.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE))
    }

    /// The conflict for a name or email found taken.
    pub fn from_taken(same_name: bool, username: &Username) -> ProvisionError {
        if same_name {
            ProvisionError::UsernameTaken(username.to_string())
        } else {
            ProvisionError::EmailTaken
        }
    }
}

/// Refuse a name or email that is plainly taken before any work (bcrypt,
/// DDL) is done, so a duplicate signup costs one indexed read and leaves no
/// aborted transaction behind. The provisioning transaction is what
/// guarantees uniqueness; this is only a shortcut.
pub async fn check_available(
    client: &deadpool_postgres::Client,
    username: &Username,
    email: &Email,
) -> Result<(), ProvisionError> {
    let stmt = client
        .prepare_cached(
            "SELECT username = $1 FROM tenantry.users WHERE username = $1 OR email = $2 LIMIT 1",
        )
        .await?;
    match client
        .query_opt(&stmt, &[&username.as_str(), &email.as_str()])
        .await?
    {
        Some(row) => Err(ProvisionError::from_taken(row.get(0), username)),
        None => Ok(()),
    }
}

/// An account to create, with its password already hashed.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub username: Username,
    pub email: Email,
    pub password_hash: String,
    pub role: Role,
    /// A refresh token hash to store with the account, in the same
    /// transaction (so a signup's tokens exist exactly when the user does).
    pub refresh_token: Option<RefreshTokenRow>,
    /// A signup's `Idempotency-Key`, stored with the account in the same
    /// transaction.
    pub idempotency_key: Option<String>,
    /// Append a `register` entry to the audit log, in the same transaction.
    pub audit: Option<AuditContext>,
    /// A signup: the address is unverified, and a verification token and
    /// its mail are written in the same transaction. `None` (accounts an
    /// operator makes, imports): the address counts as verified.
    pub verification: Option<Verification>,
}

/// The verification of a signup's address (its `Debug` leaves the token
/// out).
#[derive(Clone)]
pub struct Verification {
    /// Writes the mail (the token goes into its link).
    pub letters: crate::mail::Letters,
    pub token: String,
    /// The token's hash, stored in `tenantry.account_tokens`.
    pub hash: Vec<u8>,
}

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verification { .. }")
    }
}

impl Verification {
    pub fn new(letters: &crate::mail::Letters) -> Verification {
        let (token, hash) = crate::auth::new_refresh_token();
        Verification {
            letters: letters.clone(),
            token,
            hash,
        }
    }
}

/// A verification token for `$2`'s address `$3`: `$1` its hash.
pub const INSERT_VERIFICATION_TOKEN: &str = "\
INSERT INTO tenantry.account_tokens (token_hash, user_id, purpose, email, expires_at)
VALUES ($1, $2, 'verify_email', $3, now() + interval '24 hours')";

/// Who signs a user up, for the audit entry.
#[derive(Debug, Clone)]
pub struct AuditContext {
    pub pseudonyms: Pseudonyms,
    /// `None`: the new user signed up themselves.
    pub actor: Option<String>,
    /// The client's pseudonymised address.
    pub client: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RefreshTokenRow {
    pub family_id: Uuid,
    pub hash: Vec<u8>,
    /// Of the signup request (`auth::user_agent`).
    pub user_agent: Option<String>,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub user_id: Uuid,
    pub username: Username,
    pub schema: SchemaName,
    pub role: RoleName,
    pub template_version: TemplateVersion,
    /// How many spares were left besides the one taken, 0 when there was
    /// none to take (`spares::Keeper::claimed`); `None`: none was looked
    /// for (Citus, or the retry after a refused spare).
    pub spares_left: Option<i64>,
    /// The spare taken had its schema built (`spares::build_one`).
    pub built_schema: bool,
}

/// A provisioning transaction's first statement: `$1` is still the newest
/// published template version (SQLSTATE TY003 otherwise).
const PROVISIONING_AT: &str = "SELECT tenantry.provisioning_at($1)";

const INSERT_ACCOUNT: &str = "\
WITH u AS (
    INSERT INTO tenantry.users (id, username, email, password_hash, role, email_verified_at)
    VALUES ($1, $2, $3, $4, $5, CASE WHEN $9 THEN now() END)
    RETURNING id
)
INSERT INTO tenantry.tenants (user_id, username, schema_name, role_name, template_version, status)
SELECT id, $2, $6, $7, $8, 'active' FROM u";

/// Create the account and its tenant, at the newest published template
/// version. `client` may be a pooled client or a plain one; the transaction
/// is ours. A version published while this process held an older set
/// refuses the transaction (`tenantry.provisioning_at`): the set is read
/// again and the signup made again, at the new version.
#[tracing::instrument(skip_all)]
pub async fn provision(
    client: &mut deadpool_postgres::Client,
    installation: &Installation,
    templates: &Templates,
    account: &NewAccount,
) -> Result<Provisioned, ProvisionError> {
    // Round trips are most of what this path adds to the DDL itself, so
    // everything between BEGIN and COMMIT goes out as one pipeline (see
    // `db::pipeline`) after the spare is taken: four round trips in all.
    let started = std::time::Instant::now();
    if installation.citus {
        match provision_built_citus(client, installation, templates, account).await {
            Ok(Some(provisioned)) => {
                client.batch_execute(db::SESSION_RESET).await?;
                metrics::histogram!("tenantry_provisioning_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::info!(user = %provisioned.user_id, version = provisioned.template_version.get(), "tenant provisioned from a built spare");
                return Ok(provisioned);
            }
            Ok(None) => {}
            Err(
                e @ (ProvisionError::UsernameTaken(_)
                | ProvisionError::EmailTaken
                | ProvisionError::Published(_)),
            ) => return Err(e),
            // The spare's rename failed for a reason of its own: the
            // rollback keeps it a spare, and this signup goes the long way.
            Err(e) => {
                tracing::warn!(error = %e, "a signup from a built spare failed; making the tenant with a head start")
            }
        }
    }
    let reservation = Reservation::take(client, installation, &account.username).await?;
    let made = async {
        let mut attempts = 0;
        let mut role_from = RoleFrom::Spare;
        loop {
            let published = templates.published();
            let tx = client.transaction().await?;
            let made = provision_in(
                &tx,
                installation,
                (published.set(), published.set().latest()),
                published.newest(),
                account,
                (role_from, Distribute::Now),
                None,
            )
            .await;
            match made {
                Ok(provisioned) => {
                    tx.commit().await?;
                    return Ok::<_, ProvisionError>(provisioned);
                }
                Err(e) if role_from == RoleFrom::Spare && !installation.citus && e.role_refused() => {
                    // This session may not act as the spare it took: not a
                    // member of it (a stock damaged by hand), or a session
                    // whose cache of its memberships missed the spare's
                    // batch. Once more with a role made in the
                    // transaction, which resets this session's cache (and,
                    // at commit, every other's) and drops from the stock
                    // every spare the service cannot act as.
                    drop(tx);
                    tracing::warn!(error = %e, "a spare tenant role was refused; making one instead");
                    role_from = RoleFrom::Now;
                }
                Err(e) if e.newer_published() => {
                    drop(tx);
                    read_published_again(client, templates, &mut attempts).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    let finished = reservation.finish(client, made.is_ok()).await;
    let mut provisioned = made?;
    finished?;
    if installation.citus {
        // No built spare was there to take: the stock wants building
        // (`spares::Keeper::claimed`), a new version published maybe.
        provisioned.spares_left = Some(0);
    }
    // The templates ran on this connection as the tenant: whatever session
    // state they may have left goes before it serves anyone else.
    client.batch_execute(db::SESSION_RESET).await?;
    metrics::histogram!("tenantry_provisioning_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(user = %provisioned.user_id, version = provisioned.template_version.get(), "tenant provisioned");
    Ok(provisioned)
}

/// A signup's transaction was refused for a version published since the
/// set was read: read it again (up to three times in one signup).
async fn read_published_again(
    client: &deadpool_postgres::Client,
    templates: &Templates,
    attempts: &mut u32,
) -> Result<(), ProvisionError> {
    *attempts += 1;
    if *attempts > 3 {
        return Err(ProvisionError::Published(
            "the published templates changed three times during one signup".into(),
        ));
    }
    templates
        .refresh(&***client)
        .await
        .map(drop)
        .map_err(|e| ProvisionError::Published(e.to_string()))
}

/// On Citus, the signup from a spare whose schema is built and distributed
/// (`spares::build_one`), when there is one at the newest published
/// version: one transaction renames its schema to the tenant's and writes
/// the rows (Citus renames it on the workers by two-phase commit), no head
/// start, no template, no distribution. Under the name's lock, as a head
/// start is, after sweeping a dead head start of the name. `None`: no such
/// spare (the caller makes the tenant with a head start).
async fn provision_built_citus(
    client: &mut deadpool_postgres::Client,
    installation: &Installation,
    templates: &Templates,
    account: &NewAccount,
) -> Result<Option<Provisioned>, ProvisionError> {
    let username = &account.username;
    // Nothing to try (no stock, or none at the newest version): one round
    // trip, not the name's lock and a sweep.
    let latest = templates.published().set().latest().get();
    let any: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM tenantry.spare_roles WHERE template_version = $1)",
            &[&latest],
        )
        .await?
        .get(0);
    if !any {
        return Ok(None);
    }
    client
        .execute(LOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
        .await?;
    let made = async {
        discard(client, username).await?;
        let mut attempts = 0;
        loop {
            let published = templates.published();
            let latest = published.set().latest().get();
            let tx = client.transaction().await?;
            // A spare whose schema was dropped by hand is left for the
            // builder (the rollback keeps it a spare).
            let Some(spare) = spares::claim_built(&*tx, latest)
                .await?
                .filter(|spare| spare.schema.is_some())
            else {
                tx.rollback().await?;
                return Ok(None);
            };
            let made = provision_in(
                &tx,
                installation,
                (published.set(), published.set().latest()),
                published.newest(),
                account,
                (RoleFrom::Spare, Distribute::Now),
                Some(spare),
            )
            .await;
            match made {
                Ok(provisioned) => {
                    tx.commit().await?;
                    return Ok(Some(provisioned));
                }
                Err(e) if e.newer_published() => {
                    drop(tx);
                    read_published_again(client, templates, &mut attempts).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
    .await;
    let unlocked = client
        .execute(UNLOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
        .await;
    let made = made?;
    unlocked?;
    Ok(made)
}

/// The work of [`provision`] inside the caller's transaction, at the last
/// version of `templates` (ascending and contiguous from V1): one pipeline.
/// It starts by checking (under a lock publishing waits for) that
/// `newest_published` is still the newest published version.
/// The caller commits (and resets the session afterwards); on Citus it
/// holds a [`Reservation`] of the name, taken before the transaction.
pub async fn provision_in(
    tx: &deadpool_postgres::Transaction<'_>,
    installation: &Installation,
    (set, version): (&crate::tenancy::templates::TemplateSet, TemplateVersion),
    newest_published: i32,
    account: &NewAccount,
    (role_from, distribute): (RoleFrom, Distribute),
    claimed: Option<spares::Claimed>,
) -> Result<Provisioned, ProvisionError> {
    let templates = set.between(0, version);
    let username = &account.username;
    let schema = username.schema();
    // On plain PostgreSQL the role is a spare made ahead (taken here, in
    // this transaction), or made now when none is left; on Citus it was
    // made with the reservation's head start.
    let user_id = Uuid::new_v4();
    // With router roles (`db::routers`), the request pool reaches the
    // tenant through its router: a spare is that router's already, a role
    // made now is granted to it.
    let router = (installation.routers > 0)
        .then(|| crate::db::routers::router_of(user_id, installation.routers));
    let (role, made_now, spares_left, built) = if let Some(spare) = claimed {
        // Taken by the caller in this transaction (on Citus: a spare whose
        // schema is built and distributed, `spares::claim_built`).
        (spare.role, false, Some(spare.left), spare.schema)
    } else if installation.citus {
        (installation.id.tenant_role(username), false, None, None)
    } else {
        // Not while `serve` hands tenants and spares to their routers
        // (`db::routers::ensure`, which takes this lock exclusively): it
        // would miss this tenant. Sent with the claim: no round trip more.
        let lock = tx.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock_shared($1, 0)",
            &[&crate::db::routers::ROUTERS_LOCK_CLASS],
        );
        let claimed = async {
            match role_from {
                RoleFrom::Spare => spares::claim(&**tx, router, version.get()).await,
                RoleFrom::Now => Ok(None),
            }
        };
        let (locked, claimed) = futures::join!(lock, claimed);
        locked?;
        let claimed = claimed?;
        match (claimed, role_from) {
            (Some(spare), _) => (spare.role, false, Some(spare.left), spare.schema),
            // None left: the stock wants making again.
            (None, RoleFrom::Spare) => {
                (installation.id.anonymous_tenant_role(), true, Some(0), None)
            }
            (None, RoleFrom::Now) => (installation.id.anonymous_tenant_role(), true, None, None),
        }
    };
    let role_text = account.role.as_str();
    let (name, email, schema_name, role_name, version_number) = (
        username.as_str(),
        account.email.as_str(),
        schema.as_str(),
        role.as_str(),
        version.get(),
    );
    let verified = account.verification.is_none();
    let account_params: [(&(dyn ToSql + Sync), Type); 9] = [
        (&user_id, Type::UUID),
        (&name, Type::TEXT),
        (&email, Type::TEXT),
        (&account.password_hash, Type::TEXT),
        (&role_text, Type::TEXT),
        (&schema_name, Type::TEXT),
        (&role_name, Type::TEXT),
        (&version_number, Type::INT4),
        (&verified, Type::BOOL),
    ];
    let verification_mail = account
        .verification
        .as_ref()
        .map(|v| v.letters.verify_email(user_id, name, email, &v.token));
    let verification_params: Option<[(&(dyn ToSql + Sync), Type); 3]> =
        account.verification.as_ref().map(|v| {
            [
                (&v.hash as &(dyn ToSql + Sync), Type::BYTEA),
                (&user_id, Type::UUID),
                (&email, Type::TEXT),
            ]
        });
    let mail_params = verification_mail.as_ref().map(|m| m.params());
    let refresh_params: Option<[(&(dyn ToSql + Sync), Type); 4]> =
        account.refresh_token.as_ref().map(|token| {
            [
                (&token.family_id as &(dyn ToSql + Sync), Type::UUID),
                (&user_id, Type::UUID),
                (&token.hash, Type::BYTEA),
                (&token.user_agent, Type::TEXT),
            ]
        });
    let idempotency_params: Option<[(&(dyn ToSql + Sync), Type); 2]> =
        account.idempotency_key.as_ref().map(|key| {
            [
                (key as &(dyn ToSql + Sync), Type::TEXT),
                (&user_id, Type::UUID),
            ]
        });
    let audit_entry: Option<String> = account.audit.as_ref().map(|a| {
        let me = a.pseudonyms.user(user_id);
        Entry::new(Action::Register)
            .actor(a.actor.clone().unwrap_or_else(|| me.clone()))
            .subject(me)
            .client(a.client.clone())
            .detail("role", role_text)
            .detail("template_version", version_number)
            .text()
    });
    let audit_params: Option<[(&(dyn ToSql + Sync), Type); 1]> = audit_entry
        .as_ref()
        .map(|e| [(e as &(dyn ToSql + Sync), Type::TEXT)]);
    // For integrators (webhooks), in this transaction: a signup rolled back
    // sends nothing.
    let created = crate::webhooks::Event::tenant(
        crate::webhooks::EventType::TenantCreated,
        user_id,
        name,
        serde_json::json!({
            "email": email,
            "email_verified": verified,
            "template_version": version_number,
        }),
    );
    // Prepared once per connection (a signup's statements are otherwise
    // parsed and planned each time: this one alone is worth caching, it
    // runs on the built-spare path, where a signup takes ~3 ms).
    let record = tx
        .prepare_typed_cached(crate::webhooks::RECORD, &crate::webhooks::Event::TYPES)
        .await?;
    let created_values = created.values();
    let router = router.map(|k| installation.id.router_role(k));
    // A spare whose schema is built: renamed to the tenant's, and only the
    // versions published since it was built are applied (often none: then
    // the signup runs no DDL but the rename, and acts as no tenant role).
    let (prelude_sql, application) = match &built {
        Some((spare, at)) => (
            format!(
                "ALTER SCHEMA {} RENAME TO {}",
                spare.quoted(),
                schema.quoted()
            ),
            TemplateApplication::new(
                &schema,
                &role,
                &templates[templates
                    .iter()
                    .position(|t| t.version().get() > *at)
                    .unwrap_or(templates.len())..],
            ),
        ),
        // A schema made now: from the baseline when the set has one.
        None => (
            prelude(installation, &schema, &role, made_now, router.as_ref()),
            TemplateApplication::building(&schema, &role, set, version),
        ),
    };
    let join_sql = if installation.citus && built.is_some() {
        // Distributed already, and in the group since its batch.
        "SELECT".to_owned()
    } else {
        join_group(installation, &schema, &role, made_now, distribute)
    };

    let mut steps: Vec<Step> = Vec::new();
    let mut requests: Vec<Request<'_>> = Vec::new();
    steps.push(Step::Other);
    requests.push(Box::pin(async {
        tx.execute_typed(PROVISIONING_AT, &[(&newest_published, Type::INT4)])
            .await
            .map(drop)
    }));
    steps.push(Step::Account);
    requests.push(Box::pin(async {
        tx.execute_typed(INSERT_ACCOUNT, &account_params)
            .await
            .map(drop)
    }));
    if let Some(params) = &refresh_params {
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute_typed(crate::auth::INSERT_REFRESH_TOKEN, params)
                .await
                .map(drop)
        }));
    }
    if let (Some(token), Some(mail)) = (&verification_params, &mail_params) {
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute_typed(INSERT_VERIFICATION_TOKEN, token)
                .await
                .map(drop)
        }));
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute_typed(crate::mail::ENQUEUE, mail).await.map(drop)
        }));
    }
    steps.push(Step::Prelude);
    requests.push(Box::pin(tx.batch_execute(&prelude_sql)));
    if role_from == RoleFrom::Now && !installation.citus {
        // After the prelude's GRANT, so this session's membership cache
        // is fresh (`provision`'s retry after a refused spare).
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute(spares::DROP_UNUSABLE, &[]).await.map(drop)
        }));
    }
    if !application.is_empty() {
        let history = application.history_request(tx.client());
        for (step, request) in application
            .requests(tx.client())
            .into_iter()
            .chain([history])
        {
            steps.push(Step::Apply(step));
            requests.push(request);
        }
    }
    steps.push(Step::Other);
    requests.push(Box::pin(tx.batch_execute(&join_sql)));
    if installation.citus {
        // The reservation's head start ends with this transaction.
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute(
                "DELETE FROM tenantry.pending_tenants WHERE username = $1",
                &[&name],
            )
            .await
            .map(drop)
        }));
    }
    if let Some(params) = &idempotency_params {
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute_typed(
                "INSERT INTO tenantry.idempotency_keys (key, user_id) VALUES ($1, $2)",
                params,
            )
            .await
            .map(drop)
        }));
    }
    steps.push(Step::Other);
    requests.push(Box::pin(async {
        tx.execute(&record, &created_values).await.map(drop)
    }));
    // Last: the chain-head lock is held only for the commit.
    if let Some(params) = &audit_params {
        steps.push(Step::Other);
        requests.push(Box::pin(async {
            tx.execute_typed(audit::APPEND, params).await.map(drop)
        }));
    }

    // The first failure aborts the transaction and every later request
    // fails with it; report the first. A concurrent signup for the same name
    // waits on the registry's unique index and then gets a clean unique
    // violation, before any DDL runs.
    for (step, result) in steps.into_iter().zip(db::pipeline(requests).await) {
        result.map_err(|e| match step {
            Step::Account | Step::Prelude => conflict_or(e, username),
            Step::Apply(ApplyStep::Template(t)) => ProvisionError::Template {
                file: t.file_name(),
                source: e,
            },
            Step::Apply(_) | Step::Other => e.into(),
        })?;
    }
    Ok(Provisioned {
        user_id,
        username: username.clone(),
        schema,
        role,
        template_version: version,
        spares_left,
        built_schema: built.is_some(),
    })
}

/// Build a tenant from nothing with `templates` (its role, schema and every
/// version, as its role) in a transaction that is rolled back: what
/// publishing checks before a version becomes part of the installation,
/// since a published version can never be taken back. Local to this node
/// on Citus (nothing is propagated).
pub async fn check_builds(
    client: &tokio_postgres::Client,
    installation: &Installation,
    templates: &[crate::tenancy::templates::Template],
) -> Result<(), ProvisionError> {
    client.batch_execute("BEGIN").await?;
    let built = async {
        client
            .execute(
                "SELECT set_config('citus.enable_ddl_propagation', 'off', true)",
                &[],
            )
            .await?;
        let (schema, role) = scratch_tenant(client, installation).await?;
        let application = TemplateApplication::new(&schema, &role, templates);
        for (step, request) in application.requests(client) {
            request.await.map_err(|e| match step {
                ApplyStep::Template(t) => ProvisionError::Template {
                    file: t.file_name(),
                    source: e,
                },
                ApplyStep::History => e.into(),
            })?;
        }
        Ok(())
    }
    .await;
    let rolled_back = client.batch_execute("ROLLBACK").await;
    match (built, rolled_back) {
        (Err(e), _) => Err(e),
        (Ok(()), rolled_back) => Ok(rolled_back?),
    }
}

/// A tenant that exists only in the caller's transaction (to be rolled
/// back): its role and its empty schema, made here, on this node only
/// (the caller turns Citus's propagation off).
pub(crate) async fn scratch_tenant(
    client: &tokio_postgres::Client,
    installation: &Installation,
) -> Result<(SchemaName, RoleName), tokio_postgres::Error> {
    let username = Username::scratch(&Uuid::new_v4().simple().to_string()[..8]);
    let (schema, role) = (username.schema(), installation.id.tenant_role(&username));
    let local = Installation {
        citus: false,
        routers: 0,
        ..installation.clone()
    };
    client
        .batch_execute(&prelude(&local, &schema, &role, true, None))
        .await?;
    Ok((schema, role))
}

/// The tenant's role and its empty schema with its history table. The
/// schema and the history belong to the service (a schema's owner may drop
/// anything in it, the history included); the tenant role gets USAGE and
/// CREATE on the schema and owns the tables the templates create.
/// Identifiers are validated names, always quoted; no value is interpolated.
/// On Citus the role and the schema exist already ([`Reservation`]); a
/// spare role (`made_now` false) exists already too.
fn prelude(
    installation: &Installation,
    schema: &SchemaName,
    role: &RoleName,
    made_now: bool,
    router: Option<&RoleName>,
) -> String {
    let history = history_table(schema);
    if installation.citus {
        history
    } else if made_now {
        let router = router.map_or(String::new(), |router| {
            format!("GRANT {} TO {};\n", role.quoted(), router.quoted())
        });
        format!(
            "{}\n{router}{history}",
            role_and_schema(installation, schema, role)
        )
    } else {
        spare_schema(schema, role)
    }
}

/// The schema's empty history table (the service's).
fn history_table(schema: &SchemaName) -> String {
    format!(
        "CREATE TABLE {s}.{HISTORY_TABLE} (
             version int4 PRIMARY KEY,
             name varchar(255),
             applied_on varchar(255),
             checksum varchar(255));",
        s = schema.quoted(),
    )
}

/// A spare's empty schema and history (`spares::build_one`), as a signup
/// with a spare role makes them.
pub(crate) fn spare_schema(schema: &SchemaName, role: &RoleName) -> String {
    format!("{}\n{}", schema_for(schema, role), history_table(schema))
}

/// The tenant's empty schema, owned by the service, usable by its role.
fn schema_for(schema: &SchemaName, role: &RoleName) -> String {
    format!(
        "CREATE SCHEMA {s};
         GRANT USAGE, CREATE ON SCHEMA {s} TO {r};",
        r = role.quoted(),
        s = schema.quoted(),
    )
}

/// The tenant's role and its empty schema.
fn role_and_schema(installation: &Installation, schema: &SchemaName, role: &RoleName) -> String {
    let membership = if installation.superuser {
        String::new()
    } else {
        // A non-superuser service needs membership to act as the role.
        format!("GRANT {r} TO CURRENT_USER;", r = role.quoted())
    };
    // Citus opens its connections to the workers as the current role, and
    // does so while the templates run when they create an object it
    // propagates (a type, a function): the role may log in, and is in the
    // group (which may connect to the database) from its head start on.
    let (login, group) = if installation.citus {
        (
            "LOGIN",
            format!(
                "GRANT {g} TO {r};",
                g = installation.group_role().quoted(),
                r = role.quoted()
            ),
        )
    } else {
        ("NOLOGIN", String::new())
    };
    format!(
        "CREATE ROLE {r} {login};
         {membership}
         {group}
         {schema}",
        r = role.quoted(),
        schema = schema_for(schema, role),
    )
}

/// The signup transaction's last statement. Granting membership in the
/// group locks the group role until commit (also `CREATE ROLE … IN ROLE`
/// does on PostgreSQL ≥ 16): last, so concurrent signups queue on it only
/// for the time of their commit, not their DDL.
///
/// On Citus the role joined the group with its head start, and the last
/// statement makes the schema a distributed schema (its tables move to one
/// worker as one colocated unit), in the same transaction: a failure
/// leaves nothing on any node.
fn join_group(
    installation: &Installation,
    schema: &SchemaName,
    role: &RoleName,
    made_now: bool,
    distribute: Distribute,
) -> String {
    if !installation.citus && !made_now {
        // A spare is in the group since its batch.
        return "SELECT".into();
    }
    if installation.citus {
        // In the group since its head start (`role_and_schema`).
        return match distribute {
            Distribute::Now => distribute_sql(schema),
            Distribute::Later => "SELECT".into(),
        };
    }
    format!(
        "GRANT {g} TO {r}",
        g = installation.group_role().quoted(),
        r = role.quoted()
    )
}

/// Where a signup's role comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleFrom {
    /// A spare (`tenancy::spares`), or made now when none is left.
    Spare,
    /// Made in the signup's transaction.
    Now,
}

/// The class of the session-level advisory lock a Citus signup holds on its
/// name from its head start to its end (second key: `hashtext(username)`).
pub const PENDING_LOCK_CLASS: i32 = 0x706e64; // 'pnd'

/// Take (session-level) and let go of a name's lock: `$1`
/// [`PENDING_LOCK_CLASS`], `$2` the username.
const LOCK_NAME: &str = "SELECT pg_catalog.pg_advisory_lock($1, pg_catalog.hashtext($2))";
const UNLOCK_NAME: &str = "SELECT pg_catalog.pg_advisory_unlock($1, pg_catalog.hashtext($2))";

/// On Citus, a name's role and empty schema, committed ahead of the
/// tenant (see the module's doc); nothing on plain PostgreSQL.
#[must_use = "finish the reservation: it holds a lock and, on failure, objects to drop"]
pub struct Reservation {
    username: Option<Username>,
}

impl Reservation {
    /// Take the name: its lock (waiting for a signup of the same name in
    /// flight, which then has finished), sweep a dead head start of the
    /// name, then commit the role and the empty schema with their
    /// `pending_tenants` row. A name whose schema or role exists is taken.
    pub async fn take(
        client: &deadpool_postgres::Client,
        installation: &Installation,
        username: &Username,
    ) -> Result<Reservation, ProvisionError> {
        if !installation.citus {
            return Ok(Reservation { username: None });
        }
        client
            .execute(LOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
            .await?;
        let reservation = Reservation {
            username: Some(username.clone()),
        };
        let made = async {
            discard(client, username).await?;
            let schema = username.schema();
            let role = installation.id.tenant_role(username);
            client.batch_execute("BEGIN").await?;
            let head_start = async {
                client
                    .execute(
                        "INSERT INTO tenantry.pending_tenants (username, schema_name, role_name)
                         VALUES ($1, $2, $3)",
                        &[&username.as_str(), &schema.as_str(), &role.as_str()],
                    )
                    .await?;
                client
                    .batch_execute(&role_and_schema(installation, &schema, &role))
                    .await
            }
            .await;
            match head_start {
                Ok(()) => client.batch_execute("COMMIT").await,
                Err(e) => {
                    client.batch_execute("ROLLBACK").await?;
                    Err(e)
                }
            }
        }
        .await;
        match made {
            Ok(()) => Ok(reservation),
            Err(e) => {
                reservation.finish(client, false).await?;
                Err(conflict_or(e, username))
            }
        }
    }

    /// End it: unless the tenant was made, drop the head start again; then
    /// let go of the name. When `client`'s connection died (its backend
    /// killed: the name's lock died with it), the head start is dropped
    /// from another of the pool's connections, under the name's lock again.
    pub async fn finish(
        self,
        client: &deadpool_postgres::Client,
        made: bool,
    ) -> Result<(), tokio_postgres::Error> {
        let Some(username) = &self.username else {
            return Ok(());
        };
        let ended = async {
            if !made {
                discard(client, username).await?;
            }
            client
                .execute(UNLOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
                .await
                .map(drop)
        }
        .await;
        match ended {
            Err(e) if client.is_closed() && !made => {
                let Some(pool) = deadpool_postgres::Object::pool(client) else {
                    return Err(e);
                };
                let Ok(other) = pool.get().await else {
                    return Err(e);
                };
                other
                    .execute(LOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
                    .await?;
                let dropped = discard(&other, username).await;
                other
                    .execute(UNLOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
                    .await?;
                dropped.map(drop)
            }
            other => other,
        }
    }
}

/// Drop a head start of `username` (its role and schema, unless a registry
/// row names them) and its row, in one transaction. The caller holds the
/// name's lock, so no signup is using it.
async fn discard(
    client: &tokio_postgres::Client,
    username: &Username,
) -> Result<bool, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let dropped = async {
        let Some(row) = client
            .query_opt(
                "DELETE FROM tenantry.pending_tenants p WHERE p.username = $1
                 RETURNING p.schema_name, p.role_name,
                           EXISTS (SELECT 1 FROM tenantry.tenants t
                                   WHERE t.schema_name = p.schema_name OR t.role_name = p.role_name)",
                &[&username.as_str()],
            )
            .await?
        else {
            return Ok(false);
        };
        let registered: bool = row.get(2);
        let (Ok(schema), Ok(role)) = (
            SchemaName::parse(row.get::<_, &str>(0)),
            RoleName::parse(row.get::<_, &str>(1)),
        ) else {
            return Ok(false);
        };
        if !registered {
            client
                .batch_execute(&format!(
                    "SET LOCAL client_min_messages TO warning;
                     DROP SCHEMA IF EXISTS {s} CASCADE; DROP ROLE IF EXISTS {r}",
                    s = schema.quoted(),
                    r = role.quoted()
                ))
                .await?;
        }
        Ok(true)
    }
    .await;
    match dropped {
        Ok(dropped) => {
            client.batch_execute("COMMIT").await?;
            if dropped {
                tracing::info!("a signup's head start was dropped");
            }
            Ok(dropped)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            Err(e)
        }
    }
}

/// Sweep the head starts whose signup is gone (its lock is free): what a
/// killed Citus signup left. Returns how many were dropped.
pub async fn sweep_pending(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    let mut swept = 0;
    for row in client
        .query("SELECT username FROM tenantry.pending_tenants", &[])
        .await?
    {
        let Ok(username) = Username::parse(row.get::<_, &str>(0)) else {
            continue;
        };
        let free: bool = client
            .query_one(
                "SELECT pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2))",
                &[&PENDING_LOCK_CLASS, &username.as_str()],
            )
            .await?
            .get(0);
        if !free {
            continue;
        }
        let dropped = discard(client, &username).await;
        client
            .execute(UNLOCK_NAME, &[&PENDING_LOCK_CLASS, &username.as_str()])
            .await?;
        if dropped? {
            swept += 1;
        }
    }
    Ok(swept)
}

/// On Citus, whether [`provision_in`] makes the schema a distributed schema
/// at its end, or the caller does ([`distribute_sql`]) before it commits,
/// having written the tenant's rows first (an import: once distributed,
/// the tenant's shards may not be written by two roles in one transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribute {
    Now,
    Later,
}

/// Make `schema` a distributed schema (Citus).
pub fn distribute_sql(schema: &SchemaName) -> String {
    // A validated schema name (`tenant_[a-z0-9_]+`), quoted: no `'` in it.
    format!(
        "SELECT pg_catalog.citus_schema_distribute('{}')",
        schema.quoted()
    )
}

/// What a pipelined request was, to say what failed.
enum Step<'a> {
    Account,
    Prelude,
    Apply(ApplyStep<'a>),
    Other,
}

/// A unique violation on the registry means the name or email is taken;
/// anything else is an error.
fn conflict_or(e: tokio_postgres::Error, username: &Username) -> ProvisionError {
    let Some(db) = e.as_db_error() else {
        return e.into();
    };
    if *db.code() == SqlState::UNIQUE_VIOLATION {
        return match db.constraint() {
            Some("users_email_key") => ProvisionError::EmailTaken,
            _ => ProvisionError::UsernameTaken(username.to_string()),
        };
    }
    // A schema or role of that name exists outside the registry (left by
    // hand, or another installation's): report the name as taken rather than
    // touch it.
    if *db.code() == SqlState::DUPLICATE_SCHEMA || *db.code() == SqlState::DUPLICATE_OBJECT {
        return ProvisionError::UsernameTaken(username.to_string());
    }
    e.into()
}
