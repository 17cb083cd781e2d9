//! Everything about tenant schemas: the template set and its checks, the one
//! applier that runs template versions in a tenant's schema, provisioning
//! (signup) and the fleet (rolling a new version out to every tenant).

pub mod apply;
pub mod baseline;
pub mod erasure;
pub mod export;
pub mod fleet;
pub mod import;
pub mod integrity;
pub mod lint;
pub mod provisioning;
pub mod publication;
pub mod spares;
pub mod suspension;
pub mod templates;
pub mod usage;
