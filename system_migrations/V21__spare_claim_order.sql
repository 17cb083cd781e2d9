-- The order a signup takes spares in (`tenancy::spares::claim`): a spare
-- whose schema is built at the newest version first (V20), then the oldest.
-- One index for the spares of one router, one for all of them (an
-- installation without router roles), so that a claim reads the first
-- spare free instead of sorting the stock.
DROP INDEX tenantry.spare_roles_claim;
CREATE INDEX spare_roles_claim
    ON tenantry.spare_roles (router, template_version DESC NULLS LAST, made_at, role_name);
CREATE INDEX spare_roles_claim_any
    ON tenantry.spare_roles (template_version DESC NULLS LAST, made_at, role_name);
