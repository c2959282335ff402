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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
