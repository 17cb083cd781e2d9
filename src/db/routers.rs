//! Router roles (issue 28): what the request pool's connections log in as.
//!
//! `SET ROLE` checks the session's login role, and PostgreSQL keeps, per
//! session, the list of every role that login role is a member of. It
//! builds that list on a session's first `SET ROLE` and again after any
//! change to any role anywhere (one catalog lookup per membership: 0.3 s
//! at 10,000 tenants on PostgreSQL 15, `scripts/bench-scale-node`). The
//! service is a member of every tenant role, so a pooled connection that
//! logged in as the service paid for the whole fleet each time.
//!
//! So the pool's tenant connections log in as one of `k` routers,
//! `tnt_<id>__r<n>`, each a member of only the tenant roles whose user id
//! is `n` modulo `k` ([`router_of`]), which is also the pool's shard of
//! that tenant (`db::RequestPool`): a router's list is the fleet's `k`-th
//! part. A router is `LOGIN NOINHERIT` (it has none of its tenants'
//! privileges, only the right to become one of them), is a member of no
//! other role, and may read only the registry columns that the tenant
//! guard's entry reads (`routing::ENTER`); everything else runs on the
//! service's own connections, as before, and the service stays a member
//! of every tenant role (signup, fleet, export, erasure act as tenants
//! there). A router cannot act as another router's tenants: the isolation
//! between tenants is still each tenant's own role.
//!
//! [`ensure`] (run by `serve` before it listens) makes the routers, grants
//! them what the entry reads, and hands every tenant role and spare to its
//! router (and takes it from any other), in one transaction: one reset of
//! every session's list. A tenant made later is granted to its router by
//! its signup (a spare is its router's already, `tenancy::spares`).

use rand::Rng;
use uuid::Uuid;

use super::{DbError, Installation};
use crate::domain::RoleName;

/// The class of the transaction-level advisory lock [`ensure`] holds.
pub const ROUTERS_LOCK_CLASS: i32 = 0x727472; // 'rtr'

/// The router (and the request pool's shard) of a tenant: its user id
/// modulo the number of routers.
pub fn router_of(user: Uuid, routers: usize) -> usize {
    (user.as_u128() % routers.max(1) as u128) as usize
}

/// How to log in as one router.
#[derive(Clone)]
pub struct Login {
    pub role: RoleName,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("role", &self.role).finish()
    }
}

/// What [`ensure`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandOver {
    /// Routers made now.
    pub made: usize,
    /// Tenant and spare roles granted to their router now.
    pub granted: usize,
    /// Memberships taken from a router that is not the role's.
    pub revoked: usize,
}

/// Grants a router needs: to connect, and to read what the tenant guard's
/// entry reads (column by column: no password hash, no email).
const ROUTER_GRANTS: &str = "GRANT USAGE ON SCHEMA tenantry TO {r};
GRANT SELECT (user_id, schema_name, role_name, status, template_version, over_quota_since) ON tenantry.tenants TO {r};
GRANT SELECT (id, token_generation, disabled_at, suspended_at) ON tenantry.users TO {r};
GRANT SELECT (family_id, revoked_at) ON tenantry.refresh_tokens TO {r};
GRANT EXECUTE ON FUNCTION tenantry.refuse_suspended() TO {r};
GRANT EXECUTE ON FUNCTION tenantry.refuse_over_quota() TO {r};
DO $$ BEGIN EXECUTE pg_catalog.format('GRANT CONNECT ON DATABASE %I TO %I', \
pg_catalog.current_database(), {l}); END $$;";

/// Whether router `$1` has every grant of [`ROUTER_GRANTS`].
const HAS_GRANTS: &str = "SELECT pg_catalog.has_schema_privilege($1, 'tenantry', 'USAGE')
    AND pg_catalog.has_column_privilege($1, 'tenantry.tenants', 'template_version', 'SELECT')
    AND pg_catalog.has_column_privilege($1, 'tenantry.tenants', 'over_quota_since', 'SELECT')
    AND pg_catalog.has_column_privilege($1, 'tenantry.users', 'suspended_at', 'SELECT')
    AND pg_catalog.has_column_privilege($1, 'tenantry.refresh_tokens', 'revoked_at', 'SELECT')
    AND pg_catalog.has_function_privilege($1, 'tenantry.refuse_suspended()', 'EXECUTE')
    AND pg_catalog.has_function_privilege($1, 'tenantry.refuse_over_quota()', 'EXECUTE')
    AND pg_catalog.has_database_privilege($1, pg_catalog.current_database(), 'CONNECT')";

/// Make `count` routers (none on Citus, or for 0), record their number,
/// and give each tenant role and spare to its router only; all in one
/// transaction. Returns how to log in as each router, and what changed.
pub async fn ensure(
    client: &mut tokio_postgres::Client,
    installation: &Installation,
    count: usize,
) -> Result<(Vec<Login>, HandOver), DbError> {
    let count = if installation.citus { 0 } else { count };
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, 0)",
        &[&ROUTERS_LOCK_CLASS],
    )
    .await?;
    // A refill assigns spares to routers: not while they are handed over.
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, 0)",
        &[&super::REFILL_LOCK_CLASS],
    )
    .await?;
    let routers = i32::try_from(count).unwrap_or(i32::MAX);
    tx.execute(
        "UPDATE tenantry.installation SET routers = $1 WHERE routers IS DISTINCT FROM $1",
        &[&routers],
    )
    .await?;
    if count == 0 {
        tx.commit().await?;
        return Ok((Vec::new(), HandOver::default()));
    }
    let mut changed = HandOver::default();
    let mut sql = String::from("SET LOCAL client_min_messages TO warning;\n");
    let mut logins = Vec::with_capacity(count);
    // The routers there are, with whether each is as made (LOGIN NOINHERIT).
    let mut there = std::collections::HashMap::new();
    for row in tx
        .query(
            "SELECT rolname::text, rolcanlogin AND NOT rolinherit FROM pg_catalog.pg_roles
             WHERE starts_with(rolname, $1)",
            &[&installation.id.router_prefix()],
        )
        .await?
    {
        there.insert(row.get::<_, String>(0), row.get::<_, bool>(1));
    }
    for name in there.keys() {
        // Routers beyond the number wanted now may no longer log in (their
        // memberships go below).
        let beyond = (count..64).any(|k| installation.id.router_role(k).as_str() == name);
        if beyond {
            sql.push_str(&format!(
                "ALTER ROLE {} NOLOGIN;\n",
                postgres_protocol::escape::escape_identifier(name)
            ));
        }
    }
    for k in 0..count {
        let role = installation.id.router_role(k);
        let key = i32::try_from(k).expect("at most 64 routers");
        let state = there.get(role.as_str()).copied();
        let stored: Option<String> = tx
            .query_opt(
                "SELECT password FROM tenantry.router_logins WHERE router = $1",
                &[&key],
            )
            .await?
            .map(|row| row.get(0));
        let password = match (&stored, state) {
            (Some(password), Some(true)) => password.clone(),
            _ => {
                // A new router, one whose password this installation does
                // not know (a restore), or one changed by hand: the stored
                // password, else a new one; sent as a SCRAM verifier, so
                // the password itself never reaches the server (or its log).
                let password = stored.clone().unwrap_or_else(new_password);
                let verifier = postgres_protocol::escape::escape_literal(
                    &postgres_protocol::password::scram_sha_256(password.as_bytes()),
                );
                if state.is_some() {
                    sql.push_str(&format!(
                        "ALTER ROLE {} LOGIN NOINHERIT PASSWORD {verifier};\n",
                        role.quoted()
                    ));
                } else {
                    sql.push_str(&format!(
                        "CREATE ROLE {} LOGIN NOINHERIT PASSWORD {verifier};\n",
                        role.quoted()
                    ));
                    changed.made += 1;
                }
                tx.execute(
                    "INSERT INTO tenantry.router_logins (router, password) VALUES ($1, $2)
                     ON CONFLICT (router) DO UPDATE SET password = EXCLUDED.password",
                    &[&key, &password],
                )
                .await?;
                password
            }
        };
        let granted = state.is_some()
            && tx
                .query_one(HAS_GRANTS, &[&role.as_str()])
                .await?
                .get::<_, bool>(0);
        if !granted {
            sql.push_str(&ROUTER_GRANTS.replace("{r}", &role.quoted()).replace(
                "{l}",
                &postgres_protocol::escape::escape_literal(role.as_str()),
            ));
            sql.push('\n');
        }
        logins.push(Login { role, password });
    }
    // Spares of no router yet (made before routers, restored, or for more
    // routers than now) are dealt out in turn.
    tx.execute(
        "UPDATE tenantry.spare_roles s SET router = n.k
         FROM (SELECT role_name,
                      ((row_number() OVER (ORDER BY made_at, role_name) - 1) % $1::int4)::int4 AS k
               FROM tenantry.spare_roles WHERE router < 0 OR router >= $1::int4) n
         WHERE s.role_name = n.role_name",
        &[&routers],
    )
    .await?;
    // Every tenant role and spare that exists, with the router it belongs
    // to: a tenant's by its user id, a spare's as dealt out above.
    let mut wanted = std::collections::HashMap::new();
    for row in tx
        .query(
            "SELECT t.role_name, t.user_id, NULL::int4 AS router FROM tenantry.tenants t
             WHERE EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = t.role_name)
             UNION ALL
             SELECT s.role_name, NULL::uuid, s.router FROM tenantry.spare_roles s
             WHERE s.router >= 0
               AND EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = s.role_name)",
            &[],
        )
        .await?
    {
        // Every spare has a router by now (dealt out above).
        let router = match row.get::<_, Option<Uuid>>("user_id") {
            Some(user) => router_of(user, count),
            None => row.get::<_, i32>("router") as usize,
        };
        wanted.insert(row.get::<_, String>("role_name"), router);
    }
    // The routers' memberships as they are.
    let mut have = std::collections::HashSet::new();
    for row in tx
        .query(
            "SELECT g.rolname::text, m.rolname::text FROM pg_catalog.pg_auth_members a
             JOIN pg_catalog.pg_roles g ON g.oid = a.roleid
             JOIN pg_catalog.pg_roles m ON m.oid = a.member
             WHERE starts_with(m.rolname, $1)",
            &[&installation.id.router_prefix()],
        )
        .await?
    {
        let (granted, router): (String, String) = (row.get(0), row.get(1));
        let ours = wanted
            .get(&granted)
            .is_some_and(|k| installation.id.router_role(*k).as_str() == router);
        if ours {
            have.insert(granted);
        } else {
            // Another router's tenant, an old number of routers, or a role
            // that is no tenant's: a router may become its own tenants only.
            sql.push_str(&format!(
                "REVOKE {} FROM {};\n",
                postgres_protocol::escape::escape_identifier(&granted),
                postgres_protocol::escape::escape_identifier(&router)
            ));
            changed.revoked += 1;
        }
    }
    for (role, k) in &wanted {
        if have.contains(role) {
            continue;
        }
        let Ok(role) = RoleName::parse(role) else {
            continue;
        };
        sql.push_str(&format!(
            "GRANT {} TO {};\n",
            role.quoted(),
            installation.id.router_role(*k).quoted()
        ));
        changed.granted += 1;
    }
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok((logins, changed))
}

/// Give router `k` a new password (its login failed: a password changed
/// by hand, or an installation restored by hand with another's passwords).
pub async fn rekey(
    client: &mut tokio_postgres::Client,
    installation: &Installation,
    k: usize,
) -> Result<Login, DbError> {
    let role = installation.id.router_role(k);
    let password = new_password();
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, 0)",
        &[&ROUTERS_LOCK_CLASS],
    )
    .await?;
    tx.batch_execute(&format!(
        "ALTER ROLE {} LOGIN NOINHERIT PASSWORD {}",
        role.quoted(),
        postgres_protocol::escape::escape_literal(&postgres_protocol::password::scram_sha_256(
            password.as_bytes()
        ))
    ))
    .await?;
    tx.execute(
        "INSERT INTO tenantry.router_logins (router, password) VALUES ($1, $2)
         ON CONFLICT (router) DO UPDATE SET password = EXCLUDED.password",
        &[&i32::try_from(k).expect("at most 64 routers"), &password],
    )
    .await?;
    tx.commit().await?;
    Ok(Login { role, password })
}

/// The logins of the routers `serve` made (for a command that builds the
/// same pool, and the tests).
pub async fn logins(
    client: &impl tokio_postgres::GenericClient,
    installation: &Installation,
) -> Result<Vec<Login>, DbError> {
    let rows = client
        .query(
            "SELECT router, password FROM tenantry.router_logins
             WHERE router < (SELECT routers FROM tenantry.installation) ORDER BY router",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Login {
            role: installation
                .id
                .router_role(usize::try_from(row.get::<_, i32>(0)).unwrap_or(0)),
            password: row.get(1),
        })
        .collect())
}

fn new_password() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::router_of;

    #[test]
    fn a_tenants_router_is_its_user_id_modulo_the_routers() {
        let user = uuid::Uuid::from_u128(8 * 1000 + 5);
        assert_eq!(router_of(user, 8), 5);
        assert_eq!(router_of(user, 1), 0);
        assert_eq!(router_of(user, 0), 0);
        let spread: std::collections::HashSet<usize> = (0..200)
            .map(|_| router_of(uuid::Uuid::new_v4(), 8))
            .collect();
        assert_eq!(spread.len(), 8, "random ids reach every router");
    }
}
