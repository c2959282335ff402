//! The REST API on the VMM's Unix socket: [`server`] reads requests,
//! `keel_api::request` decodes them, and the control loop
//! (`crate::control`) answers.

pub mod server;

use std::sync::mpsc::Receiver;

pub use keel_api::request::{ApiAction, decode};
pub use server::{Published, Responder};

/// A request for the control loop and where its answer goes.
#[derive(Debug)]
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: Responder,
    /// Signalled once the answer is on the wire: `vmm.shutdown` waits for
    /// it, so the process does not exit before its client hears back.
    pub written: Receiver<()>,
}
