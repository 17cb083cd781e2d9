//! Prometheus metrics (`metrics` + `metrics-exporter-prometheus`, no HTTP
//! listener of its own: `GET /metrics` renders them). Names:
//!
//! - `http_requests_total{method,route,status}`, `http_request_duration_seconds`
//!   (histogram): labelled by the route *pattern* (`/api/experiences/{id}`),
//!   never by tenant or raw path; unmatched paths are `unmatched`;
//! - `tenantry_provisioning_duration_seconds` (histogram), per signup;
//! - `tenantry_database_errors_total{kind}` (`unavailable`, `pool`, `query`,
//!   `timeout`);
//! - `tenantry_clients_cut_off_total`: connections ended because the client
//!   stopped reading (`transport::Stalling`);
//! - `tenantry_exports_total{outcome}` (`completed`, `cut_off`, `refused_busy`, …) and the
//!   gauge `tenantry_exports_running` (`api::exports`);
//! - read at scrape time from the database and the pool:
//!   `tenantry_tenants{template_version}`, `tenantry_tenants_pending_migration`,
//!   `tenantry_fleet_run_tenants{run,state}` (planned, succeeded, failed,
//!   skipped, pending of the latest run), `tenantry_fleet_run_running`,
//!   `tenantry_pool_connections{state}` (max, open, idle, in_use),
//!   `tenantry_pool_waiting`.

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
        handle
    })
}

/// Count a database error by kind.
pub fn database_error(kind: &'static str) {
    metrics::counter!("tenantry_database_errors_total", "kind" => kind).increment(1);
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
