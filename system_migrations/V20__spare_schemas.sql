-- Spare tenant schemas (issue 28). A signup that ran the templates itself
-- spent most of its time in DDL (60–270 ms at 10,000 tenants), inside its
-- transaction and beside every request. `tenancy::spares` now builds, in
-- the background and one at a time, a schema for some spare roles: the
-- templates applied as that role, its history written, named
-- `tenant__s<16 hex>` (no username can produce a double underscore). A
-- signup that takes such a spare renames the schema to `tenant_<username>`
-- and applies only the versions published since it was built. Both columns
-- are NULL for a spare that is a role only.
ALTER TABLE tenantry.spare_roles
    ADD COLUMN schema_name text UNIQUE,
    ADD COLUMN template_version int,
    ADD CONSTRAINT spare_roles_schema_and_version
        CHECK ((schema_name IS NULL) = (template_version IS NULL));
