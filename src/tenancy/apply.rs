//! The one template applier: run template versions k..n in a tenant's
//! schema, as the tenant's role, and record them in the schema's
//! `refinery_schema_history`. Signup (`provisioning`) and the fleet share
//! it; both wrap it in one transaction of their own and send it, with the
//! rest of that transaction, as one pipeline (`db::pipeline`).

use futures::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};

use crate::domain::{RoleName, SchemaName};
use crate::tenancy::templates::Template;

/// The name of the per-tenant history table: refinery's own default, in the
/// tenant's schema, in refinery's format.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

/// What one pipelined request of an application was, to say what failed.
#[derive(Debug, Clone, Copy)]
pub enum ApplyStep<'t> {
    /// Entering the tenant: its schema first on the search path, its role.
    Enter,
    Template(&'t Template),
    /// Back to the service's role, to write the history.
    Leave,
    History,
}

/// Template versions to apply to one tenant, with the SQL that does it.
pub struct TemplateApplication<'t> {
    templates: &'t [Template],
    enter_sql: String,
    history_sql: String,
    versions: Vec<i32>,
    names: Vec<String>,
    checksums: Vec<String>,
}

pub type Request<'a> = BoxFuture<'a, Result<(), tokio_postgres::Error>>;

impl<'t> TemplateApplication<'t> {
    /// Apply `templates` (ascending, contiguous) to `schema` as `role`.
    pub fn new(
        schema: &SchemaName,
        role: &RoleName,
        templates: &'t [Template],
    ) -> TemplateApplication<'t> {
        // Identifiers are validated names, always quoted; every value below
        // is a bind parameter. Both settings end with the transaction.
        let enter_sql = format!(
            "SET LOCAL search_path TO {s}; SET LOCAL ROLE {r};",
            s = schema.quoted(),
            r = role.quoted()
        );
        let history_sql = format!(
            "INSERT INTO {s}.{HISTORY_TABLE} (version, name, applied_on, checksum)
             SELECT v, n, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), c
             FROM unnest($1::int4[], $2::text[], $3::text[]) AS h(v, n, c)",
            s = schema.quoted()
        );
        TemplateApplication {
            templates,
            enter_sql,
            history_sql,
            versions: templates.iter().map(|t| t.version().get()).collect(),
            names: templates.iter().map(|t| t.name().to_owned()).collect(),
            checksums: templates.iter().map(|t| t.checksum().to_string()).collect(),
        }
    }

    /// The requests, in order, for a pipeline on `client` inside an open
    /// transaction. One request per version, so a failure names its version.
    /// The tables belong to the tenant's role, which creates them.
    pub fn requests<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
    ) -> Vec<(ApplyStep<'t>, Request<'a>)> {
        let mut out: Vec<(ApplyStep<'t>, Request<'a>)> =
            Vec::with_capacity(self.templates.len() + 3);
        out.push((
            ApplyStep::Enter,
            Box::pin(client.batch_execute(&self.enter_sql)),
        ));
        for t in self.templates {
            out.push((
                ApplyStep::Template(t),
                Box::pin(client.batch_execute(t.sql())),
            ));
        }
        out.push((
            ApplyStep::Leave,
            Box::pin(client.batch_execute("RESET ROLE")),
        ));
        out.push((
            ApplyStep::History,
            Box::pin(async move {
                let params: [(&(dyn ToSql + Sync), Type); 3] = [
                    (&self.versions, Type::INT4_ARRAY),
                    (&self.names, Type::TEXT_ARRAY),
                    (&self.checksums, Type::TEXT_ARRAY),
                ];
                client
                    .execute_typed(&self.history_sql, &params)
                    .await
                    .map(drop)
            }),
        ));
        out
    }
}
