//! Tenantry: schema-per-tenant provisioning for PostgreSQL. See
//! ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod cli;
pub mod configuration;
pub mod db;
pub mod domain;
pub mod embedded;
pub mod provisioning;
pub mod startup;
pub mod templates;
pub mod tenants;
