//! Driving the nested lab from Rust tests (written by the lab task).
