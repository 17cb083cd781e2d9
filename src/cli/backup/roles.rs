//! The installation's roles, which a dump of the database leaves out (roles
//! belong to the cluster, and `pg_dumpall --roles-only` needs `pg_authid`,
//! which only a superuser reads): read from the catalog in the dump's
//! snapshot, written down as DDL, and made again before a restore, the way
//! provisioning makes them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::cli::Failure;
use crate::domain::{InstallationId, RoleName};

/// A tenant role of the installation, as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRole {
    pub name: String,
    /// `LOGIN` (tenant roles on Citus) or `NOLOGIN`.
    pub login: bool,
    /// A member of the installation's group role (every tenant role is,
    /// from the end of its signup).
    pub in_group: bool,
}

/// The installation's roles at the snapshot, and what the backup leaves out.
#[derive(Debug)]
pub struct Found {
    /// How many router roles there are (`db::routers`), carried as bare
    /// roles (the dump grants them what routing reads).
    pub routers: usize,
    pub tenants: Vec<TenantRole>,
    /// What involves the installation's roles but is not made by Tenantry,
    /// so not made again by a restore: said at backup time.
    pub left_out: Vec<String>,
}

/// Read the installation's tenant roles: every role named `tnt_<id>_…`
/// (the registry's and any orphan, whose objects the dump holds too), but
/// the router roles, which `serve` makes again with their memberships
/// (`db::routers`).
pub async fn read(
    client: &impl GenericClient,
    id: &InstallationId,
) -> Result<Found, tokio_postgres::Error> {
    let prefix = format!("tnt_{}_", id.as_str());
    let group = id.group_role();
    let mut tenants = Vec::new();
    let mut left_out = Vec::new();
    for row in client
        .query(
            "SELECT r.rolname::text, r.rolcanlogin,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                            JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                            WHERE m.member = r.oid AND g.rolname = $2)
             FROM pg_catalog.pg_roles r
             WHERE starts_with(r.rolname, $1) AND r.rolname <> $2
               AND NOT starts_with(r.rolname, $3)
             ORDER BY 1",
            &[&prefix, &group.as_str(), &id.router_prefix()],
        )
        .await?
    {
        let name: String = row.get(0);
        if RoleName::parse(&name).is_err() {
            left_out.push(format!(
                "role {name}: not a tenant role name Tenantry makes"
            ));
            continue;
        }
        tenants.push(TenantRole {
            name,
            login: row.get(1),
            in_group: row.get(2),
        });
    }
    // Memberships Tenantry does not make: anything but a tenant role in the
    // group and the service in a tenant role.
    for row in client
        .query(
            "SELECT g.rolname::text, m.rolname::text
             FROM pg_catalog.pg_auth_members a
             JOIN pg_catalog.pg_roles g ON g.oid = a.roleid
             JOIN pg_catalog.pg_roles m ON m.oid = a.member
             WHERE (starts_with(g.rolname, $1) OR starts_with(m.rolname, $1))
               AND NOT (g.rolname = $2 AND starts_with(m.rolname, $1))
               AND NOT (starts_with(g.rolname, $1) AND m.rolname = current_user)
               AND NOT starts_with(m.rolname, $3)
             ORDER BY 1, 2",
            &[&prefix, &group.as_str(), &id.router_prefix()],
        )
        .await?
    {
        let (granted, member): (String, String) = (row.get(0), row.get(1));
        left_out.push(format!("membership of {member} in {granted}"));
    }
    // Named r0 to r<n-1>: a restore makes that many (one dropped by hand
    // leaves a gap, which a restore fills).
    let routers: i64 = client
        .query_one(
            "SELECT coalesce(max(substr(rolname, length($1) + 1)::int) + 1, 0)::int8
             FROM pg_catalog.pg_roles
             WHERE starts_with(rolname, $1) AND substr(rolname, length($1) + 1) ~ '^[0-9]{1,2}$'",
            &[&id.router_prefix()],
        )
        .await?
        .get(0);
    Ok(Found {
        routers: usize::try_from(routers).unwrap_or(0),
        tenants,
        left_out,
    })
}

/// The roles a restore makes, validated: the group, then each tenant role.
#[derive(Debug)]
pub struct Plan {
    group: RoleName,
    tenants: Vec<(RoleName, TenantRole)>,
    /// The router roles (`db::routers`), made bare: `NOLOGIN NOINHERIT`,
    /// members of nothing, until `serve` takes them over.
    routers: Vec<RoleName>,
}

impl Plan {
    /// From a backup's manifest: every name must be a tenant role of
    /// `installation`.
    pub fn new(installation: &InstallationId, tenants: &[TenantRole]) -> Result<Plan, String> {
        let prefix = format!("tnt_{}_", installation.as_str());
        let tenants = tenants
            .iter()
            .map(|t| match RoleName::parse(&t.name) {
                Ok(role) if role.as_str().starts_with(&prefix) => Ok((role, t.clone())),
                _ => Err(format!(
                    "{} is not a tenant role of installation {}",
                    t.name,
                    installation.as_str()
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Plan {
            group: installation.group_role(),
            tenants,
            routers: Vec::new(),
        })
    }

    /// With `installation`'s `count` router roles.
    pub fn with_routers(mut self, installation: &InstallationId, count: usize) -> Plan {
        self.routers = (0..count.min(64))
            .map(|k| installation.router_role(k))
            .collect();
        self
    }

    pub fn group(&self) -> &RoleName {
        &self.group
    }

    pub fn len(&self) -> usize {
        self.tenants.len() + 1 + self.routers.len()
    }

    fn names(&self) -> impl Iterator<Item = &RoleName> {
        std::iter::once(&self.group)
            .chain(self.tenants.iter().map(|(r, _)| r))
            .chain(&self.routers)
    }

    /// The statements that make one role (`CREATE ROLE` unless it exists),
    /// with the memberships provisioning gives it: the service in the
    /// tenant role (to act as it), the tenant role in the group.
    fn statements(&self, role: &RoleName, create: bool) -> String {
        let mut sql = String::new();
        if *role == self.group {
            if create {
                sql.push_str(&format!("CREATE ROLE {} NOLOGIN;\n", role.quoted()));
            }
            return sql;
        }
        if self.routers.contains(role) {
            let verb = if create { "CREATE" } else { "ALTER" };
            sql.push_str(&format!(
                "{verb} ROLE {} NOLOGIN NOINHERIT;\n",
                role.quoted()
            ));
            return sql;
        }
        let (_, spec) = self
            .tenants
            .iter()
            .find(|(r, _)| r == role)
            .expect("a role of the plan");
        if create {
            let login = if spec.login { "LOGIN" } else { "NOLOGIN" };
            sql.push_str(&format!("CREATE ROLE {} {login};\n", role.quoted()));
        }
        sql.push_str(&format!("GRANT {} TO CURRENT_USER;\n", role.quoted()));
        if spec.in_group {
            sql.push_str(&format!(
                "GRANT {} TO {};\n",
                self.group.quoted(),
                role.quoted()
            ));
        }
        sql
    }

    /// The statements that make the roles, or only give the memberships of
    /// those in `existing`.
    pub fn sql(&self, existing: &HashSet<String>) -> String {
        self.names()
            .map(|role| self.statements(role, !existing.contains(role.as_str())))
            .collect()
    }

    /// All of it as one script, for `roles.sql`: what `restore` runs, for
    /// restoring by hand (as the service role, before `pg_restore`).
    pub fn script(&self, installation: &InstallationId) -> String {
        let mut sql = format!(
            "-- The roles of Tenantry installation {}, which a dump of its database\n\
             -- leaves out. `tenantry restore` makes them; by hand, run this as the\n\
             -- service role (LOGIN CREATEROLE, owner of the database) before pg_restore.\n",
            installation.as_str()
        );
        for role in self.names() {
            sql.push_str(&self.statements(role, true));
        }
        sql
    }
}

/// Which of the plan's roles exist already in the target cluster, having
/// checked that each of those can be taken over: one made by hand from
/// `roles.sql` owns nothing and holds no privilege anywhere. One that does (the
/// installation still lives in another database of this cluster), or that
/// has attributes Tenantry never gives, is refused (exit 2) before anything
/// is changed.
pub async fn existing(
    client: &tokio_postgres::Client,
    plan: &Plan,
) -> Result<HashSet<String>, Failure> {
    let names: Vec<&str> = plan.names().map(RoleName::as_str).collect();
    let logins: std::collections::HashMap<&str, bool> = plan
        .tenants
        .iter()
        .map(|(r, t)| (r.as_str(), t.login))
        .chain([(plan.group.as_str(), false)])
        .chain(plan.routers.iter().map(|r| (r.as_str(), false)))
        .collect();
    let mut found = HashSet::new();
    let mut in_use = Vec::new();
    for row in client
        .query(
            "SELECT r.rolname::text, r.rolcanlogin,
                    r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend d
                            WHERE d.refclassid = 'pg_catalog.pg_authid'::regclass AND d.refobjid = r.oid)
             FROM pg_catalog.pg_roles r WHERE r.rolname::text = ANY($1::text[])
             ORDER BY 1",
            &[&names],
        )
        .await?
    {
        let name: String = row.get(0);
        let (login, privileged, used): (bool, bool, bool) = (row.get(1), row.get(2), row.get(3));
        // A router may log in (`serve` made it so); it is made bare again.
        let router = plan.routers.iter().any(|r| r.as_str() == name);
        if privileged || (!router && Some(&login) != logins.get(name.as_str())) {
            return Err(Failure::Usage(format!(
                "role {name} exists in this cluster with other attributes than Tenantry gives it: \
                 it is not this installation's; drop or rename it, or restore into another cluster"
            )));
        }
        if used {
            in_use.push(name.clone());
        }
        found.insert(name);
    }
    if let Some(first) = in_use.first() {
        return Err(Failure::Usage(format!(
            "{} of this installation's roles exist in this cluster and own objects or hold privileges \
             (e.g. {first}): the installation still lives in a database of this cluster. Roles are \
             shared by the whole cluster, so a copy cannot live beside it: restore into another \
             cluster, or erase the old installation first",
            in_use.len()
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installation() -> InstallationId {
        InstallationId::parse("ab12cd34").unwrap()
    }

    fn tenant(name: &str, in_group: bool) -> TenantRole {
        TenantRole {
            name: name.into(),
            login: false,
            in_group,
        }
    }

    #[test]
    fn the_script_makes_the_group_then_each_tenant_role_as_provisioning_does() {
        let plan = Plan::new(
            &installation(),
            &[
                tenant("tnt_ab12cd34_alice", true),
                tenant("tnt_ab12cd34_bob", false),
            ],
        )
        .unwrap();
        let script = plan.script(&installation());
        let statements: Vec<&str> = script.lines().filter(|l| !l.starts_with("--")).collect();
        assert_eq!(
            statements,
            [
                r#"CREATE ROLE "tnt_ab12cd34__tenants" NOLOGIN;"#,
                r#"CREATE ROLE "tnt_ab12cd34_alice" NOLOGIN;"#,
                r#"GRANT "tnt_ab12cd34_alice" TO CURRENT_USER;"#,
                r#"GRANT "tnt_ab12cd34__tenants" TO "tnt_ab12cd34_alice";"#,
                r#"CREATE ROLE "tnt_ab12cd34_bob" NOLOGIN;"#,
                r#"GRANT "tnt_ab12cd34_bob" TO CURRENT_USER;"#,
            ]
        );
        assert_eq!(plan.len(), 3);
    }

    #[test]
    fn a_role_that_exists_only_gets_its_memberships() {
        let plan = Plan::new(&installation(), &[tenant("tnt_ab12cd34_alice", true)]).unwrap();
        let alice = RoleName::parse("tnt_ab12cd34_alice").unwrap();
        assert!(!plan.statements(&alice, false).contains("CREATE"));
        assert!(plan.statements(&alice, false).contains("GRANT"));
    }

    #[test]
    fn names_that_are_not_the_installations_tenant_roles_are_refused() {
        for name in [
            "tnt_ffffffff_alice",
            "tnt_ab12cd34__tenants",
            "postgres",
            "tnt_ab12cd34_x\"; DROP ROLE postgres; --",
        ] {
            assert!(
                Plan::new(&installation(), &[tenant(name, true)]).is_err(),
                "{name}"
            );
        }
    }
}
