//! keeld's resources, as stored and as the web API shows them.

use serde::{Deserialize, Serialize};

use crate::store::Kind;

/// The resources the web API shows, typed once in `keel_api::keeld` for
/// keeld, the CLI and the tests; stored as they are.
pub use keel_api::keeld::{
    BootSpec, Disk, DiskStatus, Flavor, GuestInit, Image, ImageFormat, ImageStatus, Membership,
    Operation, OperationStatus, PowerState, Project, Quota, RestartPolicy, Role, Vm, VmStatus,
};

/// A resource kept in a [`crate::collection::Collection`].
pub trait Resource:
    Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static
{
    const KIND: Kind;
    fn id(&self) -> &str;
}

macro_rules! resource {
    ($t:ty, $kind:expr) => {
        impl Resource for $t {
            const KIND: Kind = $kind;
            fn id(&self) -> &str {
                &self.id
            }
        }
    };
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

resource!(Project, Kind::Project);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: String,
    pub name: String,
    /// Argon2id PHC string; never shown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password_hash: String,
    /// Administrators of the whole installation: every project, users,
    /// projects and flavors.
    #[serde(default)]
    pub system_admin: bool,
    #[serde(default)]
    pub memberships: Vec<Membership>,
    pub created_at: u64,
    /// When the password was last set (0: at `created_at`).
    #[serde(default)]
    pub password_changed_at: u64,
    /// Set by an admin's reset: the next login must change the password.
    #[serde(default)]
    pub must_change_password: bool,
}
resource!(User, Kind::User);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// From a password login; expires.
    Session,
    /// Made for a script; lives until deleted.
    Api,
}

/// A bearer token, stored by the SHA-256 of its secret (the id).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Token {
    pub id: String,
    pub user: String,
    pub kind: TokenKind,
    #[serde(default)]
    pub name: String,
    pub created_at: u64,
    /// 0: never.
    pub expires_at: u64,
}
resource!(Token, Kind::Token);

resource!(Flavor, Kind::Flavor);

resource!(Image, Kind::Image);

resource!(Disk, Kind::Disk);

resource!(Vm, Kind::Vm);

resource!(Operation, Kind::Operation);

/// The first answer given to a request with an `Idempotency-Key`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IdempotentReply {
    pub id: String,
    /// The user who sent it.
    #[serde(default)]
    pub user: String,
    pub method: String,
    pub path: String,
    /// SHA-256 of method, path, user and body: a key reused for anything
    /// else is refused.
    #[serde(default)]
    pub fingerprint: String,
    pub status: u16,
    /// The answer, less any secret it showed once.
    pub body: String,
    /// The answer held a secret (a new token): a replay cannot show it.
    #[serde(default)]
    pub secret: bool,
    pub created_at: u64,
}
resource!(IdempotentReply, Kind::Idempotency);

/// Names of projects, VMs, images, disks, flavors and users: DNS labels.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A fresh random id: `prefix-` and 12 hex digits.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    // getrandom only fails where the OS has no entropy source at all.
    let _ = getrandom::fill(&mut bytes);
    format!("{prefix}-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn ids_differ() {
        assert_ne!(new_id("vm"), new_id("vm"));
        assert!(new_id("vm").starts_with("vm-"));
    }
}
