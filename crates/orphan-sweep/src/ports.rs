//! The sweep's ports: the inventory of backend objects, the live-token lookup, and the
//! reclaimer (keel-provision's deprovision chokepoint). Owned here, with domain errors.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;

use keel_audit::BoxError;
use keel_provision::{BackendName, TokenDigest};
use time::OffsetDateTime;

/// Which inventory a sweep reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InventorySource {
    /// Customer namespaces on Kubernetes (`instant-customer-*`).
    Kubernetes,
    /// Customer databases on the shared Postgres cluster (`cust_*`).
    Postgres,
}

/// One backend object found by an inventory. Its name contains a customer token: never log it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryItem {
    /// The object's name (secret: it carries the token).
    pub name: String,
    /// When it was created, when the backend knows.
    pub created_at: Option<OffsetDateTime>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Why an inventory could not produce a complete list. A partial list is never returned.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The list expired mid-pagination (HTTP 410): the pages seen so far are discarded.
    #[error("the list expired mid-pagination after {pages} page(s); nothing from it is used")]
    Expired {
        /// Pages read before the expiry.
        pages: u32,
    },
    /// A page could not be read.
    #[error("could not read page {page} of the inventory")]
    Page {
        /// The failing page (1-based).
        page: u32,
        /// The backend's error, with tokens masked.
        #[source]
        source: BoxError,
    },
}

/// Lists every backend object of one kind: a complete list, or an error.
pub trait Inventory: Send + Sync {
    /// The inventory's source.
    fn source(&self) -> InventorySource;

    /// Lists every object under the platform's prefix.
    fn list(&self) -> impl Future<Output = Result<Vec<InventoryItem>, InventoryError>> + Send;
}

/// Why live tokens could not be read.
#[derive(Debug, thiserror::Error)]
#[error("could not read which tokens are live")]
pub struct LiveTokensError(#[source] pub BoxError);

/// Which tokens have a non-terminal resource row (pending, active, paused, suspended), asked and
/// answered by [`TokenDigest`] so the read never sends a token.
pub trait LiveTokens: Send + Sync {
    /// The subset of `digests` whose token is live, in one set-based read (never one query per
    /// token).
    fn live_among(
        &self,
        digests: &[TokenDigest],
    ) -> impl Future<Output = Result<HashSet<TokenDigest>, LiveTokensError>> + Send;
}

/// What a reclaim did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaimed {
    /// Audited (`resource.deprovisioned`) and torn down.
    TornDown,
    /// Already gone; nothing was done.
    AlreadyGone,
}

/// Why a reclaim did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// A live resource owns the object (checked by the chokepoint itself); nothing was touched.
    #[error("a live resource owns it; nothing was touched")]
    Live,
    /// The chokepoint failed.
    #[error("the deprovision chokepoint failed")]
    Failed(#[source] BoxError),
}

/// Tears down an orphan. The only implementation that matters is keel-provision's audited
/// deprovision chokepoint, `keel_provision::Provisioner::deprovision`.
pub trait Reclaimer: Send + Sync {
    /// Reclaims the object `name`.
    fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Reclaimed, ReclaimError>> + Send;
}

impl<T: Reclaimer + ?Sized> Reclaimer for &T {
    fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Reclaimed, ReclaimError>> + Send {
        (**self).reclaim(name, now)
    }
}
