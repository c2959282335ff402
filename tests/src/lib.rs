//! Helpers for Keel's integration tests: the nested lab (real Linux guests)
//! and Keel's own freestanding test guest (runs directly on this host's KVM).

pub mod freestanding;
pub mod lab;
