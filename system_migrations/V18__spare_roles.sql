-- Tenant roles made ahead of time (issue 28). PostgreSQL keeps, in every
-- session, the list of roles its login role is a member of, and throws it
-- away on any change to pg_authid or pg_auth_members; rebuilding it costs
-- time quadratic in the number of memberships on PostgreSQL 15. A signup
-- that made its own role (CREATE ROLE, two GRANTs) made every pooled
-- connection rebuild a list as long as the fleet. `tenancy::spares` makes
-- roles in batches instead (one change for a whole batch), each already a
-- member of the tenants' group and with the service a member of it; a
-- signup takes one in its transaction (DELETE … FOR UPDATE SKIP LOCKED),
-- so a rolled-back or killed signup leaves its role a spare. The names
-- (`tnt_<installation>__t<16 hex>`) carry no username.
CREATE TABLE tenantry.spare_roles (
    role_name text PRIMARY KEY,
    made_at   timestamptz NOT NULL DEFAULT now()
);
