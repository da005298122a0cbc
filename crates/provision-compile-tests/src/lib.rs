//! Compile-fail tests for keel-provision's typestate (see `tests/compile_fail.rs`).
//!
//! Each file under `tests/compile-fail/` is a provisioning handler that tries to answer 201
//! without finalizing, or to forge the proof that it did; each must fail to compile with the
//! error recorded beside it. They replace a coverage test that greps handlers for a call to
//! finalize: here the bypass cannot be written.
