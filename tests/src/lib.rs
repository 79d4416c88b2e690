//! Shared helpers for the integration tests: namespaces, privileges, packets.

pub mod harness;
pub mod netns;
pub mod privilege;
pub mod topology;
