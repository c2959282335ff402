//! Device configuration — disks, NICs, the entropy device, vsock — shaped
//! like Cloud Hypervisor's `DiskConfig`, `NetConfig`, `RngConfig` and
//! `VsockConfig`, with the same command-line syntax (`--disk path=…`).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, OptionValues};
use crate::vm_config::ConfigError;

/// Largest queue size a virtio device accepts (virtio 1.2 §2.7: 32768);
/// Keel keeps queues far smaller, but the guest may not ask for more.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queue pairs / queues per device.
pub const MAX_NUM_QUEUES: u16 = 16;

fn wrap(option: &'static str, value: &str) -> impl Fn(OptionError) -> ConfigError {
    let value = value.to_string();
    move |source| ConfigError::Option {
        option,
        value: value.clone(),
        source,
    }
}

fn invalid(key: &str, value: &str, expected: &'static str) -> OptionError {
    OptionError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        expected,
    }
}

fn get_bool(values: &OptionValues, key: &str) -> Result<Option<bool>, OptionError> {
    match values.get(key) {
        None => Ok(None),
        Some("on" | "true") => Ok(Some(true)),
        Some("off" | "false") => Ok(Some(false)),
        Some(v) => Err(invalid(key, v, "on or off")),
    }
}

fn get_u16(values: &OptionValues, key: &str) -> Result<Option<u16>, OptionError> {
    match values.get_u64(key)? {
        None => Ok(None),
        Some(v) => u16::try_from(v)
            .map(Some)
            .map_err(|_| invalid(key, &v.to_string(), "a number below 65536")),
    }
}

/// Queue size: a power of two between 2 and [`MAX_QUEUE_SIZE`].
fn check_queue_size(option: &'static str, size: u16) -> Result<(), ConfigError> {
    if size < 2 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
        return Err(ConfigError::Device {
            option,
            message: format!("queue_size={size} must be a power of two from 2 to {MAX_QUEUE_SIZE}"),
        });
    }
    Ok(())
}

fn check_num_queues(option: &'static str, n: u16, max: u16) -> Result<(), ConfigError> {
    if n == 0 || n > max {
        return Err(ConfigError::Device {
            option,
            message: format!("num_queues={n} must be between 1 and {max}"),
        });
    }
    Ok(())
}

fn default_num_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    128
}
fn default_net_queues() -> u16 {
    2
}
fn default_net_queue_size() -> u16 {
    256
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ch_compat::DiskConfigWire")]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Use blocking I/O on the device thread instead of io_uring.
    #[serde(default)]
    pub disable_io_uring: bool,
    #[serde(default)]
    pub id: Option<String>,
    /// The serial number the guest reads with VIRTIO_BLK_T_GET_ID.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskConfig {
    pub const KEYS: &[&str] = &[
        "path",
        "readonly",
        "direct",
        "num_queues",
        "queue_size",
        "id",
        "serial",
        "_disable_io_uring",
    ];

    /// Parses `path=FILE[,readonly=on][,direct=on][,num_queues=N][,queue_size=N][,id=NAME][,serial=S]`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let w = wrap("disk", value);
        let v = OptionValues::parse(value, Self::KEYS).map_err(&w)?;
        let path = v
            .get("path")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError::Device {
                option: "disk",
                message: format!("{value}: path=FILE is required"),
            })?;
        let config = DiskConfig {
            path: PathBuf::from(path),
            readonly: get_bool(&v, "readonly").map_err(&w)?.unwrap_or(false),
            direct: get_bool(&v, "direct").map_err(&w)?.unwrap_or(false),
            num_queues: get_u16(&v, "num_queues").map_err(&w)?.unwrap_or(1),
            queue_size: get_u16(&v, "queue_size").map_err(&w)?.unwrap_or(128),
            disable_io_uring: get_bool(&v, "_disable_io_uring")
                .map_err(&w)?
                .unwrap_or(false),
            id: v.get("id").map(str::to_string),
            serial: v.get("serial").map(str::to_string),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_queue_size("disk", self.queue_size)?;
        check_num_queues("disk", self.num_queues, MAX_NUM_QUEUES)?;
        if self.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return Err(ConfigError::Device {
                option: "disk",
                message: "serial= is at most 20 bytes (VIRTIO_BLK_ID_BYTES)".into(),
            });
        }
        Ok(())
    }
}

/// A MAC address, written `12:34:56:78:9a:bc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn parse(s: &str) -> Option<Self> {
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(MacAddr(bytes))
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a MAC address")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ch_compat::NetConfigWire")]
pub struct NetConfig {
    /// The host TAP device; created when it does not exist.
    #[serde(default)]
    pub tap: Option<String>,
    /// The guest's MAC; a stable locally administered one when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The host side's address on the tap.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub mask: Option<Ipv4Addr>,
    /// Queues, counting receive and transmit separately (2 = one pair).
    #[serde(default = "default_net_queues")]
    pub num_queues: u16,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub id: Option<String>,
    /// Cloud Hypervisor's field for tap fds; the fds themselves travel with
    /// the request (SCM_RIGHTS), so numbers given here are ignored.
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
}

impl NetConfig {
    pub const KEYS: &[&str] = &["tap", "mac", "ip", "mask", "num_queues", "queue_size", "id"];

    /// Parses `tap=NAME[,mac=…][,ip=…,mask=…][,num_queues=N][,queue_size=N][,id=NAME]`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let w = wrap("net", value);
        let v = OptionValues::parse(value, Self::KEYS).map_err(&w)?;
        let mac = match v.get("mac") {
            None => None,
            Some(m) => Some(
                MacAddr::parse(m)
                    .ok_or_else(|| invalid("mac", m, "a MAC address like 52:54:00:12:34:56"))
                    .map_err(&w)?,
            ),
        };
        let ip_key = |key: &str| -> Result<Option<Ipv4Addr>, ConfigError> {
            v.get(key)
                .map(|s| {
                    s.parse()
                        .map_err(|_| invalid(key, s, "an IPv4 address"))
                        .map_err(&w)
                })
                .transpose()
        };
        let config = NetConfig {
            tap: v.get("tap").map(str::to_string),
            mac,
            ip: ip_key("ip")?,
            mask: ip_key("mask")?,
            num_queues: get_u16(&v, "num_queues").map_err(&w)?.unwrap_or(2),
            queue_size: get_u16(&v, "queue_size").map_err(&w)?.unwrap_or(256),
            id: v.get("id").map(str::to_string),
            fds: None,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |message: String| {
            Err(ConfigError::Device {
                option: "net",
                message,
            })
        };
        check_queue_size("net", self.queue_size)?;
        if self.num_queues < 2
            || !self.num_queues.is_multiple_of(2)
            || self.num_queues > 2 * MAX_NUM_QUEUES
        {
            return bad(format!(
                "num_queues={} must be an even number from 2 to {} (one receive and one transmit queue per pair)",
                self.num_queues,
                2 * MAX_NUM_QUEUES
            ));
        }
        if let Some(mac) = self.mac
            && (mac.is_multicast() || mac.0 == [0; 6])
        {
            return bad(format!(
                "mac={mac} is a multicast or zero address; give a unicast MAC"
            ));
        }
        if let Some(tap) = &self.tap
            && (tap.is_empty() || tap.len() >= 16 || tap.contains('/'))
        {
            return bad(format!(
                "tap={tap}: an interface name is 1 to 15 characters without '/'"
            ));
        }
        if self.mask.is_some() && self.ip.is_none() {
            return bad("mask= needs ip=".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    pub src: PathBuf,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from("/dev/urandom"),
        }
    }
}

impl RngConfig {
    /// Parses `src=PATH`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let v = OptionValues::parse(value, &["src"]).map_err(wrap("rng", value))?;
        Ok(RngConfig {
            src: v
                .get("src")
                .map_or_else(|| RngConfig::default().src, PathBuf::from),
        })
    }
}

/// Guest CIDs 0–2 are reserved (hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ch_compat::VsockConfigWire")]
pub struct VsockConfig {
    pub cid: u64,
    /// The host-side Unix socket.
    pub socket: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
}

impl VsockConfig {
    /// Parses `cid=N,socket=PATH[,id=NAME]`.
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let w = wrap("vsock", value);
        let v = OptionValues::parse(value, &["cid", "socket", "id"]).map_err(&w)?;
        let missing = |what: &str| ConfigError::Device {
            option: "vsock",
            message: format!("{value}: {what} is required"),
        };
        let config = VsockConfig {
            cid: v
                .get_u64("cid")
                .map_err(&w)?
                .ok_or_else(|| missing("cid=N"))?,
            socket: PathBuf::from(v.get("socket").ok_or_else(|| missing("socket=PATH"))?),
            id: v.get("id").map(str::to_string),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cid < MIN_GUEST_CID || self.cid >= u64::from(u32::MAX) {
            return Err(ConfigError::Device {
                option: "vsock",
                message: format!(
                    "cid={} is reserved or too large; guest CIDs run from {MIN_GUEST_CID} to {}",
                    self.cid,
                    u32::MAX - 1
                ),
            });
        }
        Ok(())
    }
}

/// The JSON bodies of Cloud Hypervisor's disk, NIC and vsock configs.
/// Stock `ch-remote` (v53) serializes its whole config, so `add-disk
/// path=X` arrives as `{"pci_segment":0,"path":"X",…,"vhost_user":false,
/// "sparse":true,"image_type":"Unknown","lock_granularity":"ByteRange"}`.
/// Cloud Hypervisor's fields that Keel does not model are taken with the
/// values that mean what Keel does anyway, and refused (naming the field)
/// otherwise; unknown fields are still refused.
mod ch_compat {
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    use serde::Deserialize;
    use serde::de::IgnoredAny;

    use super::{DiskConfig, MacAddr, NetConfig, VsockConfig};
    use super::{
        default_net_queue_size, default_net_queues, default_num_queues, default_queue_size,
    };

    fn yes() -> bool {
        true
    }

    fn unsupported(field: &str, value: impl std::fmt::Display, why: &str) -> String {
        format!("{field}={value} is not supported: {why}")
    }

    /// `PciDeviceCommonConfig`, flattened into every device config.
    fn pci_common(pci_segment: u16, iommu: bool, pci_device_id: Option<u8>) -> Result<(), String> {
        if pci_segment != 0 {
            return Err(unsupported(
                "pci_segment",
                pci_segment,
                "Keel has one PCI segment, 0",
            ));
        }
        if iommu {
            return Err(unsupported("iommu", iommu, "Keel has no virtual IOMMU"));
        }
        if let Some(slot) = pci_device_id {
            return Err(unsupported("pci_device_id", slot, "Keel chooses the slot"));
        }
        Ok(())
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct DiskConfigWire {
        path: PathBuf,
        #[serde(default)]
        readonly: bool,
        #[serde(default)]
        direct: bool,
        #[serde(default = "default_num_queues")]
        num_queues: u16,
        #[serde(default = "default_queue_size")]
        queue_size: u16,
        #[serde(default)]
        disable_io_uring: bool,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        serial: Option<String>,
        // Cloud Hypervisor's.
        #[serde(default)]
        pci_segment: u16,
        #[serde(default)]
        iommu: bool,
        #[serde(default)]
        pci_device_id: Option<u8>,
        #[serde(default)]
        vhost_user: bool,
        #[serde(default)]
        vhost_socket: Option<String>,
        #[serde(default)]
        rate_limit_group: Option<String>,
        #[serde(default)]
        rate_limiter_config: Option<IgnoredAny>,
        /// Keel has no AIO path (io_uring, or blocking I/O): nothing to turn off.
        #[serde(default)]
        #[allow(dead_code)]
        disable_aio: bool,
        #[serde(default)]
        queue_affinity: Option<IgnoredAny>,
        #[serde(default)]
        backing_files: bool,
        #[serde(default = "yes")]
        sparse: bool,
        #[serde(default)]
        image_type: Option<String>,
        #[serde(default)]
        lock_granularity: Option<String>,
    }

    impl TryFrom<DiskConfigWire> for DiskConfig {
        type Error = String;

        fn try_from(w: DiskConfigWire) -> Result<Self, String> {
            pci_common(w.pci_segment, w.iommu, w.pci_device_id)?;
            if w.vhost_user || w.vhost_socket.is_some() {
                return Err(unsupported(
                    "vhost_user",
                    true,
                    "Keel has no vhost-user disks",
                ));
            }
            if w.rate_limit_group.is_some() || w.rate_limiter_config.is_some() {
                return Err(
                    "rate limiting (rate_limit_group, rate_limiter_config) is not supported".into(),
                );
            }
            if w.queue_affinity.is_some() {
                return Err("queue_affinity is not supported".into());
            }
            if w.backing_files {
                return Err(unsupported(
                    "backing_files",
                    true,
                    "Keel opens raw images only",
                ));
            }
            if !w.sparse {
                return Err(unsupported(
                    "sparse",
                    false,
                    "Keel punches holes for DISCARD and WRITE_ZEROES",
                ));
            }
            match w.image_type.as_deref() {
                None | Some("Unknown" | "Raw") => {}
                Some(other) => {
                    return Err(unsupported(
                        "image_type",
                        other,
                        "Keel opens raw images only",
                    ));
                }
            }
            match w.lock_granularity.as_deref() {
                // Keel locks the whole file (OFD); either choice is served.
                None | Some("ByteRange" | "Full") => {}
                Some(other) => {
                    return Err(unsupported(
                        "lock_granularity",
                        other,
                        "expected ByteRange or Full",
                    ));
                }
            }
            Ok(DiskConfig {
                path: w.path,
                readonly: w.readonly,
                direct: w.direct,
                num_queues: w.num_queues,
                queue_size: w.queue_size,
                disable_io_uring: w.disable_io_uring,
                id: w.id,
                serial: w.serial,
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct NetConfigWire {
        #[serde(default)]
        tap: Option<String>,
        #[serde(default)]
        mac: Option<MacAddr>,
        #[serde(default)]
        ip: Option<Ipv4Addr>,
        #[serde(default)]
        mask: Option<Ipv4Addr>,
        #[serde(default = "default_net_queues")]
        num_queues: u16,
        #[serde(default = "default_net_queue_size")]
        queue_size: u16,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        fds: Option<Vec<i32>>,
        // Cloud Hypervisor's.
        #[serde(default)]
        pci_segment: u16,
        #[serde(default)]
        iommu: bool,
        #[serde(default)]
        pci_device_id: Option<u8>,
        #[serde(default)]
        host_mac: Option<MacAddr>,
        #[serde(default)]
        mtu: Option<u16>,
        #[serde(default)]
        vhost_user: bool,
        #[serde(default)]
        vhost_socket: Option<String>,
        /// Only meaningful with vhost_user.
        #[serde(default)]
        #[allow(dead_code)]
        vhost_mode: Option<String>,
        #[serde(default)]
        rate_limiter_config: Option<IgnoredAny>,
        #[serde(default = "yes")]
        offload_tso: bool,
        #[serde(default = "yes")]
        offload_ufo: bool,
        #[serde(default = "yes")]
        offload_csum: bool,
    }

    impl TryFrom<NetConfigWire> for NetConfig {
        type Error = String;

        fn try_from(w: NetConfigWire) -> Result<Self, String> {
            pci_common(w.pci_segment, w.iommu, w.pci_device_id)?;
            if let Some(mac) = w.host_mac {
                return Err(unsupported(
                    "host_mac",
                    mac,
                    "Keel leaves the tap's MAC to the host",
                ));
            }
            if let Some(mtu) = w.mtu {
                return Err(unsupported("mtu", mtu, "Keel does not set the MTU"));
            }
            if w.vhost_user || w.vhost_socket.is_some() {
                return Err(unsupported(
                    "vhost_user",
                    true,
                    "Keel has no vhost-user NICs",
                ));
            }
            if w.rate_limiter_config.is_some() {
                return Err("rate_limiter_config is not supported".into());
            }
            if !(w.offload_tso && w.offload_ufo && w.offload_csum) {
                return Err("offload_tso/offload_ufo/offload_csum=false is not supported: Keel passes the offloads through".into());
            }
            Ok(NetConfig {
                tap: w.tap,
                mac: w.mac,
                ip: w.ip,
                mask: w.mask,
                num_queues: w.num_queues,
                queue_size: w.queue_size,
                id: w.id,
                fds: w.fds,
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct VsockConfigWire {
        cid: u64,
        socket: PathBuf,
        #[serde(default)]
        id: Option<String>,
        // Cloud Hypervisor's.
        #[serde(default)]
        pci_segment: u16,
        #[serde(default)]
        iommu: bool,
        #[serde(default)]
        pci_device_id: Option<u8>,
    }

    impl TryFrom<VsockConfigWire> for VsockConfig {
        type Error = String;

        fn try_from(w: VsockConfigWire) -> Result<Self, String> {
            pci_common(w.pci_segment, w.iommu, w.pci_device_id)?;
            Ok(VsockConfig {
                cid: w.cid,
                socket: w.socket,
                id: w.id,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bodies stock ch-remote v53 sends (captured from its socket).
    #[test]
    fn cloud_hypervisor_bodies_are_accepted() {
        let disk = r#"{"pci_segment":0,"path":"/tmp/chr/extra.img","readonly":false,"direct":false,"num_queues":1,"queue_size":128,"vhost_user":false,"disable_io_uring":false,"disable_aio":false,"backing_files":false,"sparse":true,"image_type":"Unknown","lock_granularity":"ByteRange"}"#;
        let d: DiskConfig = serde_json::from_str(disk).unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/chr/extra.img"));
        let net = r#"{"pci_segment":0,"tap":"chrtap0","mac":"2e:74:a6:2e:9d:9b","num_queues":2,"queue_size":256,"vhost_user":false,"vhost_mode":"Client","offload_tso":true,"offload_ufo":true,"offload_csum":true}"#;
        let n: NetConfig = serde_json::from_str(net).unwrap();
        assert_eq!(n.tap.as_deref(), Some("chrtap0"));
        let vsock = r#"{"pci_segment":0,"cid":3,"socket":"/tmp/chr/v.sock"}"#;
        let v: VsockConfig = serde_json::from_str(vsock).unwrap();
        assert_eq!(v.cid, 3);
        // What Keel cannot do is refused by name; typos are still refused.
        for (bad, what) in [
            (r#"{"path":"/x","pci_segment":1}"#, "pci_segment=1"),
            (r#"{"path":"/x","image_type":"Qcow2"}"#, "image_type=Qcow2"),
            (r#"{"path":"/x","vhost_user":true}"#, "vhost_user"),
            (r#"{"path":"/x","readonyl":true}"#, "unknown field"),
        ] {
            let e = serde_json::from_str::<DiskConfig>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
        // Keel's own output still reads back.
        let again: DiskConfig = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn disks() {
        let d = DiskConfig::parse("path=/x.img,readonly=on,num_queues=2,id=d0").unwrap();
        assert!(d.readonly && !d.direct);
        assert_eq!((d.num_queues, d.queue_size), (2, 128));
        assert_eq!(d.id.as_deref(), Some("d0"));
        assert!(DiskConfig::parse("readonly=on").is_err());
        assert!(DiskConfig::parse("path=/x,queue_size=100").is_err());
        assert!(DiskConfig::parse("path=/x,num_queues=0").is_err());
        assert!(DiskConfig::parse("path=/x,readonly=maybe").is_err());
        let e = DiskConfig::parse("path=/x,bogus=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key 'bogus'"), "{e}");
        let json = r#"{"path":"/x.img","readonly":true}"#;
        let d: DiskConfig = serde_json::from_str(json).unwrap();
        assert_eq!((d.num_queues, d.queue_size), (1, 128));
    }

    #[test]
    fn nets() {
        let n =
            NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56,ip=192.168.9.1,mask=255.255.255.0")
                .unwrap();
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:12:34:56");
        assert_eq!(n.ip, Some(Ipv4Addr::new(192, 168, 9, 1)));
        for bad in [
            "tap=tap0,mac=52:54:00:12:34",
            "tap=tap0,mac=01:00:00:00:00:01",
            "tap=tap0,mac=zz:54:00:12:34:56",
            "tap=tap0,ip=300.1.1.1",
            "tap=a-very-long-interface-name",
            "tap=t,num_queues=3",
            "tap=t,mask=255.0.0.0",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
        let json = r#"{"tap":"t0","mac":"52:54:00:00:00:01"}"#;
        let n: NetConfig = serde_json::from_str(json).unwrap();
        assert_eq!(n.num_queues, 2);
    }

    #[test]
    fn rng_and_vsock() {
        assert_eq!(
            RngConfig::parse("src=/dev/random").unwrap().src,
            PathBuf::from("/dev/random")
        );
        let v = VsockConfig::parse("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert!(VsockConfig::parse("cid=2,socket=/tmp/v").is_err());
        assert!(VsockConfig::parse("socket=/tmp/v").is_err());
    }
}
