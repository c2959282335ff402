//! keeld's web API, typed once here for keeld, the `keel` CLI, the web
//! UI's build and the tests: its resources as it shows them (and stores
//! them), the bodies of its requests ([`requests`]) and of its answers
//! ([`replies`]). keeld's OpenAPI document is generated from these types.

pub mod replies;
pub mod requests;

pub use replies::*;
pub use requests::*;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Membership {
    pub project: String,
    pub role: Role,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Flavor {
    pub id: String,
    pub vcpus: u8,
    pub memory_mib: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Iso,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Importing,
    Ready,
    Error,
}

/// How a VM made from an image boots while keel-vmm has no firmware: a
/// kernel (and initramfs) kept beside the disk, and their command line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BootSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskStatus {
    Creating,
    Available,
    InUse,
    Error,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
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

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

/// What the owner wants the VM to be doing; the agent works toward it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Paused,
    Stopped,
}

/// First-boot configuration handed to cloud-init.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Running,
    Succeeded,
    Failed,
}

/// A long or asynchronous piece of work a mutating call started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
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
