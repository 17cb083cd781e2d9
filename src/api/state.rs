//! What every request shares ([`AppState`]), built by `startup`.

use std::sync::Arc;

use crate::audit::Pseudonyms;
use crate::auth::{Hasher, JwtKeys};
use crate::db::{self, Installation};
use crate::tenancy::publication::Templates;

/// Shared by every request.
pub struct AppState {
    pub pool: db::RequestPool,
    /// Connections outside the pool (exports, fleet runs, `/health`'s
    /// spare), under the cap `TENANTRY_EXTRA_CONNECTIONS`.
    pub connector: db::Connector,
    pub installation: Installation,
    pub templates: Arc<Templates>,
    /// The stock of tenant roles made ahead of signups.
    pub spares: Arc<crate::tenancy::spares::Keeper>,
    pub jwt: JwtKeys,
    /// bcrypt at the configured cost, bounded to the core count.
    pub hasher: Hasher,
    /// Pseudonyms for the audit log.
    pub pseudonyms: Pseudonyms,
    /// Signs exports.
    pub export_key: crate::tenancy::export::ExportKey,
    /// How many exports run at once (`TENANTRY_EXPORT_CONCURRENCY`).
    pub exports: crate::api::exports::ExportBudget,
    /// How long an export may run (`TENANTRY_EXPORT_TIMEOUT`).
    pub export_timeout: std::time::Duration,
    /// `/health`'s one probe at a time.
    pub health: crate::api::health::HealthProbe,
    /// Fleet runs started here, to stop on shutdown.
    pub fleet_runs: FleetRuns,
    /// Failed logins before an account name is locked (0: never).
    pub login_max_failures: u32,
    /// How long a request body may take (`middleware::body_timeout`), and
    /// an export may wait for its reader.
    pub client_timeout: std::time::Duration,
    /// `TENANTRY_METRICS_TOKEN`: when set, `/metrics` wants it as a bearer
    /// token; when not, it answers loopback clients only.
    pub metrics_token: Option<crate::configuration::SecretString>,
    /// Writes the mails that go into the outbox, and wakes the sender.
    pub letters: crate::mail::Letters,
    /// Forgot-password requests, handled after their answer.
    pub password_resets: crate::api::account::ResetRequests,
    /// `TENANTRY_TENANT_QUOTA_BYTES`: a tenant's quota unless it has its
    /// own (0: none).
    pub tenant_quota_bytes: u64,
    /// `TENANTRY_AUDIT_ANCHOR_FILE`: what `GET /admin/audit/verify` checks
    /// the chain against.
    pub audit_anchor_file: std::path::PathBuf,
}

/// The stop flags of fleet runs started through the API in this process:
/// a shutdown stops them at a tenant boundary.
#[derive(Clone, Default)]
pub struct FleetRuns(Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>);

impl FleetRuns {
    pub fn register(&self, stop: Arc<std::sync::atomic::AtomicBool>) {
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        runs.retain(|s| Arc::strong_count(s) > 1);
        runs.push(stop);
    }

    pub(crate) fn stop_all(&self) {
        for stop in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
