//! The propagation state machine and a multi-replica runner: applied, retrying, dead-lettered.
//!
//! **Status: skeleton.** This crate will hold the pure decision function over applier outcomes
//! (an unexpected skip retries with `propagation.unexpected_skip` and is never marked applied),
//! the bounded skip-reason classification, the runner, and its Postgres and Kubernetes adapters.
//! It depends on `keel-audit` for the kinds it emits.
