//! Prometheus metrics (`metrics` + `metrics-exporter-prometheus`, no HTTP
//! listener of its own: `GET /metrics` renders them). Names:
//!
//! - `http_requests_total{method,route,status}`, `http_request_duration_seconds`
//!   (histogram): labelled by the route *pattern* (`/api/experiences/{id}`),
//!   never by tenant or raw path; unmatched paths are `unmatched`;
//! - `tenantry_provisioning_duration_seconds` (histogram), per signup;
//! - `tenantry_database_errors_total{kind}` (`unavailable`, `pool`, `query`,
//!   `timeout`);
//! - `tenantry_db_connect_retries_total`: connects tried again because the
//!   server's listen queue was full (`db::Connector`);
//! - `tenantry_membership_resets_total`: `routing::MEND`s sent;
//! - `tenantry_clients_cut_off_total`: connections ended because the client
//!   stopped reading (`transport::Stalling`);
//! - `tenantry_exports_total{outcome}` (`completed`, `cut_off`, `refused_busy`, …) and the
//!   gauge `tenantry_exports_running` (`api::exports`);
//! - read at scrape time from the database and the pool:
//!   `tenantry_tenants{template_version}`, `tenantry_tenants_pending_migration`,
//!   `tenantry_fleet_run_tenants{run,state}` (planned, succeeded, failed,
//!   skipped, pending of the latest run), `tenantry_fleet_run_running`,
//!   `tenantry_pool_connections{state}` (max, open, idle, in_use),
//!   `tenantry_pool_waiting`, `tenantry_outbox_mails{state}` (pending, dead),
//!   `tenantry_spare_roles` and `tenantry_spare_schemas` (`tenancy::spares`),
//!   `tenantry_router_roles`
//!   (`db::routers`: the routers the pool logs in as, 0 for none),
//!   `tenantry_tenants_by_usage_bytes{le}` (cumulative counts of measured
//!   tenants by bytes, no tenant named), `tenantry_tenants_usage_bytes_sum`
//!   and `tenantry_tenants_over_quota` (`tenancy::usage`);
//! - `tenantry_mail_sent_total`, `tenantry_mail_failed_attempts_total`,
//!   `tenantry_mail_dead_total` (`mail::delivery`);
//! - `tenantry_webhooks_delivered_total`,
//!   `tenantry_webhook_failed_attempts_total`, `tenantry_webhooks_dead_total`
//!   and, at scrape time, `tenantry_webhook_deliveries{state}` (`webhooks`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder (installed once; later calls share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding program):
        // then ours only renders what it records itself, which is nothing.
        let _ = metrics::set_global_recorder(recorder);
        describe_and_register();
        handle
    })
}

/// The kinds of [`database_error`].
pub const DATABASE_ERROR_KINDS: [&str; 4] = ["unavailable", "pool", "query", "timeout"];

/// The outcomes of [`export`].
pub const EXPORT_OUTCOMES: [&str; 8] = [
    "completed",
    "cut_off",
    "too_long",
    "refused_tenant_busy",
    "refused_own_running",
    "refused_busy",
    "abandoned",
    "failed",
];

/// Every metric gets its `# HELP` line, and those recorded only when
/// something happens start at zero, so the first scrape shows them all and
/// a rate over a counter's first increment is not lost. (The `http_*`
/// series are labelled by request, so they appear with the first request.)
fn describe_and_register() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, route pattern and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "time to answer an HTTP request, by method, route pattern and status"
    );
    describe_histogram!(
        "tenantry_provisioning_duration_seconds",
        Unit::Seconds,
        "time to provision one tenant (signup, tenants create, import)"
    );
    describe_counter!(
        "tenantry_database_errors_total",
        "database errors seen by requests, by kind (unavailable, pool, query, timeout)"
    );
    describe_counter!(
        "tenantry_clients_cut_off_total",
        "connections ended because the client stopped reading"
    );
    describe_counter!(
        "tenantry_exports_total",
        "export requests, by how they ended"
    );
    describe_gauge!("tenantry_exports_running", "exports streaming now");
    describe_gauge!(
        "tenantry_tenants",
        "tenants, by template version (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_tenants_pending_migration",
        "tenants behind the latest template version (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_fleet_run_tenants",
        "tenants of the latest fleet run, by state (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_fleet_run_running",
        "1 while a fleet run is running, else 0 (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_pool_connections",
        "request pool connections, by state: max, open, idle, in_use"
    );
    describe_gauge!(
        "tenantry_pool_waiting",
        "requests waiting for a pool connection"
    );
    describe_gauge!(
        "tenantry_outbox_mails",
        "mail not delivered, by state: pending (waiting or being retried) and dead (given up; `tenantry outbox retry`) (read at scrape time)"
    );
    describe_counter!(
        "tenantry_db_connect_retries_total",
        "connects to PostgreSQL tried again after a short pause because its listen queue was full (EAGAIN)"
    );
    metrics::counter!("tenantry_db_connect_retries_total").absolute(0);
    describe_counter!(
        "tenantry_membership_resets_total",
        "times a routed request was refused its tenant's role and every session's cached role memberships were reset (at most one per 10 s)"
    );
    metrics::counter!("tenantry_membership_resets_total").absolute(0);
    describe_counter!(
        "tenantry_routed_forwarded_total",
        "Citus, direct routing: requests sent to a worker that no longer held their tenant (refused there; sent again where the placement map, read again, says)"
    );
    metrics::counter!("tenantry_routed_forwarded_total").absolute(0);
    describe_gauge!(
        "tenantry_router_roles",
        "router roles the request pool's tenant connections log in as; 0: they log in as the service"
    );
    describe_gauge!(
        "tenantry_spare_roles",
        "tenant roles made ahead of signups, not yet taken (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_spare_schemas",
        "spare tenant roles whose schema is built, so that the signup taking one runs no template (read at scrape time)"
    );
    describe_gauge!(
        "tenantry_tenants_by_usage_bytes",
        Unit::Count,
        "measured tenants whose schema takes at most le bytes (cumulative, as a histogram's buckets; tenancy::usage)"
    );
    describe_gauge!(
        "tenantry_tenants_usage_bytes_sum",
        Unit::Bytes,
        "bytes the measured tenants' schemas take together"
    );
    describe_gauge!(
        "tenantry_tenants_over_quota",
        "tenants over their storage quota, whose writes are refused"
    );
    describe_counter!(
        "tenantry_mail_sent_total",
        "mails delivered by this process"
    );
    describe_counter!(
        "tenantry_mail_failed_attempts_total",
        "attempts to deliver a mail that failed (the server down or refusing)"
    );
    describe_counter!(
        "tenantry_mail_dead_total",
        "mails given up on after their last attempt"
    );
    describe_counter!(
        "tenantry_webhooks_delivered_total",
        "webhook deliveries a receiver answered with a 2xx, by this process"
    );
    describe_counter!(
        "tenantry_webhook_failed_attempts_total",
        "webhook attempts that failed (no answer, a non-2xx, a redirect)"
    );
    describe_counter!(
        "tenantry_webhooks_dead_total",
        "webhook deliveries given up on after their last attempt"
    );
    describe_gauge!(
        "tenantry_webhook_deliveries",
        "webhook deliveries not delivered, by state: pending, dead (read at scrape time)"
    );
    for kind in DATABASE_ERROR_KINDS {
        metrics::counter!("tenantry_database_errors_total", "kind" => kind).absolute(0);
    }
    for outcome in EXPORT_OUTCOMES {
        metrics::counter!("tenantry_exports_total", "outcome" => outcome).absolute(0);
    }
    metrics::counter!("tenantry_clients_cut_off_total").absolute(0);
    for name in [
        "tenantry_mail_sent_total",
        "tenantry_mail_failed_attempts_total",
        "tenantry_mail_dead_total",
        "tenantry_webhooks_delivered_total",
        "tenantry_webhook_failed_attempts_total",
        "tenantry_webhooks_dead_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for state_name in ["pending", "dead"] {
        metrics::gauge!("tenantry_outbox_mails", "state" => state_name).set(0.0);
    }
    metrics::gauge!("tenantry_exports_running").set(0.0);
    metrics::gauge!("tenantry_tenants_pending_migration").set(0.0);
    metrics::gauge!("tenantry_fleet_run_running").set(0.0);
    metrics::gauge!("tenantry_pool_waiting").set(0.0);
}

/// Count a database error by kind.
pub fn database_error(kind: &'static str) {
    metrics::counter!("tenantry_database_errors_total", "kind" => kind).increment(1);
}

/// A routed request was refused its tenant's role and the sessions'
/// role memberships were reset (`routing::MEND`).
pub fn memberships_mended() {
    metrics::counter!("tenantry_membership_resets_total").increment(1);
}

/// A request went to a worker that does not hold its tenant (`db::direct`).
pub fn routed_forwarded() {
    metrics::counter!("tenantry_routed_forwarded_total").increment(1);
}

/// A connect met a full listen queue and is tried again.
pub fn connect_retried() {
    metrics::counter!("tenantry_db_connect_retries_total").increment(1);
}

/// A client that stopped reading was cut off.
pub fn stalled_client() {
    metrics::counter!("tenantry_clients_cut_off_total").increment(1);
}

/// How an export request ended (`api::exports`, `api::me::export`).
pub fn export(outcome: &'static str) {
    metrics::counter!("tenantry_exports_total", "outcome" => outcome).increment(1);
}

/// An export started (`1.0`) or ended (`-1.0`).
pub fn exports_running(change: f64) {
    metrics::gauge!("tenantry_exports_running").increment(change);
}

/// A webhook attempt's outcome: `delivered`, `failed_attempt` or `dead`
/// (`webhooks::delivery`).
pub fn webhook(outcome: &'static str) {
    let name = match outcome {
        "delivered" => "tenantry_webhooks_delivered_total",
        "dead" => "tenantry_webhooks_dead_total",
        _ => "tenantry_webhook_failed_attempts_total",
    };
    metrics::counter!(name).increment(1);
    if outcome == "dead" {
        metrics::counter!("tenantry_webhook_failed_attempts_total").increment(1);
    }
}
