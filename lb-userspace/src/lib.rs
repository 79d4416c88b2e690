//! The `lb` control plane as a library: the binary and the integration tests share it.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod flood;
pub mod ha;
pub mod health;
pub mod metrics;
pub mod model;
pub mod neighbor;
pub mod netdev;
pub mod observe;
pub mod planner;
pub mod report;
pub mod status_page;
pub mod store;
pub mod tunnel;
