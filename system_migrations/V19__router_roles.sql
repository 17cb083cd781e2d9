-- Router roles (issue 28). The request pool's connections log in as a few
-- router roles, `tnt_<installation>__r<k>`, each a member of only its
-- share of the tenant roles (a tenant's router is its user id modulo the
-- number of routers), so that a session's list of the roles it may act as
-- is the fleet's share, not the fleet: PostgreSQL rebuilds that list on
-- every change to any role, and on a session's first `SET ROLE`. The
-- routers are made by `serve` (`db::routers`), which records their number
-- here (0: none; the request pool then logs in as the service).
ALTER TABLE tenantry.installation ADD COLUMN routers int NOT NULL DEFAULT 0;

-- Each spare tenant role is a member of one router already, so that a
-- signup takes one of its router's and still changes no role. Spares made
-- before this migration belong to no router yet (-1) until `serve` hands
-- them over.
ALTER TABLE tenantry.spare_roles ADD COLUMN router int NOT NULL DEFAULT -1;
CREATE INDEX spare_roles_claim ON tenantry.spare_roles (router, made_at, role_name);

-- The routers' passwords, for a server whose pg_hba.conf wants one (the
-- embedded cluster trusts its socket): generated once, read only by the
-- service.
CREATE TABLE tenantry.router_logins (
    router   int PRIMARY KEY,
    password text NOT NULL
);
REVOKE ALL ON tenantry.router_logins FROM PUBLIC;
