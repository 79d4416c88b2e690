//! The load balancer is no single point of failure: active/standby with VRRPv3 and state
//! replication, active/active with BGP announcements.

pub mod bgp;
pub mod pair;
pub mod replication;
pub mod takeover;
pub mod vrrp;
pub mod vrrp_net;
