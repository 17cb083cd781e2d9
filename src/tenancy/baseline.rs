//! Checking a baseline (`B<m>__<name>.sql`, `tenancy::templates`) before
//! any tenant is built from it: in a transaction rolled back, two scratch
//! tenants, one built by V1..V<m> in turn and one by the baseline, each as
//! its own role; then what PostgreSQL says of the two schemas ([`DESCRIBE`])
//! must be the same, line for line.
//!
//! Why a baseline at all: some DDL costs more the more tenants a database
//! holds. Rewriting a table (`ALTER TABLE … ADD COLUMN … GENERATED …
//! STORED`, the built-in V5) makes PostgreSQL 15.20 read every index
//! definition in the database (it looks for uses of the table's row type
//! that have no dependency recorded): 8 ms on an empty database, 43 ms at
//! 10,000 tenants, half of building a tenant (docs/benchmarks.md). A
//! baseline that creates the column with its table builds the same schema
//! in the same time at any size.

use crate::db::Installation;
use crate::domain::TemplateVersion;
use crate::tenancy::apply::TemplateApplication;
use crate::tenancy::templates::TemplateSet;

/// One line per fact about schema `$1`: its relations (persistence, row
/// security, options, partitioning, grants), columns in order (type,
/// nullability, default or generation expression, owned sequence, grants),
/// sequences, inheritance, constraints, indexes, user triggers (enabled or
/// not), rules, views, functions (and their grants), types (enum labels,
/// domains) and policies, sorted, with the schema's name written `S` and
/// the tenant role's (`$2`) `R`. Not compared: owners (every object a
/// template makes is the tenant's: `lint` refuses a change of role),
/// comments, and the rows a template inserts. Run with the schema alone on the search path,
/// so that names in expressions are written unqualified.
pub const DESCRIBE: &str = "
WITH s AS (SELECT oid, nspname FROM pg_catalog.pg_namespace WHERE nspname = $1),
facts AS (
  SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' ' || c.relpersistence::text
         || ' rls=' || c.relrowsecurity::text || ' force=' || c.relforcerowsecurity::text
         || ' options=' || coalesce(c.reloptions::text, '-')
         || ' partition=' || coalesce(pg_catalog.pg_get_partkeydef(c.oid), '-')
         || ' bound=' || coalesce(pg_catalog.pg_get_expr(c.relpartbound, c.oid), '-')
         || ' acl=' || coalesce((SELECT string_agg(a.grantee::regrole::text || ':' || a.privilege_type
                                 || ':' || a.is_grantable::text, ',' ORDER BY 1)
                                 FROM pg_catalog.aclexplode(c.relacl) a), '-') AS fact
  FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid
  UNION ALL
  SELECT 'column ' || c.relname || '.' || a.attname || ' #'
         || (row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum))::text || ' '
         || pg_catalog.format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull::text
         || ' generated=' || a.attgenerated::text || ' identity=' || a.attidentity::text
         || ' default=' || coalesce(pg_catalog.pg_get_expr(d.adbin, d.adrelid), '-')
         || ' collation=' || a.attcollation::text
         || ' serial=' || coalesce(pg_catalog.pg_get_serial_sequence(c.oid::regclass::text, a.attname), '-')
         || ' acl=' || coalesce((SELECT string_agg(x.grantee::regrole::text || ':' || x.privilege_type,
                                 ',' ORDER BY 1) FROM pg_catalog.aclexplode(a.attacl) x), '-')
  FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
  UNION ALL
  SELECT 'sequence ' || c.relname || ' ' || pg_catalog.format_type(q.seqtypid, NULL) || ' ' || q.seqstart::text
         || ' ' || q.seqincrement::text || ' ' || q.seqmin::text || ' ' || q.seqmax::text
         || ' ' || q.seqcache::text || ' ' || q.seqcycle::text
  FROM pg_catalog.pg_sequence q JOIN pg_catalog.pg_class c ON c.oid = q.seqrelid
  JOIN s ON c.relnamespace = s.oid
  UNION ALL
  SELECT 'inherits ' || c.relname || ' ' || p.relname || ' #' || i.inhseqno::text
  FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
  JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN s ON c.relnamespace = s.oid
  UNION ALL
  SELECT 'constraint ' || coalesce(r.relname, t.typname, '-') || ' ' || k.conname || ' '
         || pg_catalog.pg_get_constraintdef(k.oid)
  FROM pg_catalog.pg_constraint k JOIN s ON k.connamespace = s.oid
  LEFT JOIN pg_catalog.pg_class r ON r.oid = k.conrelid
  LEFT JOIN pg_catalog.pg_type t ON t.oid = k.contypid
  UNION ALL
  SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
  FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
  JOIN s ON c.relnamespace = s.oid
  UNION ALL
  SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
  FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN s ON c.relnamespace = s.oid WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'rule ' || r.tablename || ' ' || r.rulename || ' ' || r.definition
  FROM pg_catalog.pg_rules r JOIN s ON r.schemaname = s.nspname
  UNION ALL
  SELECT 'view ' || c.relname || ' ' || pg_catalog.pg_get_viewdef(c.oid)
  FROM pg_catalog.pg_class c JOIN s ON c.relnamespace = s.oid WHERE c.relkind IN ('v', 'm')
  UNION ALL
  SELECT 'function ' || p.proname || ' ' || p.prokind::text || ' '
         || pg_catalog.pg_get_function_identity_arguments(p.oid) || ' '
         || CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid) ELSE '' END
         || ' acl=' || coalesce((SELECT string_agg(x.grantee::regrole::text || ':' || x.privilege_type,
                                 ',' ORDER BY 1) FROM pg_catalog.aclexplode(p.proacl) x), '-')
  FROM pg_catalog.pg_proc p JOIN s ON p.pronamespace = s.oid
  UNION ALL
  SELECT 'type ' || t.typname || ' ' || t.typtype::text
         || ' base=' || CASE WHEN t.typtype = 'd' THEN pg_catalog.format_type(t.typbasetype, t.typtypmod) ELSE '-' END
         || ' notnull=' || t.typnotnull::text
         || ' labels=' || coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                                    FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid), '-')
  FROM pg_catalog.pg_type t JOIN s ON t.typnamespace = s.oid
  UNION ALL
  SELECT 'policy ' || c.relname || ' ' || p.polname || ' ' || p.polcmd::text
         || ' permissive=' || p.polpermissive::text
         || ' to=' || coalesce((SELECT string_agg(CASE WHEN o = 0 THEN 'public' ELSE o::regrole::text END,
                                 ',' ORDER BY 1) FROM unnest(p.polroles) o), '-') || ' '
         || coalesce(pg_catalog.pg_get_expr(p.polqual, p.polrelid), '-') || ' '
         || coalesce(pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid), '-')
  FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid = p.polrelid
  JOIN s ON c.relnamespace = s.oid
)
SELECT replace(replace(fact, (SELECT nspname FROM s), 'S'), $2, 'R') AS fact FROM facts ORDER BY 1";

/// Why a baseline is not used.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("baseline {file} does not build what V1..V{version} build: {difference}")]
    Differs {
        file: String,
        version: i32,
        difference: String,
    },
    #[error("baseline {file} fails to build a tenant: {source}")]
    DoesNotBuild {
        file: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Check `set`'s baseline, if it has one (see the module's documentation),
/// on `client`, a connection of the caller's that is in no transaction.
/// Local to this node on Citus (nothing is propagated).
pub async fn check(
    client: &tokio_postgres::Client,
    installation: &Installation,
    set: &TemplateSet,
) -> Result<(), BaselineError> {
    let Some(baseline) = set.baseline() else {
        return Ok(());
    };
    let file = baseline.template().file_name();
    // Up to the baseline's own version: the versions after it then run on
    // a schema that is the same in every respect `DESCRIBE` knows (and
    // running them here would run every version at each start, a slow
    // or lock-taking one included).
    let to = baseline.template().version();
    client.batch_execute("BEGIN").await?;
    let described = async {
        client
            .execute(
                "SELECT set_config('citus.enable_ddl_propagation', 'off', true)",
                &[],
            )
            .await?;
        let by_versions = scratch(client, installation, set, to, false)
            .await
            .map_err(BaselineError::Postgres)?;
        let by_baseline = scratch(client, installation, set, to, true)
            .await
            .map_err(|source| BaselineError::DoesNotBuild {
                file: file.clone(),
                source,
            })?;
        Ok::<_, BaselineError>((by_versions, by_baseline))
    }
    .await;
    let rolled_back = client.batch_execute("ROLLBACK").await;
    let (by_versions, by_baseline) = described?;
    rolled_back?;
    match first_difference(&by_versions, &by_baseline) {
        None => Ok(()),
        Some(difference) => Err(BaselineError::Differs {
            file,
            version: to.get(),
            difference,
        }),
    }
}

/// A scratch tenant built up to `to` (from the baseline or by the
/// versions), described.
async fn scratch(
    client: &tokio_postgres::Client,
    installation: &Installation,
    set: &TemplateSet,
    to: TemplateVersion,
    from_baseline: bool,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let (schema, role) = crate::provisioning::scratch_tenant(client, installation).await?;
    let application = if from_baseline {
        TemplateApplication::building(&schema, &role, set, to)
    } else {
        TemplateApplication::new(&schema, &role, set.between(0, to))
    };
    for (_, request) in application.requests(client) {
        request.await?;
    }
    client
        .batch_execute(&format!("SET LOCAL search_path TO {}", schema.quoted()))
        .await?;
    let rows = client
        .query(DESCRIBE, &[&schema.as_str(), &role.as_str()])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The first line one description has and the other lacks, said.
fn first_difference(by_versions: &[String], by_baseline: &[String]) -> Option<String> {
    let only = |a: &[String], b: &[String]| a.iter().find(|l| !b.contains(l)).cloned();
    match (
        only(by_versions, by_baseline),
        only(by_baseline, by_versions),
    ) {
        (Some(line), _) => Some(format!("the versions make `{line}`, the baseline does not")),
        (None, Some(line)) => Some(format!("the baseline makes `{line}`, the versions do not")),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::first_difference;

    #[test]
    fn the_first_difference_names_what_one_side_lacks() {
        let v: Vec<String> = vec!["column S.t.a".into(), "index x".into()];
        let b: Vec<String> = vec!["column S.t.a".into()];
        let said = first_difference(&v, &b).unwrap();
        assert!(said.contains("the versions make `index x`"), "{said}");
        let said = first_difference(&b, &v).unwrap();
        assert!(said.contains("the baseline makes `index x`"), "{said}");
        assert_eq!(first_difference(&v, &v), None);
    }
}
