-- What this database runs on: plain PostgreSQL, or a Citus coordinator
-- (each tenant schema a distributed schema on one worker; `reference` as
-- Citus reference tables; the control plane local to the coordinator).
-- Bootstrap sets it when it finds the citus extension in the database.
ALTER TABLE tenantry.installation
    ADD COLUMN mode text NOT NULL DEFAULT 'postgres' CHECK (mode IN ('postgres', 'citus'));
