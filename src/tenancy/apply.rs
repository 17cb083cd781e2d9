//! The one template applier: run template versions k..n in a tenant's
//! schema, as the tenant's role, and record them in the schema's
//! `refinery_schema_history`. Signup (`provisioning`) and the fleet share
//! it; both wrap it in one transaction of their own and send it, with the
//! rest of that transaction, as one pipeline (`db::pipeline`).

use futures::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};

use crate::domain::{RoleName, SchemaName};
use crate::tenancy::templates::{Template, TemplateSet};

pub use crate::db::HISTORY_TABLE;

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
    /// What runs: the versions, or a baseline and the versions after it.
    templates: Vec<&'t Template>,
    schema: String,
    role: String,
    /// What to send, in order, each with the index of the template it
    /// belongs to (`None`: entering or leaving the tenant); see `new`.
    batches: Vec<(Option<usize>, String)>,
    /// Citus: hand the objects the templates made to the tenant's role.
    give_to_tenant: bool,
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
        Self::running(schema, role, templates.iter().collect(), templates)
    }

    /// Build a schema that is empty (just made) up to `to`: from `set`'s
    /// baseline when it has one that fits (`TemplateSet::to_build`),
    /// recording V1..`to` in the history either way.
    pub fn building(
        schema: &SchemaName,
        role: &RoleName,
        set: &'t TemplateSet,
        to: crate::domain::TemplateVersion,
    ) -> TemplateApplication<'t> {
        Self::running(schema, role, set.to_build(to), set.between(0, to))
    }

    /// Run `templates`, record `recorded`.
    fn running(
        schema: &SchemaName,
        role: &RoleName,
        templates: Vec<&'t Template>,
        recorded: &'t [Template],
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
        let mut batches: Vec<(Option<usize>, String)> = templates
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut sql = if i == 0 { enter.clone() } else { String::new() };
                sql.push_str(t.sql());
                if i == last {
                    sql.push_str("\n;RESET ROLE");
                }
                (Some(i), sql)
            })
            .collect();
        if batches.is_empty() {
            batches.push((None, format!("{enter};RESET ROLE")));
        }
        TemplateApplication {
            schema: schema.as_str().to_owned(),
            role: role.as_str().to_owned(),
            batches,
            give_to_tenant: false,
            versions: recorded.iter().map(|t| t.version().get()).collect(),
            names: recorded.iter().map(|t| t.name().to_owned()).collect(),
            checksums: recorded.iter().map(|t| t.checksum().to_string()).collect(),
            templates,
        }
    }

    /// The same on a Citus coordinator, for a tenant whose schema is
    /// distributed already (a fleet migration). Citus refuses a transaction
    /// that touches a tenant's shards as two roles in turn, and the history
    /// is the service's: so the templates run as the service (a member of
    /// the tenant's role, so it may alter the tenant's tables), the objects
    /// they create are then given to the tenant's role
    /// (`tenantry.give_to_tenant`), and the history is written by the same
    /// service. Each statement is its own message: Citus forwards a
    /// multi-statement string's whole text to the workers for some DDL
    /// (`CREATE INDEX`), which they refuse.
    pub fn for_citus(
        schema: &SchemaName,
        role: &RoleName,
        templates: &'t [Template],
    ) -> TemplateApplication<'t> {
        let mut application = TemplateApplication::new(schema, role, templates);
        let mut batches = vec![(
            None,
            format!("SET LOCAL search_path TO {}", schema.quoted()),
        )];
        for (i, t) in templates.iter().enumerate() {
            batches.extend(
                crate::tenancy::lint::split(t.sql())
                    .into_iter()
                    .map(|statement| (Some(i), statement)),
            );
        }
        application.batches = batches;
        application.give_to_tenant = true;
        application
    }

    /// Nothing to apply (a spare built at the newest version).
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
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
        let mut requests: Vec<(ApplyStep<'t>, Request<'a>)> = self
            .batches
            .iter()
            .map(|(i, sql)| {
                let step = match i.and_then(|i| self.templates.get(i)) {
                    Some(t) => ApplyStep::Template(t),
                    None => ApplyStep::History,
                };
                (step, Box::pin(client.batch_execute(sql)) as Request<'a>)
            })
            .collect();
        if self.give_to_tenant {
            requests.push((
                ApplyStep::History,
                Box::pin(async move {
                    client
                        .execute(
                            "SELECT tenantry.give_to_tenant($1, $2)",
                            &[&self.schema, &self.role],
                        )
                        .await
                        .map(drop)
                }),
            ));
        }
        requests
    }

    /// Append `sql` to the last request (after `RESET ROLE`): the fleet ends
    /// its transaction there, saving a message per tenant.
    pub fn end_with(mut self, sql: &str) -> TemplateApplication<'t> {
        if let Some((_, last)) = self.batches.last_mut() {
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
