//! Health checks at L3 (ICMP echo), L4 (TCP connect) and L7 (HTTP), with rise and fall, all run
//! by one thread.

mod engine;
mod http;
mod icmp;
mod probe;
mod scheduler;
mod tcp;
mod timer_wheel;
mod tracker;

pub use engine::{BackendStatus, HealthEngine, Transition, effective_check};
pub use probe::{Via, disconnect};
pub use tracker::{Health, Tracker};

#[cfg(test)]
mod tests;
