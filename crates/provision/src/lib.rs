//! Atomic two-phase provisioning: no 201 for a resource the platform cannot address.
//!
//! **Status: skeleton.** This crate will hold typed customer identifiers, the reserve → create →
//! finalize typestate (only a finalized `Provisioned` builds a 201), compensating teardown with
//! `provision.persistence_failed`, error envelopes with agent actions, and the audited
//! deprovision chokepoint that every destructive path goes through.
