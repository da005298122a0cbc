//! Orphan detection, audit-only by default, with a gated, audited reclaim arm.
//!
//! **Status: skeleton.** This crate will hold the pure orphan detection over an inventory and the
//! set of live tokens, the `ORPHAN_DB_SWEEP_ENABLED` / `ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED` gates
//! (both default off), and a reclaim arm that only goes through keel-provision's deprovision
//! chokepoint.
