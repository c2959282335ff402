//! The bodies of keeld's answers beyond the bare resources: 202s with
//! their operation, pages, tokens, quotas, batch results, errors.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::{Disk, Image, Membership, Operation, Quota, Vm};

/// Every error answer: a status and `{"error": "..."}` saying what was
/// wrong and what to do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorReply {
    pub error: String,
}

/// A resource a 202 answer carries, and the key it goes under.
pub trait Keyed {
    /// `vm`, `disk` or `image`.
    const KEY: &'static str;
}

impl Keyed for Vm {
    const KEY: &'static str = "vm";
}

impl Keyed for Disk {
    const KEY: &'static str = "disk";
}

impl Keyed for Image {
    const KEY: &'static str = "image";
}

impl Keyed for ResizedVm {
    const KEY: &'static str = "vm";
}

/// The 202 answer of a call that started an operation:
/// `{"operation": {...}, "vm"|"disk"|"image": {...}}`, the resource as it
/// was when the call was accepted. Poll the operation at
/// `/api/v1/operations/{id}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted<T> {
    pub operation: Operation,
    pub resource: T,
}

impl<T: Keyed + Serialize> Serialize for Accepted<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("operation", &self.operation)?;
        map.serialize_entry(T::KEY, &self.resource)?;
        map.end()
    }
}

impl<'de, T: Keyed + DeserializeOwned> Deserialize<'de> for Accepted<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Keyed + DeserializeOwned> Visitor<'de> for Fields<T> {
            type Value = Accepted<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an object with an operation and a {}", T::KEY)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Accepted<T>, A::Error> {
                let (mut operation, mut resource) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    if key == "operation" {
                        operation = Some(map.next_value()?);
                    } else if key == T::KEY {
                        resource = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Accepted {
                    operation: operation.ok_or_else(|| de::Error::missing_field("operation"))?,
                    resource: resource.ok_or_else(|| de::Error::missing_field(T::KEY))?,
                })
            }
        }
        deserializer.deserialize_map(Fields(PhantomData))
    }
}

/// A named schema and those it refers to, for a hand-written
/// [`ToSchema::schemas`].
fn push_schema<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// `AcceptedVm`, `AcceptedDisk`, ...: one schema per resource.
impl<T: Keyed + ToSchema> ToSchema for Accepted<T> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("Accepted{}", T::name()))
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        push_schema::<Operation>(schemas);
        push_schema::<T>(schemas);
    }
}

impl<T: Keyed + ToSchema> PartialSchema for Accepted<T> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(format!(
                "202 Accepted: the operation started (poll it at /api/v1/operations/{{id}}) and \
                 the {} as it was when the call was accepted",
                T::KEY
            )))
            .property("operation", Ref::from_schema_name(Operation::name()))
            .required("operation")
            .property(T::KEY, Ref::from_schema_name(T::name()))
            .required(T::KEY)
            .into()
    }
}

/// How a resize took effect.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub enum ResizeMode {
    /// The running VM has the new shape now.
    #[serde(rename = "live")]
    Live,
    /// The VM runs and cannot take it live: stored for its next boot.
    #[serde(rename = "at next boot")]
    AtNextBoot,
    /// The VM does not run: its shape changed.
    #[serde(rename = "done")]
    Done,
}

impl fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            ResizeMode::Live => "live",
            ResizeMode::AtNextBoot => "at next boot",
            ResizeMode::Done => "done",
        })
    }
}

/// A VM as a resize answers it: the VM and how the resize took effect.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ResizedVm {
    #[serde(flatten)]
    pub vm: Vm,
    pub resize: ResizeMode,
}

/// What `POST /api/v1/images` answers: 202 with the import's operation,
/// or 201 without one for an image whose bytes are to be uploaded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ImageCreated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    pub image: Image,
}

/// One page of a list; `next` is the `after=` of the next page, `null` on
/// the last one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub next: Option<String>,
}

/// `PageVm`, ...: one schema per resource.
impl<T: ToSchema> ToSchema for Page<T> {
    fn name() -> Cow<'static, str> {
        Cow::Owned(format!("Page{}", T::name()))
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        push_schema::<T>(schemas);
    }
}

impl<T: ToSchema> PartialSchema for Page<T> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some(
                "One page of a list; `next` is the `after=` of the next page, null on the last one",
            ))
            .property(
                "items",
                ArrayBuilder::new().items(Ref::from_schema_name(T::name())),
            )
            .required("items")
            .property(
                "next",
                ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::String, Type::Null])),
            )
            .required("next")
            .into()
    }
}

/// A disk as `GET /api/v1/disks/{id}` shows it: with the bytes its file
/// holds on the host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DiskDetail {
    #[serde(flatten)]
    pub disk: Disk,
    pub allocated_bytes: u64,
}

/// What `POST /api/v1/vms/batch` answers: one result per VM, in the
/// order asked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchResults {
    pub results: Vec<BatchResult>,
}

/// The operation started for one VM of a batch, or why none was.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BatchResult {
    /// The VM as the request named it.
    pub vm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// The HTTP status the call on its own would have had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A user as shown: no password hash.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
    /// Administrators of the whole installation: every project, users,
    /// projects and flavors.
    pub system_admin: bool,
    pub memberships: Vec<Membership>,
    pub created_at: u64,
}

/// A new token (a login's session, or an API token): its secret is shown
/// this once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct NewToken {
    /// The bearer token.
    pub token: String,
    pub id: String,
    /// Seconds since the epoch; 0: never.
    pub expires_at: u64,
    pub user: UserInfo,
}

/// An API token as listed: never its secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: u64,
    /// 0: never.
    pub expires_at: u64,
}

/// What a project holds now, in the units of [`Quota`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Usage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image_gib: u64,
}

/// A project's quota beside what it uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct QuotaReport {
    pub project: String,
    pub quota: Quota,
    pub usage: Usage,
}

/// A single-use ticket that opens a VM's console from a browser.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ConsoleTicket {
    pub ticket: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
    /// Where to open the WebSocket, ticket included.
    pub path: String,
}

/// The node: capacity, what is allocated on it, VM counts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct NodeSummary {
    pub hostname: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
    pub cpu_overcommit: f64,
    /// vCPUs of VMs that are not stopped.
    pub vcpus_allocated: u64,
    pub vcpus_capacity: u64,
    pub memory_allocated_bytes: u64,
    pub vms_by_status: BTreeMap<String, u64>,
    pub vms_total: u64,
    pub images: u64,
    pub disks: u64,
}

/// One entry of a VM's event log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct VmEvent {
    /// Its place in the log: `?after=` continues after it.
    #[serde(default)]
    pub seq: u64,
    /// Seconds since the epoch.
    #[serde(default)]
    pub time: u64,
    #[serde(default)]
    pub vm: String,
    /// e.g. `booted`, `exited`.
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub message: String,
}

/// One entry of the audit log: a mutating call.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AuditEntry {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub time: u64,
    /// Who called (`-`: nobody logged in).
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub path: String,
    /// The collection and id the path names, e.g. `vms/vm-1`.
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub status: u16,
    /// `ok` or `refused`.
    #[serde(default)]
    pub result: String,
    /// The caller's address.
    #[serde(default)]
    pub source: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::keeld::{DiskStatus, OperationStatus};

    fn operation() -> Operation {
        Operation {
            id: "op-1".into(),
            project: "default".into(),
            action: "disk.create".into(),
            target: "disk-1".into(),
            status: OperationStatus::Running,
            progress: 0,
            error: String::new(),
            user: "admin".into(),
            created_at: 1,
            finished_at: 0,
            params: serde_json::Value::Null,
        }
    }

    fn disk() -> Disk {
        Disk {
            id: "disk-1".into(),
            project: "default".into(),
            name: "data".into(),
            size: 1 << 30,
            status: DiskStatus::Creating,
            vm: None,
            system: false,
            image: None,
            readonly: false,
            created_at: 1,
        }
    }

    #[test]
    fn accepted_puts_the_resource_under_its_key() {
        let accepted = Accepted {
            operation: operation(),
            resource: disk(),
        };
        let value = serde_json::to_value(&accepted).unwrap();
        assert_eq!(
            value,
            json!({"operation": operation(), "disk": disk()}),
            "{value}"
        );
        let back: Accepted<Disk> = serde_json::from_value(value).unwrap();
        assert_eq!(back, accepted);
        let wrong = serde_json::from_value::<Accepted<Vm>>(json!({"operation": operation()}));
        assert!(
            wrong
                .unwrap_err()
                .to_string()
                .contains("missing field `vm`")
        );
    }

    #[test]
    fn resize_modes_keep_their_spelling() {
        for (mode, text) in [
            (ResizeMode::Live, "live"),
            (ResizeMode::AtNextBoot, "at next boot"),
            (ResizeMode::Done, "done"),
        ] {
            assert_eq!(serde_json::to_value(mode).unwrap(), json!(text));
            assert_eq!(mode.to_string(), text);
        }
    }
}
