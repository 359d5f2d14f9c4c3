//! Helpers shared by integration tests. Each test binary compiles this module on its own and
//! uses a part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod containerd;
pub mod daemon;
pub mod dht;
pub mod helm;
pub mod k8s;
pub mod rig;
