//! keeld's resources, as stored and as the web API shows them.

use serde::{Deserialize, Serialize};

use crate::store::Kind;

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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Project {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Limits on what the project may hold; unset fields are unlimited.
    #[serde(default)]
    pub quota: Quota,
    pub created_at: u64,
}

/// A project's limits (set by system admins). `None`: no limit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// VMs outside the recycle bin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<u64>,
    /// vCPUs of the VMs outside the recycle bin, running or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Memory of the VMs outside the recycle bin, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Sizes of all the project's disks (system and data), in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Sizes of the project's images (imported, uploaded or importing), in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_gib: Option<u64>,
}
resource!(Project, Kind::Project);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Membership {
    pub project: String,
    pub role: Role,
}

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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Flavor {
    pub id: String,
    pub vcpus: u8,
    pub memory_mib: u64,
}
resource!(Flavor, Kind::Flavor);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Iso,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Importing,
    Ready,
    Error,
}

/// How a VM made from an image boots while keel-vmm has no firmware: a
/// kernel (and initramfs) kept beside the disk, and their command line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BootSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub id: String,
    pub project: String,
    pub name: String,
    /// The format it was imported in; the stored disk is always raw.
    pub source_format: ImageFormat,
    pub status: ImageStatus,
    #[serde(default)]
    pub status_reason: String,
    /// Bytes the guest sees (the raw image's length).
    pub size: u64,
    /// 0..=100 while importing.
    pub progress: u8,
    /// Bytes an import in progress has declared (counted against quotas
    /// until the image is ready).
    #[serde(default)]
    pub reserved: u64,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub os_type: String,
    #[serde(default)]
    pub os_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_flavor: Option<String>,
    /// Smallest system disk a VM from it may have, in GiB.
    #[serde(default)]
    pub min_disk_gib: u64,
    #[serde(default)]
    pub boot: BootSpec,
    /// Projects it is shared with (read and use, not change).
    #[serde(default)]
    pub shared_with: Vec<String>,
    pub created_at: u64,
}
resource!(Image, Kind::Image);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DiskStatus {
    Creating,
    Available,
    InUse,
    Error,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Disk {
    pub id: String,
    pub project: String,
    pub name: String,
    pub size: u64,
    pub status: DiskStatus,
    /// The VM it is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// A VM's system disk lives and dies with it.
    #[serde(default)]
    pub system: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    pub created_at: u64,
}
resource!(Disk, Kind::Disk);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Creating,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Error,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

/// What the owner wants the VM to be doing; the agent works toward it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Paused,
    Stopped,
}

/// First-boot configuration handed to cloud-init.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestInit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Whether a root password was given. The password itself is written
    /// only into the VM's 0600 cloud-init seed, never into the store.
    #[serde(default)]
    pub root_password_set: bool,
    /// A password stored by an older keeld: read once at start to be
    /// scrubbed from the store, never written.
    #[serde(default, rename = "root_password", skip_serializing)]
    pub legacy_root_password: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub id: String,
    pub project: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub flavor: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub image: String,
    pub system_disk: String,
    /// Data disks, in attach order.
    #[serde(default)]
    pub disks: Vec<String>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub guest_init: GuestInit,
    pub desired: PowerState,
    pub status: VmStatus,
    #[serde(default)]
    pub status_reason: String,
    /// Set when deleted into the recycle bin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<u64>,
    /// Flavor changes that wait for the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_memory_mib: Option<u64>,
    #[serde(default)]
    pub restarts: u32,
    pub created_at: u64,
}
resource!(Vm, Kind::Vm);

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Running,
    Succeeded,
    Failed,
}

/// A long or asynchronous piece of work a mutating call started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Operation {
    pub id: String,
    pub project: String,
    /// e.g. `vm.create`, `image.import`.
    pub action: String,
    /// The resource it works on (its id).
    pub target: String,
    pub status: OperationStatus,
    /// 0..=100.
    pub progress: u8,
    #[serde(default)]
    pub error: String,
    pub user: String,
    pub created_at: u64,
    #[serde(default)]
    pub finished_at: u64,
    /// What the job needs beyond its target, so a restarted keeld can
    /// resume it.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub params: serde_json::Value,
}
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
