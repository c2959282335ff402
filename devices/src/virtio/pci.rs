//! virtio-pci transport (work in progress).
