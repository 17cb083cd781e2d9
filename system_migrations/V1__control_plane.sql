-- The control plane, private to the service. The schema itself is created
-- by the bootstrap (under an advisory lock) before refinery runs, because
-- refinery's own history table lives in it.

-- One row: this database's installation id. Roles are cluster-wide, so tenant
-- role names carry it (tnt_<id>_<username>) to keep several Tenantry
-- databases in one cluster apart.
CREATE TABLE tenantry.installation (
    id          text PRIMARY KEY
                DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 8)
                CHECK (id ~ '^[a-z0-9]{8}$'),
    singleton   boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenantry.installation DEFAULT VALUES;

CREATE TABLE tenantry.users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    username       text NOT NULL UNIQUE CHECK (username ~ '^[a-z][a-z0-9_]{2,31}$'),
    email          text NOT NULL UNIQUE CHECK (email = lower(email)),
    password_hash  text NOT NULL,
    role           text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin', 'auditor')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    last_login_at  timestamptz
);

-- The tenant registry: a row exists exactly when the tenant's schema and role
-- exist (they are created and dropped in the same transaction).
CREATE TABLE tenantry.tenants (
    user_id           uuid PRIMARY KEY REFERENCES tenantry.users (id) ON DELETE CASCADE,
    username          text NOT NULL UNIQUE,
    schema_name       text NOT NULL UNIQUE CHECK (schema_name = 'tenant_' || username),
    role_name         text NOT NULL UNIQUE,
    template_version  integer NOT NULL CHECK (template_version >= 1),
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'migrating', 'failed', 'deleting')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenants_template_version_idx ON tenantry.tenants (template_version);

-- Refresh tokens, stored only as SHA-256 hashes, grouped in rotation families.
CREATE TABLE tenantry.refresh_tokens (
    id          bigserial PRIMARY KEY,
    family_id   uuid NOT NULL,
    user_id     uuid NOT NULL REFERENCES tenantry.users (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON tenantry.refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON tenantry.refresh_tokens (user_id);
