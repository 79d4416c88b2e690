//! VRRP version 3 (RFC 5798) without I/O: the advertisement and the state machine.

pub mod machine;
pub mod packet;
