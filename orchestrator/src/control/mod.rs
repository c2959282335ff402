//! The control plane: desired state and what follows from it. Handlers in
//! `web/` call in here; this calls the node agent only through
//! [`crate::agent::NodeAgent`]; only this module writes a VM's status (through
//! [`phase::transition`]).

pub mod console;
pub mod disks;
#[cfg(test)]
pub mod fake_agent;
pub mod images;
pub mod jobs;
pub mod nodes;
pub mod operations;
pub mod phase;
pub mod reconciler;
pub mod scheduler;
pub mod vms;
