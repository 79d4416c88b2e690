//! Types, constants and pure logic shared by the XDP program and the control plane.
//!
//! Everything here is `no_std` so the eBPF crate can use it; host-only helpers
//! (the Maglev builder, `aya::Pod` impls) sit behind the `user` feature.
#![cfg_attr(not(feature = "user"), no_std)]

pub mod csum;
pub mod decap;
pub mod hash;
pub mod layout;
pub mod maps;
pub mod nat;
pub mod packet;
pub mod tunnel;

#[cfg(feature = "user")]
pub mod maglev;
#[cfg(feature = "user")]
pub mod model;
