-- Webhooks (`webhooks`): endpoints admins register, the events written in
-- the transaction of each change (the outbox: a rolled-back change leaves
-- none, a committed one always has its rows), and one delivery per event
-- and endpoint, sent at least once by `serve`, in order per tenant.
CREATE TABLE tenantry.webhooks (
    id           bigserial PRIMARY KEY,
    url          text NOT NULL CHECK (url ~ '^https?://'),
    -- `whsec_` + base64 of the key: shown once, when the endpoint is added.
    secret       text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    -- The event types it gets; NULL: every type.
    event_types  text[],
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenantry.events (
    id          bigserial PRIMARY KEY,
    -- `webhook-id`: the same for every attempt of every endpoint.
    msg_id      uuid NOT NULL UNIQUE,
    type        text NOT NULL,
    -- The tenant's user id, which orders its events; NULL for fleet events.
    tenant      uuid,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_tenant_idx ON tenantry.events (tenant, id);
CREATE INDEX events_created_idx ON tenantry.events (created_at);

CREATE TABLE tenantry.webhook_deliveries (
    webhook_id       bigint NOT NULL REFERENCES tenantry.webhooks (id) ON DELETE CASCADE,
    event_id         bigint NOT NULL REFERENCES tenantry.events (id) ON DELETE CASCADE,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claimed_until    timestamptz,
    delivered_at     timestamptz,
    dead_at          timestamptz,
    last_status      integer,
    last_error       text,
    PRIMARY KEY (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON tenantry.webhook_deliveries (event_id)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX webhook_deliveries_event_idx ON tenantry.webhook_deliveries (event_id);
