//! Where keeld keeps desired state: a document store of versioned records,
//! one collection per resource kind, plus append-only logs (audit, events).
//!
//! The [`Store`] trait is deliberately small — get, list, compare-and-put,
//! delete, append, read — so that an etcd backend (keys
//! `/keel/<kind>/<id>`, revisions as versions) can implement it for a
//! control plane with several replicas. [`sqlite::SqliteStore`] is the
//! embedded single-node default.

pub mod sqlite;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("The store's database failed: {context}")]
    Database {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{kind} {id} was changed by someone else (version {found}, expected {expected}); retry"
    )]
    Conflict {
        kind: Kind,
        id: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "The store's schema is version {found}, newer than this keeld knows ({known}); \
         run a newer keeld"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("A stored {kind} record is not valid JSON")]
    Corrupt {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
}

/// The kinds of record the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Project,
    User,
    Token,
    Flavor,
    Image,
    Disk,
    Vm,
    Operation,
    Idempotency,
    Setting,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Project,
        Kind::User,
        Kind::Token,
        Kind::Flavor,
        Kind::Image,
        Kind::Disk,
        Kind::Vm,
        Kind::Operation,
        Kind::Idempotency,
        Kind::Setting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Project => "project",
            Kind::User => "user",
            Kind::Token => "token",
            Kind::Flavor => "flavor",
            Kind::Image => "image",
            Kind::Disk => "disk",
            Kind::Vm => "vm",
            Kind::Operation => "operation",
            Kind::Idempotency => "idempotency",
            Kind::Setting => "setting",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored document. `version` starts at 1 and grows with every put.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub kind: Kind,
    pub id: String,
    pub version: u64,
    pub body: serde_json::Value,
}

/// The append-only logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    /// Every mutating API call: who, what, result.
    Audit,
    /// Lifecycle events of VMs (from their VMMs and from the agent).
    Event,
}

/// One log entry: its sequence number, the resource it concerns (for
/// filtering) and the entry itself.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    pub seq: u64,
    pub subject: String,
    pub body: serde_json::Value,
}

/// What to read from a log: entries after `after`, about `subject` when
/// given, newest last, at most `limit`.
#[derive(Clone, Debug, Default)]
pub struct LogQuery {
    pub subject: Option<String>,
    pub after: u64,
    pub limit: usize,
}

pub trait Store: Send + Sync {
    fn get(&self, kind: Kind, id: &str) -> Result<Option<Record>, StoreError>;
    fn list(&self, kind: Kind) -> Result<Vec<Record>, StoreError>;
    /// Writes `body` under `id`. `expected` is the version the caller read
    /// (0: the record must not exist); a mismatch is
    /// [`StoreError::Conflict`]. Returns the new version.
    fn put(
        &self,
        kind: Kind,
        id: &str,
        expected: u64,
        body: &serde_json::Value,
    ) -> Result<u64, StoreError>;
    /// Removes a record; false when there was none.
    fn delete(&self, kind: Kind, id: &str) -> Result<bool, StoreError>;
    fn append(&self, log: Log, subject: &str, body: &serde_json::Value) -> Result<u64, StoreError>;
    fn read(&self, log: Log, query: &LogQuery) -> Result<Vec<LogEntry>, StoreError>;
    /// Moves everything written into the main file and drops what was
    /// overwritten or deleted from every file of the store (the WAL
    /// included), after secrets were removed.
    fn compact(&self) -> Result<(), StoreError>;
}
