//! virtio-console (in progress).
