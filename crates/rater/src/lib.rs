//! Hourly usage rating with reconcile, an exit-code contract, single-flight, and request-body
//! capture.
//!
//! **Status: skeleton.** This crate will hold window resolution, idempotent ingest, effective-dated
//! exact pricing, the rating and reconcile SQL, the exit-code contract (0 clean, 1 error,
//! 2 anomaly or routine reconcile deletion, 3 another rater holds the lock) and io_log capture.
