//! The virtio-pci modern transport (virtio 1.2 §4.1): a PCI function whose
//! BAR 0 holds the common configuration, ISR, device configuration,
//! notification doorbells and the MSI-X table, described to the driver by
//! vendor-specific capabilities.
//!
//! Doorbells are KVM ioeventfds, so a notification never exits to the VMM;
//! interrupts are MSI-X vectors fired through irqfds from the device's
//! worker thread. The transport owns the queue registers until the driver
//! sets DRIVER_OK, then hands live queues to the device.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    Activation, ActiveQueue, QueueStateSer, VirtioDevice, VirtioInterrupt, features, status,
};
use crate::GuestMemory;
use crate::bus::lock;
use crate::pci::config::{CAP_ID_MSIX, CAP_ID_VENDOR, ConfigError};
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{Bar, BarMove, PciConfig, PciDevice, PciIdentity};
use crate::vm_link::VmLink;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem IDs of modern (non-transitional) devices start at 0x40.
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
pub const NO_VECTOR: u16 = 0xffff;

// BAR 0 layout.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Each queue's doorbell is its own 4-byte slot.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Room in the BAR for the MSI-X table.
const MAX_MSIX_VECTORS: u16 = 256;

// Capability types (virtio 1.2 §4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("{device} has {queues} queues; at most {max} fit the doorbell area")]
    TooManyQueues {
        device: &'static str,
        queues: usize,
        max: u64,
    },
    #[error("Cannot build the PCI configuration space")]
    Config(#[from] ConfigError),
    #[error("Cannot set up interrupts or doorbells for {device}")]
    Link {
        device: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Interrupt state shared with the device's worker thread.
struct Signals {
    msix: Mutex<Msix>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    needs_reset: AtomicBool,
}

impl Signals {
    fn fire(&self, vector: u16) -> io::Result<()> {
        if vector == NO_VECTOR {
            return Ok(());
        }
        lock(&self.msix).trigger(vector).map(|_| ())
    }
}

impl VirtioInterrupt for Signals {
    fn signal_queue(&self, queue: u16) -> io::Result<()> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let vector = self
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.fire(vector)
    }

    fn signal_config(&self) -> io::Result<()> {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.fire(self.config_vector.load(Ordering::Acquire))
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.signal_config() {
            log::warn!("Cannot tell the driver a device needs a reset: {e}");
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub version: u32,
    pub config: crate::pci::config::PciConfigState,
    pub msix: MsixState,
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub acked_features: u64,
    pub queue_select: u16,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub queues: Vec<QueueStateSer>,
    pub device: serde_json::Value,
}

pub struct VirtioPciDevice {
    device: Box<dyn VirtioDevice>,
    config: PciConfig,
    msix_cap: usize,
    pci_cfg_cap: usize,
    link: Arc<dyn VmLink>,
    signals: Arc<Signals>,
    memory: Option<GuestMemory>,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    acked_features: u64,
    queue_select: u16,
    active: bool,
    /// Bumped on every configuration change the device makes.
    config_generation: u8,
}

impl VirtioPciDevice {
    /// Wraps `device` in a PCI function with BAR 0 at `bar_addr` (a
    /// [`BAR_SIZE`]-aligned address in the 32-bit window).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        link: Arc<dyn VmLink>,
    ) -> Result<Self, TransportError> {
        let name = device.name();
        let num_queues = device.queue_max_sizes().len();
        if num_queues as u64 * u64::from(NOTIFY_MULTIPLIER) > NOTIFY_LEN
            || num_queues + 1 > usize::from(MAX_MSIX_VECTORS)
        {
            return Err(TransportError::TooManyQueues {
                device: name,
                queues: num_queues,
                max: NOTIFY_LEN / u64::from(NOTIFY_MULTIPLIER),
            });
        }
        let link_err = |source| TransportError::Link {
            device: name,
            source,
        };
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_memory_bar(0, bar_addr, BAR_SIZE, false, false)?;

        // One vector per queue plus one for configuration changes.
        let vectors = num_queues as u16 + 1;
        let msix = Msix::new(vectors, link.clone()).map_err(link_err)?;
        let table_size = msix.count() - 1;
        let mut msix_body = Vec::with_capacity(10);
        msix_body.extend_from_slice(&table_size.to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        // Only the enable and function-mask bits are the driver's.
        let msix_cap = config.add_capability(CAP_ID_MSIX, &msix_body, &[0, 0xc0])?;

        for (cfg_type, offset, len) in [
            (CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN),
            (CAP_ISR_CFG, ISR_OFFSET, ISR_LEN),
            (CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LEN),
        ] {
            config.add_capability(CAP_ID_VENDOR, &virtio_cap(cfg_type, offset, len, &[]), &[])?;
        }
        let notify_len = (num_queues as u64 * u64::from(NOTIFY_MULTIPLIER)).max(4);
        config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        // The PCI configuration access window: bar, offset, length and
        // data are the driver's to write.
        let mut writable = vec![0u8; 18];
        writable[2] = 0xff; // bar
        writable[6..18].fill(0xff); // offset, length, data
        let pci_cfg_cap = config.add_capability(
            CAP_ID_VENDOR,
            &virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]),
            &writable,
        )?;

        let mut kicks = Vec::with_capacity(num_queues);
        for q in 0..num_queues {
            let kick = EventFd::new(EFD_NONBLOCK).map_err(link_err)?;
            link.add_ioevent(&kick, notify_addr(bar_addr, q))
                .map_err(link_err)?;
            kicks.push(kick);
        }
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs {
                max_size: max,
                size: max,
                ..Default::default()
            })
            .collect();
        let signals = Arc::new(Signals {
            msix: Mutex::new(msix),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            needs_reset: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            device,
            config,
            msix_cap,
            pci_cfg_cap,
            link,
            signals,
            memory: None,
            queues,
            kicks,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            acked_features: 0,
            queue_select: 0,
            active: false,
            config_generation: 0,
        })
    }

    /// Guest memory of the current VM (set again after every machine reset).
    pub fn set_memory(&mut self, memory: GuestMemory) {
        self.memory = Some(memory);
    }

    pub fn device_name(&self) -> &'static str {
        self.device.name()
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    /// Resizes the device (a disk grows) and interrupts the driver with a
    /// configuration change, bumping the generation so it rereads.
    pub fn resize(&mut self, bytes: u64) -> Result<(), String> {
        self.device.resize(bytes)?;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.signals.signal_config() {
            log::warn!(
                "{}: cannot signal the configuration change: {e}",
                self.device.name()
            );
        }
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut s = self.status;
        if self.signals.needs_reset.load(Ordering::SeqCst) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let features = self.device.features();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.acked_features & 0xffff_ffff,
                1 => self.acked_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.signals.config_vector.load(Ordering::Acquire)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status()),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18..=0x37, _) => self.read_queue_reg(offset, data.len()),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn read_queue_reg(&mut self, offset: u64, len: usize) -> u64 {
        let select = usize::from(self.queue_select);
        let vector = self
            .signals
            .queue_vectors
            .get(select)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        let Some(q) = self.queues.get(select) else {
            // Reads of an absent queue show size 0: "not available".
            return 0;
        };
        match (offset, len) {
            (0x18, 2) => u64::from(q.size),
            (0x1a, 2) => u64::from(vector),
            (0x1c, 2) => u64::from(q.enabled),
            (0x1e, 2) => select as u64,
            (0x20, 4) => q.desc & 0xffff_ffff,
            (0x24, 4) => q.desc >> 32,
            (0x20, 8) => q.desc,
            (0x28, 4) => q.driver & 0xffff_ffff,
            (0x2c, 4) => q.driver >> 32,
            (0x28, 8) => q.driver,
            (0x30, 4) => q.device & 0xffff_ffff,
            (0x34, 4) => q.device >> 32,
            (0x30, 8) => q.device,
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let configuring = self.status & status::DRIVER_OK == 0;
        let negotiating = self.status & status::FEATURES_OK == 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if negotiating => {
                let offered = self.device.features();
                let (shift, keep) = match self.driver_feature_select {
                    0 => (0, 0xffff_ffff_0000_0000),
                    1 => (32, 0x0000_0000_ffff_ffff),
                    _ => return,
                };
                self.acked_features = (self.acked_features & keep) | ((value << shift) & offered);
            }
            (0x10, 2) => self.set_vector(None, value as u16),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if configuring => {
                if let Some(q) = self.selected_queue() {
                    q.size = value as u16;
                }
            }
            (0x1a, 2) => self.set_vector(Some(usize::from(self.queue_select)), value as u16),
            (0x1c, 2) if configuring => {
                if let Some(q) = self.selected_queue() {
                    // Writing 0 is not allowed (virtio 1.2 §4.1.4.3.2).
                    q.enabled |= value == 1;
                }
            }
            (0x20..=0x37, 4 | 8) if configuring => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.driver,
                    _ => &mut q.device,
                };
                *field = match (offset % 8, data.len()) {
                    (0, 8) => value,
                    (0, 4) => (*field & !0xffff_ffff) | value,
                    (4, 4) => (*field & 0xffff_ffff) | value << 32,
                    _ => *field,
                };
            }
            _ => log::debug!(
                "{}: ignored common config write at {offset:#x} width {}",
                self.device.name(),
                data.len()
            ),
        }
    }

    /// Sets a queue's (or, with `None`, the config) MSI-X vector. A vector
    /// the function does not have reads back as NO_VECTOR, which tells
    /// the driver the assignment failed.
    fn set_vector(&mut self, queue: Option<usize>, vector: u16) {
        let count = lock(&self.signals.msix).count();
        let vector = if vector < count { vector } else { NO_VECTOR };
        let slot = match queue {
            None => Some(&self.signals.config_vector),
            Some(q) => self.signals.queue_vectors.get(q),
        };
        if let Some(slot) = slot {
            slot.store(vector, Ordering::Release);
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_device();
            return;
        }
        let mut value = value;
        // FEATURES_OK sticks only for a feature set the device can serve.
        if value & status::FEATURES_OK != 0
            && self.status & status::FEATURES_OK == 0
            && self.acked_features & features::VERSION_1 == 0
        {
            value &= !status::FEATURES_OK;
        }
        // DRIVER_OK before FEATURES_OK is a driver bug: refuse it.
        if value & status::DRIVER_OK != 0 && value & status::FEATURES_OK == 0 {
            value &= !status::DRIVER_OK;
        }
        let starting = value & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = value;
        if starting
            && !self.signals.needs_reset.load(Ordering::SeqCst)
            && let Err(e) = self.activate()
        {
            log::warn!("{}: cannot start: {e}", self.device.name());
            self.signals.set_needs_reset();
        }
    }

    fn activate(&mut self) -> Result<(), super::ActivateError> {
        let name = self.device.name();
        let backend = |message: String| super::ActivateError::Backend {
            device: name,
            message,
        };
        let memory = self
            .memory
            .clone()
            .ok_or_else(|| backend("no guest memory attached".into()))?;
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let queue = build_queue(regs, event_idx, &memory)
                .map_err(|e| backend(format!("queue {index}: {e}")))?;
            let kick = self.kicks[index]
                .try_clone()
                .map_err(|e| backend(format!("cannot share the doorbell: {e}")))?;
            queues.push(ActiveQueue {
                index: index as u16,
                queue,
                kick,
            });
        }
        self.device.activate(Activation {
            memory,
            interrupt: self.signals.clone(),
            queues,
            acked_features: self.acked_features,
        })?;
        self.active = true;
        Ok(())
    }

    fn reset_device(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegs {
                max_size: q.max_size,
                size: q.max_size,
                ..Default::default()
            };
        }
        for v in &self.signals.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.signals
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        self.signals.isr.store(0, Ordering::SeqCst);
        self.signals.needs_reset.store(false, Ordering::SeqCst);
        // Stale doorbells from before the reset must not wake the next
        // activation.
        for kick in &self.kicks {
            let _ = kick.read();
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_LEN).contains(&o) => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.read_common(o - COMMON_OFFSET, data)
                }
            }
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                data[0] = self.signals.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.signals.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.signals.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_LEN).contains(&o) => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.write_common(o - COMMON_OFFSET, data)
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Normally caught by the ioeventfd inside KVM; a trapped
                // doorbell (odd width, no ioeventfd) is passed on here.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(queue) {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.signals.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The `pci_cfg` capability's data window: an access to BAR memory
    /// through configuration space.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let mut b = [0u8; 12];
        self.config.read(self.pci_cfg_cap + 4, &mut b[..1]);
        let bar = b[0];
        self.config.read(self.pci_cfg_cap + 8, &mut b[4..12]);
        let offset = u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }

    fn pci_cfg_data_range(&self) -> std::ops::Range<usize> {
        self.pci_cfg_cap + 16..self.pci_cfg_cap + 20
    }
}

fn notify_addr(bar_addr: u64, queue: usize) -> u64 {
    bar_addr + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

fn build_queue(regs: &QueueRegs, event_idx: bool, memory: &GuestMemory) -> Result<Queue, String> {
    let mut q = Queue::new(regs.max_size).map_err(|e| format!("{e:?}"))?;
    q.try_set_size(regs.size).map_err(|_| {
        format!(
            "size {} is not a power of two up to {}",
            regs.size, regs.max_size
        )
    })?;
    q.try_set_desc_table_address(GuestAddress(regs.desc))
        .map_err(|_| format!("descriptor table address {:#x} is misaligned", regs.desc))?;
    q.try_set_avail_ring_address(GuestAddress(regs.driver))
        .map_err(|_| format!("available ring address {:#x} is misaligned", regs.driver))?;
    q.try_set_used_ring_address(GuestAddress(regs.device))
        .map_err(|_| format!("used ring address {:#x} is misaligned", regs.device))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(memory) {
        return Err("rings lie outside guest RAM".into());
    }
    Ok(q)
}

/// The body of a `virtio_pci_cap` after the ID and next-pointer bytes.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(len as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

fn class_code(device_type: u32) -> u32 {
    use super::device_type as t;
    match device_type {
        t::NET => 0x02_00_00,
        t::BLOCK => 0x01_80_00,
        t::CONSOLE => 0x07_80_00,
        _ => 0xff_00_00,
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if self.pci_cfg_data_range().contains(&offset)
            && let Some((bar_offset, len)) = self.pci_cfg_window()
        {
            let mut buf = [0u8; 4];
            self.read_bar0(bar_offset, &mut buf[..len]);
            let n = data.len().min(len);
            data[..n].copy_from_slice(&buf[..n]);
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        if self.pci_cfg_data_range().contains(&offset) {
            if let Some((bar_offset, len)) = self.pci_cfg_window()
                && data.len() >= len
            {
                self.write_bar0(bar_offset, &data[..len]);
            }
            return None;
        }
        let moved = self.config.write(offset, data);
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if offset < control.end && offset + data.len() > control.start {
            let mut b = [0u8; 2];
            self.config.read(control.start, &mut b);
            lock(&self.signals.msix).set_control(u16::from_le_bytes(b));
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.write_bar0(offset, data);
        }
    }

    fn bars(&self) -> Vec<(usize, Bar)> {
        self.config.bars().collect()
    }

    fn bar_moved(&mut self, bar: usize, old: u64, new: u64) {
        if bar != 0 {
            return;
        }
        for (q, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = self.link.remove_ioevent(kick, notify_addr(old, q)) {
                log::warn!("{}: cannot remove doorbell {q}: {e}", self.device.name());
            }
            if let Err(e) = self.link.add_ioevent(kick, notify_addr(new, q)) {
                log::warn!("{}: cannot move doorbell {q}: {e}", self.device.name());
            }
        }
    }

    fn reset(&mut self) -> Vec<BarMove> {
        self.reset_device();
        lock(&self.signals.msix).reset();
        self.config.reset()
    }

    fn unplug(&mut self) {
        self.reset_device();
        let bar0 = self
            .config
            .bars()
            .find(|(i, _)| *i == 0)
            .map(|(_, b)| b.addr);
        if let Some(addr) = bar0 {
            for (q, kick) in self.kicks.iter().enumerate() {
                if let Err(e) = self.link.remove_ioevent(kick, notify_addr(addr, q)) {
                    log::warn!("{}: cannot remove doorbell {q}: {e}", self.device.name());
                }
            }
        }
        let mut msix = lock(&self.signals.msix);
        msix.reset();
        msix.release();
    }

    fn state(&self) -> serde_json::Value {
        let state = VirtioPciState {
            version: 1,
            config: self.config.state(),
            msix: lock(&self.signals.msix).state(),
            status: self.status(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_vector: self.signals.config_vector.load(Ordering::Acquire),
            queue_vectors: self
                .signals
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueStateSer {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.enabled,
                    desc_table: q.desc,
                    avail_ring: q.driver,
                    used_ring: q.device,
                    ..Default::default()
                })
                .collect(),
            device: self.device.state(),
        };
        serde_json::to_value(state).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::FakeLink;
    use crate::virtio::ActivateError;
    use vm_memory::GuestMemoryMmap;

    /// (queue indexes, acked features) of each activation.
    type Activations = Arc<Mutex<Vec<(Vec<u16>, u64)>>>;

    #[derive(Default)]
    struct Probe {
        activations: Activations,
        interrupt: Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>,
        resets: Arc<Mutex<usize>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            super::super::device_type::RNG
        }
        fn name(&self) -> &'static str {
            "probe"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            features::COMMON | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xab, 0xcd], offset, data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            let idx = a.queues.iter().map(|q| q.index).collect();
            self.activations
                .lock()
                .unwrap()
                .push((idx, a.acked_features));
            *self.interrupt.lock().unwrap() = Some(a.interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
        fn state(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    const BAR: u64 = 0xc000_0000;

    struct Rig {
        dev: VirtioPciDevice,
        link: Arc<FakeLink>,
        activations: Activations,
        interrupt: Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>,
        resets: Arc<Mutex<usize>>,
    }

    fn rig() -> Rig {
        let probe = Probe::default();
        let (activations, interrupt, resets) = (
            probe.activations.clone(),
            probe.interrupt.clone(),
            probe.resets.clone(),
        );
        let link = Arc::new(FakeLink::default());
        let mut dev = VirtioPciDevice::new(Box::new(probe), BAR, link.clone()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        dev.set_memory(mem);
        Rig {
            dev,
            link,
            activations,
            interrupt,
            resets,
        }
    }

    fn w(dev: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
        dev.write_bar(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(dev: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Walks the capability list the way a driver does.
    fn caps(dev: &mut VirtioPciDevice) -> Vec<(u8, u8, u32, u32)> {
        let mut out = Vec::new();
        let mut p = [0u8; 1];
        dev.read_config(0x34, &mut p);
        let mut at = usize::from(p[0]);
        while at != 0 {
            let mut c = [0u8; 16];
            dev.read_config(at, &mut c);
            if c[0] == CAP_ID_VENDOR {
                let off = u32::from_le_bytes(c[8..12].try_into().unwrap());
                let len = u32::from_le_bytes(c[12..16].try_into().unwrap());
                out.push((c[3], c[4], off, len));
            }
            at = usize::from(c[1]);
        }
        out
    }

    /// The driver's bring-up: features, queue 0 only, DRIVER_OK.
    fn bring_up(dev: &mut VirtioPciDevice) {
        w(
            dev,
            0x14,
            u64::from(status::ACKNOWLEDGE | status::DRIVER),
            1,
        );
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, 1, 4); // VERSION_1
        w(dev, 0x08, 0, 4);
        w(dev, 0x0c, 1 | 1 << 29, 4);
        w(dev, 0x14, 0x0b, 1);
        assert_eq!(
            r(dev, 0x14, 1) as u8 & status::FEATURES_OK,
            status::FEATURES_OK
        );
        w(dev, 0x16, 0, 2);
        w(dev, 0x18, 8, 2);
        w(dev, 0x1a, 0, 2);
        w(dev, 0x20, 0x1000, 8);
        w(dev, 0x28, 0x2000, 4);
        w(dev, 0x30, 0x3000, 4);
        w(dev, 0x1c, 1, 2);
        w(dev, 0x14, 0x0f, 1);
    }

    #[test]
    fn capabilities_describe_bar0() {
        let mut rig = rig();
        let caps = caps(&mut rig.dev);
        let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
        assert_eq!(types, vec![1, 3, 4, 2, 5]);
        assert!(
            caps.iter()
                .all(|c| c.1 == 0 && u64::from(c.2 + c.3) <= BAR_SIZE)
        );
        let mut id = [0u8; 4];
        rig.dev.read_config(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        // Doorbells registered for both queues.
        assert_eq!(
            *rig.link.ioevents.lock().unwrap(),
            vec![BAR + NOTIFY_OFFSET, BAR + NOTIFY_OFFSET + 4]
        );
    }

    #[test]
    fn negotiation_and_activation() {
        let mut rig = rig();
        let dev = &mut rig.dev;
        assert_eq!(r(dev, 0x12, 2), 2);
        w(dev, 0x00, 1, 4);
        assert_eq!(r(dev, 0x04, 4), 1, "VERSION_1 in the high word");
        // Without VERSION_1, FEATURES_OK does not stick.
        w(dev, 0x0c, 1, 4);
        w(dev, 0x14, 0x0b, 1);
        assert_eq!(r(dev, 0x14, 1), 3);
        w(dev, 0x14, 0, 1);
        bring_up(dev);
        let acts = rig.activations.lock().unwrap().clone();
        assert_eq!(acts.len(), 1);
        assert_eq!(acts[0].0, vec![0]);
        assert_eq!(
            acts[0].1,
            features::VERSION_1 | features::RING_EVENT_IDX | 1
        );
        assert_eq!(r(dev, 0x2000, 1), 0xab);
        // Queue registers are frozen after DRIVER_OK.
        w(dev, 0x18, 4, 2);
        assert_eq!(r(dev, 0x18, 2), 8);
        // Reset stops the device and clears everything.
        w(dev, 0x14, 0, 1);
        assert_eq!(*rig.resets.lock().unwrap(), 1);
        assert_eq!(r(dev, 0x14, 1), 0);
        assert_eq!(r(dev, 0x1c, 2), 0);
        assert_eq!(r(dev, 0x1a, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn interrupts_go_through_msix() {
        let mut rig = rig();
        bring_up(&mut rig.dev);
        // MSI-X on, vector 0 unmasked and programmed.
        let mut ctrl = [0u8; 2];
        let cap = rig.dev.msix_cap;
        rig.dev.read_config(cap + 2, &mut ctrl);
        assert_eq!(u16::from_le_bytes(ctrl) & 0x7ff, 2, "3 vectors");
        rig.dev.write_config(cap + 3, &[0x80]);
        w(&mut rig.dev, MSIX_TABLE_OFFSET, 0xfee0_0000, 4);
        w(&mut rig.dev, MSIX_TABLE_OFFSET + 8, 0x30, 4);
        w(&mut rig.dev, MSIX_TABLE_OFFSET + 12, 0, 4);
        let interrupt = rig.interrupt.lock().unwrap().clone().unwrap();
        interrupt.signal_queue(0).unwrap();
        assert!(rig.link.fired(24));
        assert_eq!(r(&mut rig.dev, ISR_OFFSET, 1), 1);
        assert_eq!(r(&mut rig.dev, ISR_OFFSET, 1), 0, "read clears");
        // NEEDS_RESET shows in the status.
        interrupt.set_needs_reset();
        assert_ne!(
            r(&mut rig.dev, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET,
            0
        );
        // A vector the function does not have reads back as NO_VECTOR.
        w(&mut rig.dev, 0x10, 9, 2);
        assert_eq!(r(&mut rig.dev, 0x10, 2), u64::from(NO_VECTOR));
    }

    #[test]
    fn bad_queues_fail_activation_with_needs_reset() {
        let mut rig = rig();
        let dev = &mut rig.dev;
        w(dev, 0x14, 3, 1);
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, 1, 4);
        w(dev, 0x14, 0x0b, 1);
        w(dev, 0x18, 5, 2); // not a power of two
        w(dev, 0x1c, 1, 2);
        w(dev, 0x14, 0x0f, 1);
        assert!(rig.activations.lock().unwrap().is_empty());
        assert_ne!(r(dev, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
        // Rings outside RAM.
        w(dev, 0x14, 0, 1);
        w(dev, 0x14, 3, 1);
        w(dev, 0x08, 1, 4);
        w(dev, 0x0c, 1, 4);
        w(dev, 0x14, 0x0b, 1);
        w(dev, 0x20, !0xf, 8);
        w(dev, 0x1c, 1, 2);
        w(dev, 0x14, 0x0f, 1);
        assert!(rig.activations.lock().unwrap().is_empty());
        assert_ne!(r(dev, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn pci_cfg_window_reaches_the_bar() {
        let mut rig = rig();
        let cap = rig.dev.pci_cfg_cap;
        rig.dev.write_config(cap + 4, &[0]); // bar 0
        rig.dev
            .write_config(cap + 8, &(DEVICE_OFFSET as u32).to_le_bytes());
        rig.dev.write_config(cap + 12, &1u32.to_le_bytes());
        let mut d = [0u8; 4];
        rig.dev.read_config(cap + 16, &mut d);
        assert_eq!(d[0], 0xab);
        // A window past the BAR reads the capability bytes, not the BAR.
        rig.dev.write_config(cap + 8, &u32::MAX.to_le_bytes());
        rig.dev.read_config(cap + 16, &mut d);
    }

    #[test]
    fn bar_move_moves_doorbells() {
        let mut rig = rig();
        rig.dev.bar_moved(0, BAR, 0xd000_0000);
        assert_eq!(
            *rig.link.ioevents.lock().unwrap(),
            vec![0xd000_0000 + NOTIFY_OFFSET, 0xd000_0000 + NOTIFY_OFFSET + 4]
        );
    }

    #[test]
    fn hostile_register_storm() {
        let mut rig = rig();
        bring_up(&mut rig.dev);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % (BAR_SIZE + 64);
            let len = [1usize, 2, 3, 4, 8][(x >> 40) as usize % 5];
            if x & 1 == 0 {
                rig.dev.write_bar(0, off, &x.to_le_bytes()[..len]);
            } else {
                let mut b = [0u8; 8];
                rig.dev.read_bar(0, off, &mut b[..len]);
            }
            let coff = (x >> 20) as usize % 300;
            rig.dev.write_config(coff, &x.to_le_bytes()[..len.min(4)]);
        }
    }
}
