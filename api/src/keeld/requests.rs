//! The bodies of keeld's requests, as its handlers read them and clients
//! (the `keel` CLI, the tests) write them. Unknown fields are refused, so
//! a misspelt field is an error, not silently ignored. Fields a client
//! leaves out take the default the comment names.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ImageFormat, RestartPolicy, Role};

/// `POST /api/v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    pub password: String,
}

/// `POST /api/v1/password`: works without a token (an expired password
/// cannot log in).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePassword {
    /// Default: the caller's own name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub current_password: String,
    pub new_password: String,
}

/// `PUT /api/v1/users/{id}/password` (system admins).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    pub password: String,
    /// Make the user choose a new one at their next login (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub must_change: Option<bool>,
}

/// `POST /api/v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    /// Days until it stops working (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
}

/// `POST /api/v1/users` (system admins).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub system_admin: bool,
}

/// `POST /api/v1/projects` (system admins).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// `PUT /api/v1/projects/{id}/members/{user}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    pub role: Role,
}

/// `POST /api/v1/flavors` (system admins).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFlavor {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
}

/// Where an image's bytes come from: exactly one of the three.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    /// A file on keeld's host (system admins, under the import roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub path: Option<PathBuf>,
    /// An http(s) URL keeld downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The bytes follow with `PUT /api/v1/images/{id}/data`.
    #[serde(default)]
    pub upload: bool,
}

/// The kernel and initramfs VMs of an image boot with.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBootFiles {
    /// Host paths of a kernel and initramfs to boot the image with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initramfs_path: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// `POST /api/v1/images`: import from a path or URL, or create an image
/// to upload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// Default: raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    pub source: ImageSource,
    /// Hex SHA-256 the bytes must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub os_type: String,
    #[serde(default)]
    pub os_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_flavor: Option<String>,
    #[serde(default)]
    pub min_disk_gib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<ImageBootFiles>,
}

/// `POST /api/v1/images/{id}/share`: the projects it is shared with
/// (replaces the list).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareImage {
    pub projects: Vec<String>,
}

/// `POST /api/v1/disks`: a blank disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDisk {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub size_gib: u64,
    #[serde(default)]
    pub readonly: bool,
}

/// `POST /api/v1/disks/{id}/attach`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachDisk {
    /// The VM's id, or its name in the disk's project.
    pub vm: String,
}

/// `POST /api/v1/disks/{id}/resize`: disks only grow.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeDisk {
    pub size_gib: u64,
}

/// `POST /api/v1/disks/{id}/clone`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneDisk {
    /// The copy's name.
    pub name: String,
}

/// A blank data disk made with a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDataDisk {
    /// Default: `<vm>-data<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub size_gib: u64,
}

/// `POST /api/v1/vms`: a VM from an image and a flavor (or vCPUs and
/// memory).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub image: String,
    /// Default: the image's default flavor, else `1c2g`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    /// Override the flavor's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// System disk size; default: the image's size (at least its minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    #[serde(default)]
    pub data_disks: Vec<NewDataDisk>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Default: the VM's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Set in the guest at first boot (cloud-init); never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password: Option<String>,
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// Start it once created (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<bool>,
}

/// `PATCH /api/v1/vms/{id}`: what is given changes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
}

/// `POST /api/v1/vms/{id}/resize`: a flavor's shape, with `vcpus` and
/// `memory_mib` overriding it (or the VM's own).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// `POST /api/v1/vms/batch`: one action on several VMs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// `start`, `stop`, `force-off` or `delete`.
    pub action: String,
    /// 1 to 1000 VM ids or names.
    pub vms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// `POST /api/v1/vms/{id}/image`: an image from a stopped VM's system
/// disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeImage {
    pub name: String,
}
