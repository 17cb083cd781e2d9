-- Webhook deliveries as queues (`webhooks::delivery`).
--
-- A change writes only its event (one row, no lock on an endpoint); the
-- sender expands events into deliveries later, one process at a time and
-- in the order the events became visible. Each (endpoint, tenant) is a
-- queue: only its oldest undelivered delivery has a due time, the ones
-- behind it wait at 'infinity' until it is delivered or dead. Claiming is
-- then a range scan of each endpoint's due heads, however long the queues
-- behind them grow.
ALTER TABLE tenantry.events ADD COLUMN expanded boolean NOT NULL DEFAULT true;
ALTER TABLE tenantry.events ALTER COLUMN expanded SET DEFAULT false;
CREATE INDEX events_unexpanded ON tenantry.events (id) WHERE NOT expanded;
-- Nothing looks events up by tenant or by msg_id (a random v4 UUID): two
-- index insertions fewer on every change that writes an event.
DROP INDEX tenantry.events_tenant_idx;
ALTER TABLE tenantry.events DROP CONSTRAINT events_msg_id_key;

ALTER TABLE tenantry.webhook_deliveries ADD COLUMN tenant uuid;
UPDATE tenantry.webhook_deliveries d SET tenant = e.tenant
  FROM tenantry.events e WHERE e.id = d.event_id;
CREATE INDEX webhook_deliveries_queue ON tenantry.webhook_deliveries (webhook_id, tenant, event_id)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
UPDATE tenantry.webhook_deliveries d SET next_attempt_at = 'infinity'
 WHERE d.delivered_at IS NULL AND d.dead_at IS NULL AND d.tenant IS NOT NULL
   AND EXISTS (SELECT FROM tenantry.webhook_deliveries o
               WHERE o.webhook_id = d.webhook_id AND o.tenant = d.tenant
                 AND o.event_id < d.event_id
                 AND o.delivered_at IS NULL AND o.dead_at IS NULL);
-- Claims go endpoint by endpoint (each has a cap of sends at once).
DROP INDEX tenantry.webhook_deliveries_due;
CREATE INDEX webhook_deliveries_due ON tenantry.webhook_deliveries (webhook_id, next_attempt_at)
    WHERE delivered_at IS NULL AND dead_at IS NULL;
