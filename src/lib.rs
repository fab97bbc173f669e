//! oauth-manager: a self-hosted OAuth 2.0 / OpenID Connect token vault.
//!
//! Layers, outermost first: [`http`] (routes, extractors, error mapping) → [`services`]
//! (business rules) → [`storage`] (the only SQL) and [`providers`] (one module per provider).
//! [`auth`] verifies callers' JWTs and maps roles to permissions; [`crypto`] seals secrets.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod http;
pub mod jwks;
pub mod metrics;
pub mod oauth;
pub mod providers;
pub mod services;
pub mod storage;
pub mod telemetry;
