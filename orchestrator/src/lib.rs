//! keeld: Keel's orchestrator. `keeld serve` runs the control plane (store,
//! web API, operations) and the node agent (one keel-vmm process per VM) in
//! one process.

pub mod agent;
pub mod auth;
pub mod collection;
pub mod control;
pub mod files;
pub mod host_files;
pub mod images;
pub mod keel;
pub mod model;
pub mod paths;
pub mod quota;
pub mod store;
pub mod web;

pub use keel::{Config, Keel};
