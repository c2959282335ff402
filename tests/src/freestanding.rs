//! Keel's freestanding test guest (written by the guest task).
