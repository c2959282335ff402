//! Helpers for Keel integration tests.
