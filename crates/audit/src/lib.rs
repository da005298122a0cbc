//! Typed audit kinds, each with a declared consumer, and audit rows that commit atomically with
//! the state change they describe.
//!
//! - [`AuditKind`] is the closed set of things Keel audits. Each kind has a stable wire name and
//!   declares its [`Consumer`] through an exhaustive `match`: a kind nobody reads cannot be added
//!   without the compiler asking who reads it.
//! - [`AuditEvent`] is one row. Its fields are validated types; no field can hold a secret.
//! - [`AuditSink`] is the port. `MemoryAuditSink` (feature `testing`) is the fake;
//!   the `postgres` module (feature `postgres`) writes inside the caller's transaction.
//!
//! The default build is pure: no database driver, no async runtime.
//!
//! ```
//! use keel_audit::{Actor, AuditEvent, AuditKind, Consumer, ResourceId};
//! use time::macros::datetime;
//!
//! let event = AuditEvent::new(AuditKind::ProvisionPersistenceFailed, Actor::system(),
//!                             datetime!(2026-11-22 10:00 UTC))
//!     .resource(ResourceId::new_random())
//!     .attr("resource_type", "postgres")?
//!     .attr("tier", "pro")?;
//! assert_eq!(event.kind().as_str(), "provision.persistence_failed");
//! assert!(matches!(event.kind().consumer(), Consumer::OperatorAlert { .. }));
//! // Secrets are refused, and the error does not repeat them.
//! assert!(AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), event.occurred_at())
//!     .attr("note", "postgres://app:pw@db/app").is_err());
//! # Ok::<(), keel_audit::AuditFieldError>(())
//! ```

mod event;
mod ids;
mod kind;
#[cfg(feature = "postgres")]
pub mod list;
#[cfg(feature = "testing")]
mod memory;
#[cfg(feature = "postgres")]
pub mod notify;
#[cfg(feature = "metrics")]
pub mod notify_metrics;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod retention;
mod screen;
#[cfg(feature = "postgres")]
pub mod seal;
mod sink;
mod tier;

pub use event::{
    Actor, Attributes, AuditEvent, AuditFieldError, MASK_SUFFIX, MAX_ATTR_KEY_LEN,
    MAX_ATTR_VALUE_LEN, MAX_ATTRS, MAX_ID_LEN, RequestId, WITHHELD, looks_secret, mask,
    utc_in_range,
};
pub use ids::{
    InvalidId, InvalidTier, InvalidToken, ResourceId, ResourceType, TOKEN_MAX_LEN, TOKEN_MIN_LEN,
    TeamId, Tier, Token, UnknownResourceType,
};
pub use kind::{AlertSeverity, AuditKind, Consumer, UnknownAuditKind};
#[cfg(feature = "testing")]
pub use memory::MemoryAuditSink;
pub use sink::{AuditSink, AuditSinkError, BoxError};
pub use tier::{RoleSettings, TierRoleSettings};

/// The `time` crate (0.3) of this API's timestamps (`OffsetDateTime`), re-exported so a caller
/// names the same version.
pub use time;
/// The `uuid` crate (1.x) behind [`TeamId`] and [`ResourceId`], re-exported so a caller names
/// the same version.
pub use uuid;
