//! Citus: a database that is a Citus coordinator (the `citus` extension is
//! installed in it) runs Tenantry scaled out. Each tenant schema becomes a
//! distributed schema (one colocated unit on one worker), the `reference`
//! tables become Citus reference tables (a copy on every node, so a
//! tenant's shard joins them locally), and the control plane (`tenantry`)
//! stays in local tables on the coordinator. Plain PostgreSQL is untouched.
//!
//! Citus reaches the workers as the current role, so on Citus tenant roles
//! are `LOGIN` roles without a password: they are usable only where the
//! nodes trust each other's connections (see README, "Scaling out").

use crate::db::{DbError, Installation};

/// Whether the database is a Citus coordinator. If it is: make every
/// `reference` table a reference table (referenced tables first, as Citus
/// requires) and record the mode. Idempotent; runs inside bootstrap's lock.
pub(crate) async fn prepare(client: &tokio_postgres::Client) -> Result<bool, DbError> {
    let citus: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await?
        .get(0);
    if !citus {
        return Ok(false);
    }
    // Rounds: each takes the tables whose references (other than to
    // themselves) are all reference tables already. Making a table a
    // reference table turns the local tables that reference it into Citus
    // local tables (`partmethod 'n'`, `repmodel 's'`); they are converted
    // in a later round like the rest.
    loop {
        let ready = client
            .query(
                "SELECT c.oid FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = 'reference' AND c.relkind = 'r'
                   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                   WHERE p.logicalrelid = c.oid AND p.repmodel = 't')
                   AND NOT EXISTS (
                       SELECT 1 FROM pg_catalog.pg_constraint f
                       WHERE f.conrelid = c.oid AND f.contype = 'f' AND f.confrelid <> c.oid
                         AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                         WHERE p.logicalrelid = f.confrelid AND p.repmodel = 't'))
                 ORDER BY c.relname",
                &[],
            )
            .await?;
        if ready.is_empty() {
            break;
        }
        for row in ready {
            let oid: u32 = row.get(0);
            client
                .execute(
                    "SELECT pg_catalog.create_reference_table($1::oid::regclass)",
                    &[&oid],
                )
                .await?;
        }
    }
    client
        .execute(
            "UPDATE tenantry.installation SET mode = 'citus' WHERE mode <> 'citus'",
            &[],
        )
        .await?;
    Ok(true)
}

/// Citus reaches a tenant's shards on its worker as the tenant's role, so
/// tenant roles (through their group) may connect to the database — on the
/// coordinator that changes nothing (their routes never log in there), on
/// the workers it is what Citus needs. PUBLIC still may not (V7).
/// Propagated to every node by Citus.
pub(crate) async fn allow_tenant_connections(
    client: &tokio_postgres::Client,
    installation: &Installation,
) -> Result<(), DbError> {
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    client
        .batch_execute(&format!(
            "GRANT CONNECT ON DATABASE {} TO {}",
            crate::domain::quote_ident(&database),
            installation.group_role().quoted()
        ))
        .await?;
    Ok(())
}
