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

/// Records the applied versions ($2 versions, $3 names, $4 checksums) in the
/// history of schema $1. The one place that writes history rows is
/// `tenantry.record_history` (system_migrations/V6__fleet.sql); the fleet
/// calls it from `tenantry.fleet_claim`.
pub const RECORD_HISTORY: &str = "SELECT tenantry.record_history($1, $2, $3, $4)";

/// What one pipelined request of an application was, to say what failed.
#[derive(Debug, Clone, Copy)]
pub enum ApplyStep<'t> {
    /// A template version (the first also enters the tenant, the last
    /// leaves it).
    Template(&'t Template),
    History,
}

/// Template versions to apply to one tenant, with the SQL that does it.
pub struct TemplateApplication<'t> {
    templates: &'t [Template],
    schema: String,
    /// One batch per template; see `new`.
    batches: Vec<String>,
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
        // Identifiers are validated names, always quoted; every value is a
        // bind parameter. Entering the tenant (its schema first on the search
        // path, its role; both end with the transaction) rides with the first
        // template and leaving it (back to the service's role, to write the
        // history) with the last: fewer messages per tenant, which the fleet
        // sends thousands of times. The newline ends a trailing `--` comment.
        let enter = format!(
            "SET LOCAL search_path TO {s}; SET LOCAL ROLE {r};\n",
            s = schema.quoted(),
            r = role.quoted()
        );
        let last = templates.len().saturating_sub(1);
        let mut batches: Vec<String> = templates
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut sql = if i == 0 { enter.clone() } else { String::new() };
                sql.push_str(t.sql());
                if i == last {
                    sql.push_str("\n;RESET ROLE");
                }
                sql
            })
            .collect();
        if batches.is_empty() {
            batches.push(format!("{enter};RESET ROLE"));
        }
        TemplateApplication {
            templates,
            schema: schema.as_str().to_owned(),
            batches,
            versions: templates.iter().map(|t| t.version().get()).collect(),
            names: templates.iter().map(|t| t.name().to_owned()).collect(),
            checksums: templates.iter().map(|t| t.checksum().to_string()).collect(),
        }
    }

    /// The requests, in order, for a pipeline on `client` inside an open
    /// transaction: one request per version, so a failure names its version
    /// (the tables belong to the tenant's role, which creates them). The
    /// history is written after them, by `history_request` or by a function
    /// of the caller's that calls `tenantry.record_history` with
    /// `history_params`.
    pub fn requests<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
    ) -> Vec<(ApplyStep<'t>, Request<'a>)> {
        self.batches
            .iter()
            .enumerate()
            .map(|(i, sql)| {
                let step = match self.templates.get(i) {
                    Some(t) => ApplyStep::Template(t),
                    None => ApplyStep::History,
                };
                (step, Box::pin(client.batch_execute(sql)) as Request<'a>)
            })
            .collect()
    }

    /// Append `sql` to the last request (after `RESET ROLE`): the fleet ends
    /// its transaction there, saving a message per tenant.
    pub fn end_with(mut self, sql: &str) -> TemplateApplication<'t> {
        if let Some(last) = self.batches.last_mut() {
            last.push_str(";\n");
            last.push_str(sql);
        }
        self
    }

    /// The parameters of `RECORD_HISTORY`: schema, versions, names, checksums.
    pub fn history_params(&self) -> [(&(dyn ToSql + Sync), Type); 4] {
        [
            (&self.schema, Type::TEXT),
            (&self.versions, Type::INT4_ARRAY),
            (&self.names, Type::TEXT_ARRAY),
            (&self.checksums, Type::TEXT_ARRAY),
        ]
    }

    /// `RECORD_HISTORY` on its own, after `requests`.
    pub fn history_request<'a>(
        &'a self,
        client: &'a tokio_postgres::Client,
    ) -> (ApplyStep<'t>, Request<'a>) {
        (
            ApplyStep::History,
            Box::pin(async move {
                client
                    .execute_typed(RECORD_HISTORY, &self.history_params())
                    .await
                    .map(drop)
            }),
        )
    }
}
