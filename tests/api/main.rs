//! The integration test binary (one binary keeps linking cheap on small machines).
//!
//! Every test starts the real router on a random port against a fresh database: a SQLite file
//! by default, or a fresh PostgreSQL schema when `TEST_DATABASE_URL` names a PostgreSQL server
//! (CI runs the whole binary both ways).

mod audit_chain;
mod auth;
mod catalog;
mod chaos;
mod cli;
mod connect;
mod consents;
mod crash;
mod encryption;
mod fake_provider_selftest;
mod faults;
mod health;
mod hot_path;
mod http_hardening;
mod input;
mod integrations;
mod lifecycle;
mod limits;
mod metrics;
mod migrations;
mod privacy;
mod providers;
mod secrets;
mod storage;
mod support;
