//! Shared helpers for the integration tests: namespaces, privileges, packets.

pub mod daemon;
pub mod harness;
pub mod invalid_configs;
pub mod netns;
pub mod privilege;
pub mod service;
pub mod topology;
