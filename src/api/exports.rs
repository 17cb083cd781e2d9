//! The export budget: how many exports stream at once, each on a database
//! connection of its own outside the request pool, and one per user at a
//! time. An export is long and its pace is its client's: unbounded, a
//! single user could hold every connection PostgreSQL has.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::api::ApiError;

pub struct ExportBudget {
    permits: Arc<Semaphore>,
    size: usize,
    users: Arc<Mutex<HashSet<Uuid>>>,
}

/// One running export; dropping it gives its place back.
pub struct ExportSlot {
    _permit: OwnedSemaphorePermit,
    user: Uuid,
    users: Arc<Mutex<HashSet<Uuid>>>,
}

impl ExportBudget {
    pub fn new(size: usize) -> ExportBudget {
        ExportBudget {
            permits: Arc::new(Semaphore::new(size)),
            size,
            users: Arc::default(),
        }
    }

    /// A place for `user`'s export, or why not: 429 while one of theirs
    /// runs, 503 while the budget is spent. Never waits.
    pub fn take(&self, user: Uuid) -> Result<ExportSlot, ApiError> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if users.contains(&user) {
            crate::metrics::export("refused_own_running");
            return Err(ApiError::TooManyRequests {
                code: "export_in_progress",
                message: "an export of yours is still running: finish reading it first".into(),
                retry_after: 5,
            });
        }
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            crate::metrics::export("refused_busy");
            ApiError::Busy {
                code: "exports_busy",
                message: format!(
                    "{} exports are running, as many as this service runs at once; retry shortly",
                    self.size
                ),
            }
        })?;
        users.insert(user);
        crate::metrics::exports_running(1.0);
        Ok(ExportSlot {
            _permit: permit,
            user,
            users: self.users.clone(),
        })
    }

    /// Exports running now.
    pub fn running(&self) -> usize {
        self.size - self.permits.available_permits()
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.user);
        crate::metrics::exports_running(-1.0);
    }
}
