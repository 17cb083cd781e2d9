-- Rate limits shared by every `serve` on the database (issue 24): one GCRA
-- bucket per limited client and class (`auth:<ip>`, `anon:<ip>`), its
-- theoretical arrival time (`tat`) advanced by one statement per request
-- (`api::middleware::SHARED_TAKE`). A bucket whose `tat` has passed is full
-- again and is purged by the maintenance loop. UNLOGGED: after a crash the
-- limits start afresh, which costs nothing but a minute's allowance, and no
-- WAL is written per request.
CREATE UNLOGGED TABLE tenantry.rate_limits (
    bucket text PRIMARY KEY CHECK (length(bucket) <= 100),
    tat    timestamptz NOT NULL
);
