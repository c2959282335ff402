//! virtio-net on a host TAP device.
//!
//! Each queue pair has its own tap fd (a multi-queue tap when there is more
//! than one pair) and its own worker thread; the first pair's worker also
//! serves the control queue. Frames move between guest buffers and the tap
//! with `readv`/`writev` on host pointers into guest memory, in the
//! `virtio_net_hdr_v1` format the tap speaks (IFF_VNET_HDR, 12 bytes), so
//! checksum and segmentation offloads pass straight through.

pub mod ctrl;
pub mod queue;
pub mod tap;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use keel_api::{MacAddr, NetConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use self::ctrl::{CtrlQueue, set_active_pairs};
use self::queue::{MAX_FRAME_LEN, NetCounters, PairConfig, QueuePair};
use self::tap::{Tap, TapError};
use self::worker::PairWorker;
use super::interrupt_watch::InterruptWatch;
use super::{
    ActivateError, Activation, ActiveQueue, QueueStateSer, VirtioDevice, WorkerHandle, device_type,
    features, read_config_bytes,
};

pub use self::queue::NetCountersSnapshot;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features every Keel NIC offers (on top of [`features::COMMON`]).
const BASE_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS);

/// Size of the config space Keel exposes: mac, status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;

/// Ethernet + VLAN header bytes on top of the MTU.
const LINK_HEADERS: usize = 18;

#[derive(Debug, Error)]
pub enum NetError {
    #[error("--net: {0}")]
    Config(String),
    #[error("Tap {tap}: cannot set the host-side address {ip}")]
    Address {
        tap: String,
        ip: std::net::Ipv4Addr,
        #[source]
        source: TapError,
    },
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The device's state, for snapshots and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u32,
    pub acked_features: u64,
    pub mac: MacAddr,
    pub tap: String,
    pub max_queue_pairs: u16,
    pub active_queue_pairs: u16,
    /// Queue positions; empty while workers own the queues.
    #[serde(default)]
    pub queues: Vec<QueueStateSer>,
}

/// A virtio-net device on a tap.
pub struct Net {
    taps: Vec<Arc<Tap>>,
    mac: MacAddr,
    max_pairs: u16,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    mtu: u32,
    counters: Arc<NetCounters>,
    active_pairs: Arc<AtomicU16>,
    workers: Vec<WorkerHandle<PairWorker>>,
}

/// A stable, locally administered unicast MAC for NIC `index` on `tap`.
/// FNV-1a: the same inputs give the same address on every build.
pub fn derive_mac(tap: &str, index: usize) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    b"keel-net".iter().for_each(|b| eat(*b));
    tap.bytes().for_each(&mut eat);
    eat(0);
    (index as u64).to_le_bytes().iter().for_each(|b| eat(*b));
    let b = h.to_le_bytes();
    // Locally administered (0x02 set), unicast (0x01 clear).
    MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

/// The TUN_F_* offloads matching the guest features the driver accepted:
/// what the tap may hand us unchecksummed or unsegmented.
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN)
        && has_any(acked, &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6])
    {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

fn has_any(acked: u64, bits: &[u32]) -> bool {
    bits.iter().any(|b| acked & bit(*b) != 0)
}

impl Net {
    /// Opens (or creates) the tap of `config` for NIC number `index` (the
    /// index only feeds the derived MAC).
    pub fn new(config: &NetConfig, index: usize) -> Result<Net, NetError> {
        Self::with_taps(config, index, Vec::new())
    }

    /// As [`new`](Self::new), on tap queues already open (passed with
    /// `vm.add-net`): one per queue pair. Without any, the tap of `config`
    /// is opened.
    pub fn with_taps(
        config: &NetConfig,
        index: usize,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Net, NetError> {
        config
            .validate()
            .map_err(|e| NetError::Config(e.to_string()))?;
        let pairs = config.num_queues / 2;
        let multi = pairs > 1;
        let taps: Vec<Arc<Tap>> = if fds.is_empty() {
            let first = Tap::open(config.tap.as_deref(), multi)?;
            let name = first.name().to_string();
            let mut taps = vec![Arc::new(first)];
            for _ in 1..pairs {
                taps.push(Arc::new(Tap::open(Some(&name), true)?));
            }
            taps
        } else {
            if fds.len() != usize::from(pairs) {
                return Err(NetError::Config(format!(
                    "{} tap file descriptors were passed for {pairs} queue pair(s) (num_queues={}); pass one per pair",
                    fds.len(),
                    config.num_queues
                )));
            }
            fds.into_iter()
                .map(|fd| Tap::from_fd(fd).map(Arc::new))
                .collect::<Result<_, _>>()?
        };
        let name = taps[0].name().to_string();
        if let Some(ip) = config.ip {
            taps[0]
                .set_ipv4(ip, config.mask)
                .map_err(|source| NetError::Address {
                    tap: name.clone(),
                    ip,
                    source,
                })?;
            taps[0].set_up()?;
        } else if let Err(e) = taps[0].set_up() {
            // Someone else manages this tap (a bridge port set up without
            // giving us CAP_NET_ADMIN): their call to bring it up.
            log::warn!("{e}");
        }
        let mac = config.mac.unwrap_or_else(|| {
            derive_mac(
                config.tap.as_deref().or(config.id.as_deref()).unwrap_or(""),
                index,
            )
        });
        let mtu = taps[0].mtu().unwrap_or(1500);
        let mut avail_features = features::COMMON | BASE_FEATURES;
        let mut queues = usize::from(config.num_queues);
        if multi {
            avail_features |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
            queues += 1;
        }
        Ok(Net {
            taps,
            mac,
            max_pairs: pairs,
            queue_sizes: vec![config.queue_size; queues],
            avail_features,
            acked_features: 0,
            mtu,
            counters: Arc::new(NetCounters::default()),
            active_pairs: Arc::new(AtomicU16::new(1)),
            workers: Vec::new(),
        })
    }

    /// The tap's interface name (the kernel's choice when none was given).
    pub fn tap_name(&self) -> &str {
        self.taps[0].name()
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Traffic counters, live.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.max_pairs.to_le_bytes());
        c
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            drop(w.stop());
        }
    }

    fn backend_error(message: String) -> ActivateError {
        ActivateError::Backend {
            device: "virtio-net",
            message,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_workers();
        let acked = activation.acked_features & self.avail_features;
        let mq = acked & bit(VIRTIO_NET_F_MQ) != 0;
        let pairs = if mq { self.max_pairs } else { 1 };
        let ctrl_index = (acked & bit(VIRTIO_NET_F_CTRL_VQ) != 0)
            .then(|| if mq { 2 * self.max_pairs } else { 2 });
        let event_idx = acked & features::RING_EVENT_IDX != 0;

        let mut slots: Vec<Option<ActiveQueue>> = Vec::new();
        slots.resize_with(self.queue_sizes.len(), || None);
        let enabled: Vec<u16> = activation.queues.iter().map(|q| q.index).collect();
        for mut q in activation.queues {
            q.queue.set_event_idx(event_idx);
            if let Some(slot) = slots.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let missing = |what: String| ActivateError::Queues {
            enabled: enabled.clone(),
            needed: what,
        };

        for tap in &self.taps {
            tap.set_offload(tap_offloads(acked))
                .map_err(|e| Self::backend_error(e.to_string()))?;
        }
        set_active_pairs(&self.taps, 1).map_err(|e| Self::backend_error(e.to_string()))?;
        self.active_pairs.store(1, Ordering::Relaxed);

        let mut tap_changed = Vec::new();
        let mut tap_changed_ctrl = Vec::new();
        for _ in 0..pairs {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| ActivateError::Worker {
                device: "virtio-net",
                source,
            })?;
            let clone = evt.try_clone().map_err(|source| ActivateError::Worker {
                device: "virtio-net",
                source,
            })?;
            tap_changed.push(Some(evt));
            tap_changed_ctrl.push(clone);
        }
        let mut ctrl = match ctrl_index {
            Some(i) => {
                let q = slots
                    .get_mut(usize::from(i))
                    .and_then(Option::take)
                    .ok_or_else(|| missing(format!("the control queue {i}")))?;
                Some((
                    CtrlQueue::new(
                        q.queue,
                        i,
                        self.taps.clone(),
                        self.active_pairs.clone(),
                        tap_changed_ctrl,
                    ),
                    q.kick,
                ))
            }
            None => None,
        };

        let max_rx_frame = if has_any(
            acked,
            &[
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_UFO,
            ],
        ) {
            MAX_FRAME_LEN
        } else {
            self.mtu as usize + LINK_HEADERS
        };
        let mrg_rxbuf = acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;

        let mut workers = Vec::new();
        for p in 0..pairs {
            let (rx_i, tx_i) = (2 * p, 2 * p + 1);
            let rx = slots.get_mut(usize::from(rx_i)).and_then(Option::take);
            let tx = slots.get_mut(usize::from(tx_i)).and_then(Option::take);
            let (rx, tx) = match (rx, tx) {
                (Some(rx), Some(tx)) => (rx, tx),
                _ if p == 0 => return Err(missing("receiveq1 and transmitq1 (0 and 1)".into())),
                _ => {
                    log::warn!("virtio-net: queue pair {p} is not enabled; it stays idle");
                    continue;
                }
            };
            let pair = QueuePair::new(
                self.taps[usize::from(p)].clone(),
                rx.queue,
                tx.queue,
                PairConfig {
                    rx_index: rx_i,
                    tx_index: tx_i,
                    mrg_rxbuf,
                    max_rx_frame,
                },
                self.counters.clone(),
            );
            let worker = PairWorker::new(
                activation.memory.clone(),
                activation.interrupt.clone(),
                pair,
                (rx.kick, tx.kick),
                if p == 0 { ctrl.take() } else { None },
                tap_changed[usize::from(p)]
                    .take()
                    .ok_or_else(|| Self::backend_error(format!("queue pair {p} set up twice")))?,
                InterruptWatch::new(2).map_err(|e| {
                    Self::backend_error(format!("cannot create the interrupt watch timer: {e}"))
                })?,
            );
            let name = format!("{}-q{p}", self.tap_name());
            let handle = WorkerHandle::spawn(name, worker, activation.interrupt.clone()).map_err(
                |source| ActivateError::Worker {
                    device: "virtio-net",
                    source,
                },
            )?;
            workers.push(handle);
        }
        self.workers = workers;
        self.acked_features = acked;
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.acked_features = 0;
        self.active_pairs.store(1, Ordering::Relaxed);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters.snapshot();
        vec![
            ("rx_bytes", c.rx_bytes),
            ("rx_frames", c.rx_frames),
            ("rx_dropped", c.rx_dropped),
            ("tx_bytes", c.tx_bytes),
            ("tx_frames", c.tx_frames),
            ("tx_dropped", c.tx_dropped),
            ("interrupts_resent", c.interrupts_resent),
        ]
    }

    fn state(&self) -> serde_json::Value {
        let state = NetState {
            version: 1,
            acked_features: self.acked_features,
            mac: self.mac,
            tap: self.tap_name().to_string(),
            max_queue_pairs: self.max_pairs,
            active_queue_pairs: self.active_pairs.load(Ordering::Relaxed),
            queues: Vec::new(),
        };
        serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests;
