//! Tenantry: schema-per-tenant provisioning for PostgreSQL. See
//! ARCHITECTURE.md for the map.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod embedded;
pub mod mail;
pub mod maintenance;
pub mod metrics;
pub mod postgres_tls;
pub mod routing;
pub mod startup;
pub mod tenancy;
pub mod tenants;
pub mod transport;
pub mod webhooks;

// The tenancy subsystem's two oldest modules keep their short paths.
pub use tenancy::{provisioning, templates};
