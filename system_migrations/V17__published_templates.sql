-- Templates published in the control plane (issue 24): the database holds
-- each template version's text, so every process (every `serve`, every
-- command, on every machine) reads the same set from here. The built-in
-- templates and TENANTRY_TEMPLATES_DIR only propose versions to publish
-- (`tenantry templates publish`, `fleet migrate`, `serve` at start).
--
-- Rows recorded before this migration have no text yet: every process
-- fills it from its own copy where name and checksum match
-- (`tenancy::publication`); what no copy has is reported with the fix.
ALTER TABLE tenantry.templates
    ADD COLUMN sql    text,
    ADD COLUMN origin text;
COMMENT ON COLUMN tenantry.templates.recorded_at IS 'when the version was published';

-- A published version never changes and is never taken back: its number,
-- name and checksum are what tenants were built from. Only its text may be
-- written (filled in, or put back to what the checksum says).
CREATE FUNCTION tenantry.published_templates_stay() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'published template V% may not be removed', OLD.version
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.version <> OLD.version OR NEW.name <> OLD.name OR NEW.checksum <> OLD.checksum
       OR NEW.recorded_at <> OLD.recorded_at OR NEW.origin IS DISTINCT FROM OLD.origin THEN
        RAISE EXCEPTION 'published template V% may not change: put the change in a new version', OLD.version
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER published_templates_stay
    BEFORE UPDATE OR DELETE ON tenantry.templates
    FOR EACH ROW EXECUTE FUNCTION tenantry.published_templates_stay();
CREATE FUNCTION tenantry.published_templates_not_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'published templates may not be removed' USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER published_templates_not_truncated
    BEFORE TRUNCATE ON tenantry.templates
    FOR EACH STATEMENT EXECUTE FUNCTION tenantry.published_templates_not_truncated();

-- The first statement of every transaction that provisions a tenant (a
-- signup, an import): `latest` is the newest version the process knows is
-- published. Under a lock that publishing waits for (EXCLUSIVE conflicts
-- with ROW SHARE), a newer version refuses the transaction with TY003, and
-- the process reads the published set again and retries. So no tenant is
-- ever provisioned behind a version published before it committed: a fleet
-- run that plans after a publication sees every tenant made before it.
CREATE FUNCTION tenantry.provisioning_at(latest integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    newest integer;
BEGIN
    LOCK TABLE tenantry.templates IN ROW SHARE MODE;
    SELECT max(version) INTO newest FROM tenantry.templates;
    IF newest IS DISTINCT FROM latest THEN
        RAISE EXCEPTION 'template V% is published; this process knew V%', newest, latest
            USING ERRCODE = 'TY003';
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION tenantry.provisioning_at(integer) FROM PUBLIC;
