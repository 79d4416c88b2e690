//! Health checks at L3 (ICMP echo), L4 (TCP connect) and L7 (HTTP), with rise and fall.

mod engine;
mod probe;
mod tracker;

pub use engine::{BackendStatus, HealthEngine, Transition, effective_check};
pub use probe::Via;
pub use tracker::{Health, Tracker};
