-- Spare tenant schemas on Citus (issue 25). Citus distributes a schema only
-- once it is committed, so `tenancy::spares` builds a spare's schema there
-- in two transactions: the empty schema first (its name recorded, no
-- version yet), then the templates, `citus_schema_distribute` and the
-- version. A spare with a schema and no version is one being built (or cut
-- off between the two: the next build finishes it); only a spare with a
-- version is ever taken. A version still needs a schema.
ALTER TABLE tenantry.spare_roles
    DROP CONSTRAINT spare_roles_schema_and_version,
    ADD CONSTRAINT spare_roles_version_has_a_schema
        CHECK (template_version IS NULL OR schema_name IS NOT NULL);
