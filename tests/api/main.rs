//! One test binary: one private PostgreSQL cluster for the whole run, a fresh
//! database per test. See helpers.rs.

mod abuse;
mod accounts;
mod audit;
mod backup;
mod cli;
mod connections;
mod deploy;
mod embedded;
mod faults;
mod fleet;
mod gdpr;
mod hardening_accounts;
mod hardening_data;
mod hardening_input;
mod hardening_service;
mod health;
mod helpers;
mod https;
mod isolation;
mod lifecycle;
mod login;
mod mail_accounts;
mod newcomer;
mod observability;
mod openapi;
mod pg_tls;
mod pool;
mod provisioning;
mod refresh;
mod register;
mod revocation;
mod smtp;
mod suspension;
mod tenant_data;
mod tokens;
