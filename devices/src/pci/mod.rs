//! PCI (work in progress).
