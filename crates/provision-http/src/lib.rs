//! The provisioning HTTP surface as a library: an [`axum::Router`] that `keel-provision-api`
//! serves and that another Rust service can mount under a prefix of its own.
//!
//! - [`router`] answers `POST /v1/resources`, `GET /v1/resources`, `GET` and `DELETE
//!   /v1/resources/{id}` and `POST /v1/resources/{id}/rotate-credentials`, every one behind an
//!   API key ([`keys`]), and `GET /openapi.json` (no key: it describes, it does not act).
//! - Every error is one [`keel_provision::ErrorEnvelope`] (`application/problem+json`) with its
//!   agent action, including the framework's own (404, 405, 413, 415, a panic) and 401.
//! - `POST /v1/resources` honours `Idempotency-Key` ([`idempotency`]); limits are in [`limits`].
//! - [`AppState`] holds what the handlers share: the provisioner (any [`keel_provision::ResourceStore`]
//!   and [`keel_provision::Backend`]), the platform pool (keys, idempotency keys, listings,
//!   quotas), deadlines and limits.
//!
//! The binary adds only configuration, the adapters, the operations listener and the reconciler.

mod api;
pub mod backends;
pub mod bounded;
pub mod idempotency;
pub mod keys;
pub mod limits;
mod openapi;

pub use api::{AppState, BODY_LIMIT, lock_holders_for, router, serve};
pub use keys::{KeyId, Principal, Scope};
pub use limits::{Limits, RateLimiter};
