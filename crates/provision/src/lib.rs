//! Atomic two-phase provisioning: no 201 for a resource the platform cannot address.
//!
//! **Status: the pure foundation.** Today this crate holds the backend names derived from a
//! customer token ([`NamespaceName`], [`DatabaseName`], [`RoleName`]: a function that deletes a
//! namespace cannot be handed a resource id), the secrets that only display redacted
//! ([`ConnectionUrl`], [`Password`]), and the error envelopes with their agent-action registry
//! ([`ErrorCode`], [`ErrorEnvelope`]). The reserve → create → finalize typestate, compensating
//! teardown with `provision.persistence_failed`, the audited deprovision chokepoint, the
//! backends and `keel-provision-api` follow.

mod envelope;
mod names;
mod secret;

pub use envelope::{
    DocsBase, ErrorCode, ErrorEnvelope, InvalidDocsBase, MAX_AGENT_ACTION_CHARS, UNREGISTERED,
};
pub use names::{
    DATABASE_PREFIX, DatabaseName, ForeignName, NAMESPACE_PREFIX, NamespaceName, RoleName,
};
pub use secret::{ConnectionUrl, Password};
