//! The `lb` control plane as a library: the binary and the integration tests share it.

pub mod config;
pub mod dataplane;
pub mod model;
pub mod planner;
