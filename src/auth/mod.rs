//! Who is calling, and what they may do.
//!
//! [`jwt`] turns a bearer token from the host product into a [`rbac::Principal`]; [`rbac`] maps its
//! roles to permissions and hands out [`rbac::Actor`] values, which are the only way a service
//! learns whose data it may touch.

pub mod jwt;
pub mod rbac;
