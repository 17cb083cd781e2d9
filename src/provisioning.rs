//! Provisioning: a user, their database role and their schema at the latest
//! template version, all in ONE transaction. A failure (or a kill) at any
//! instant rolls everything back: the tenant is complete, or absent.

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::db::Installation;
use crate::domain::{Email, RoleName, SchemaName, TemplateVersion, Username};
use crate::templates::TemplateSet;

/// The name of the per-tenant history table: refinery's own default, in the
/// tenant's schema, in refinery's format.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("username {0} is already taken")]
    UsernameTaken(String),
    #[error("email is already registered")]
    EmailTaken,
    #[error("tenant template V{version}__{name} failed: {source}")]
    Template {
        version: i32,
        name: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("provisioning failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl ProvisionError {
    /// The conflict for a name or email found taken.
    pub fn from_taken(same_name: bool, username: &Username) -> ProvisionError {
        if same_name {
            ProvisionError::UsernameTaken(username.to_string())
        } else {
            ProvisionError::EmailTaken
        }
    }
}

/// An account to create, with its password already hashed.
#[derive(Debug)]
pub struct NewAccount {
    pub username: Username,
    pub email: Email,
    pub password_hash: String,
    /// `user`, `admin` or `auditor`.
    pub role: &'static str,
    /// A refresh token hash to store with the account, in the same
    /// transaction (so a signup's tokens exist exactly when the user does).
    pub refresh_token: Option<RefreshTokenRow>,
}

#[derive(Debug, Clone)]
pub struct RefreshTokenRow {
    pub family_id: Uuid,
    pub hash: Vec<u8>,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub user_id: Uuid,
    pub username: Username,
    pub schema: SchemaName,
    pub role: RoleName,
    pub template_version: TemplateVersion,
}

const INSERT_ACCOUNT: &str = "\
WITH u AS (
    INSERT INTO tenantry.users (id, username, email, password_hash, role)
    VALUES ($1, $2, $3, $4, $5)
    RETURNING id
)
INSERT INTO tenantry.tenants (user_id, username, schema_name, role_name, template_version, status)
SELECT id, $2, $6, $7, $8, 'active' FROM u";

const INSERT_REFRESH: &str = "\
INSERT INTO tenantry.refresh_tokens (family_id, user_id, token_hash, expires_at)
VALUES ($1, $2, $3, now() + interval '7 days')";

/// Create the account and its tenant. `client` may be a pooled client or a
/// plain one; the transaction is ours.
#[tracing::instrument(skip_all, fields(tenant = %account.username))]
pub async fn provision(
    client: &mut deadpool_postgres::Client,
    installation: &Installation,
    templates: &TemplateSet,
    account: &NewAccount,
) -> Result<Provisioned, ProvisionError> {
    let username = &account.username;
    let schema = username.schema();
    let role = installation.id.tenant_role(username);
    let version = templates.latest();

    // Round trips are most of what this path adds to the DDL itself, so
    // everything between BEGIN and COMMIT goes out as one pipeline: each
    // request is written on its future's first poll, in order, and the
    // server runs them in order. The first failure aborts the transaction,
    // every later request then fails too, and we report the first error.
    let tx = client.transaction().await?;
    let user_id = Uuid::new_v4();
    let (name, email, schema_name, role_name, version_number) = (
        username.as_str(),
        account.email.as_str(),
        schema.as_str(),
        role.as_str(),
        version.get(),
    );
    let account_params: [(&(dyn ToSql + Sync), Type); 8] = [
        (&user_id, Type::UUID),
        (&name, Type::TEXT),
        (&email, Type::TEXT),
        (&account.password_hash, Type::TEXT),
        (&account.role, Type::TEXT),
        (&schema_name, Type::TEXT),
        (&role_name, Type::TEXT),
        (&version_number, Type::INT4),
    ];
    let insert_account = tx.execute_typed(INSERT_ACCOUNT, &account_params);
    let insert_refresh = async {
        match &account.refresh_token {
            Some(token) => tx
                .execute_typed(
                    INSERT_REFRESH,
                    &[
                        (&token.family_id, Type::UUID),
                        (&user_id, Type::UUID),
                        (&token.hash, Type::BYTEA),
                    ],
                )
                .await
                .map(drop),
            None => Ok(()),
        }
    };

    // Identifiers below are validated names, always quoted; no value is
    // interpolated.
    let membership = if installation.superuser {
        String::new()
    } else {
        // A non-superuser service needs membership to act as the role.
        format!("GRANT {r} TO CURRENT_USER;", r = role.quoted())
    };
    let prelude_sql = format!(
        "CREATE ROLE {r} NOLOGIN IN ROLE {g};
         {membership}
         CREATE SCHEMA {s} AUTHORIZATION {r};
         CREATE TABLE {s}.{HISTORY_TABLE} (
             version int4 PRIMARY KEY,
             name varchar(255),
             applied_on varchar(255),
             checksum varchar(255));
         SET LOCAL search_path TO {s};
         SET LOCAL ROLE {r};",
        r = role.quoted(),
        g = installation.group_role().quoted(),
        s = schema.quoted(),
    );
    let prelude = tx.batch_execute(&prelude_sql);
    // One request per version, so a failure names its version. The tables
    // belong to the tenant's role, which creates them.
    let apply =
        futures::future::join_all(templates.all().iter().map(|t| tx.batch_execute(t.sql())));
    let reset_role = tx.batch_execute("RESET ROLE");

    let versions: Vec<i32> = templates.all().iter().map(|t| t.version().get()).collect();
    let names: Vec<&str> = templates.all().iter().map(|t| t.name()).collect();
    let checksums: Vec<String> = templates
        .all()
        .iter()
        .map(|t| t.checksum().to_string())
        .collect();
    let history_sql = format!(
        "INSERT INTO {s}.{HISTORY_TABLE} (version, name, applied_on, checksum)
         SELECT v, n, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), c
         FROM unnest($1::int4[], $2::text[], $3::text[]) AS h(v, n, c)",
        s = schema.quoted()
    );
    let history_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&versions, Type::INT4_ARRAY),
        (&names, Type::TEXT_ARRAY),
        (&checksums, Type::TEXT_ARRAY),
    ];
    let record_history = tx.execute_typed(&history_sql, &history_params);

    let (account_done, refresh_done, prelude_done, applied, reset_done, history_done) = tokio::join!(
        insert_account,
        insert_refresh,
        prelude,
        apply,
        reset_role,
        record_history
    );
    // A concurrent signup for the same name waits on the registry's unique
    // index and then gets a clean unique violation, before any DDL runs.
    account_done.map_err(|e| conflict_or(e, username))?;
    refresh_done?;
    prelude_done.map_err(|e| conflict_or(e, username))?;
    for (t, result) in templates.all().iter().zip(applied) {
        result.map_err(|source| ProvisionError::Template {
            version: t.version().get(),
            name: t.name().to_owned(),
            source,
        })?;
    }
    reset_done?;
    history_done?;
    tx.commit().await?;

    tracing::info!(schema = %schema, version = version.get(), "tenant provisioned");
    Ok(Provisioned {
        user_id,
        username: username.clone(),
        schema,
        role,
        template_version: version,
    })
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
