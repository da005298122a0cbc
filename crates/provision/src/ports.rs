//! The ports a provisioning flow drives: the resource store and the backends. Both are owned
//! here, with domain errors; adapters live behind the `postgres` and `kube` features.

use std::fmt;
use std::future::Future;

use keel_audit::{AuditEvent, BoxError, ResourceId, ResourceType, TeamId, Tier, Token};
use time::OffsetDateTime;

use crate::model::{BackendName, BackendObject, ResourceRecord, ResourceStatus};
use crate::names::TokenDigest;
use crate::reclaim::{ObjectFacts, OrphanRecord, OrphanStanding, Preflight};

/// Where a listing of stale `pending` rows goes on from: the position of the last row a page read,
/// whether or not that row decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleCursor {
    /// The row's reservation time.
    pub created_at: OffsetDateTime,
    /// The row's id (orders rows reserved at the same instant).
    pub id: ResourceId,
}

/// One page of [`ResourceStore::stale_pending`].
#[derive(Debug, Default)]
pub struct StalePage {
    /// The rows of the page that decode.
    pub records: Vec<ResourceRecord>,
    /// Where the next page starts, when the page was full (more rows may follow); `None` when
    /// the listing is done.
    pub next: Option<StaleCursor>,
}

/// Why the resource store could not do what was asked. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The team does not exist.
    #[error("the team does not exist")]
    TeamNotFound,
    /// The resource does not exist.
    #[error("the resource does not exist")]
    ResourceNotFound,
    /// The row is not in the state the step expects (for example finalizing a row that is no
    /// longer pending).
    #[error("the resource is {}, not {}", .actual.as_str(), .expected.as_str())]
    WrongStatus {
        /// The status the step needs.
        expected: ResourceStatus,
        /// The status found.
        actual: ResourceStatus,
    },
    /// The store failed; nothing was changed.
    #[error("the resource store failed to {operation}")]
    Unavailable {
        /// What was being attempted.
        operation: &'static str,
        /// The adapter's error (never contains a secret). From the Postgres adapter (feature
        /// `postgres`), a database failure downcasts to `sqlx::Error` (sqlx 0.9), e.g.
        /// `source.downcast_ref::<sqlx::Error>()`, for a caller deciding whether to retry.
        #[source]
        source: BoxError,
    },
    /// A stored row does not decode (another writer put a value there this build cannot read):
    /// retrying does not help until the row is repaired.
    #[error("the resource store holds a row it cannot read ({operation})")]
    Corrupt {
        /// What was being attempted.
        operation: &'static str,
        /// What does not decode (never the value itself).
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// A store failure.
    pub fn unavailable(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            operation,
            source: source.into(),
        }
    }
}

/// A new `pending` row: the intent, written before any side effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReservation {
    /// The resource id.
    pub id: ResourceId,
    /// The owning team.
    pub team_id: TeamId,
    /// What it is.
    pub resource_type: ResourceType,
    /// Its tier.
    pub tier: Tier,
    /// When it was reserved.
    pub now: OffsetDateTime,
}

/// The `resources` table, as a provisioning flow needs it.
///
/// Every method that takes an [`AuditEvent`] commits the event together with its state change,
/// or neither.
pub trait ResourceStore: Send + Sync {
    /// Inserts a `pending` row (refusing an unknown team with [`StoreError::TeamNotFound`]) with
    /// a fresh token, and answers the token. The store draws the token itself, so it is never
    /// sent to the store (where a statement log would write it down).
    fn reserve(
        &self,
        reservation: &NewReservation,
    ) -> impl Future<Output = Result<Token, StoreError>> + Send;

    /// Turns a `pending` row `active` with its provider id and connection address (the URL
    /// without its password, [`crate::ConnectionUrl::address`]), and records `audit`
    /// (`provision.created`) in the same transaction.
    fn activate(
        &self,
        id: ResourceId,
        object: &BackendObject,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The compensation's state flip: `pending → failed` (`deleted_at` set, no connection URL),
    /// conditional on the row still being `pending`, recording `audit` in the same transaction
    /// when given. Answers [`Flip::Flipped`] only when this call made the change; otherwise
    /// [`Flip::Found`] with the status the row already had (and nothing written). A compensation
    /// tears down only what the flip proves is its own.
    fn abandon(
        &self,
        id: ResourceId,
        audit: Option<&AuditEvent>,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Flip, StoreError>> + Send;

    /// `pending` rows reserved more than `older_than` ago by the store's own clock (so replicas
    /// agree), oldest first (by reservation time, then id), after `after` when given, at most
    /// `limit` rows read: provisionings that a crash or a shutdown cut short. A row that does
    /// not decode is left out of [`StalePage::records`] (the Postgres store logs it at ERROR)
    /// but still moves [`StalePage::next`] on, so rows that never decode can never fill every
    /// page and hold back the others.
    fn stale_pending(
        &self,
        older_than: std::time::Duration,
        after: Option<StaleCursor>,
        limit: u32,
    ) -> impl Future<Output = Result<StalePage, StoreError>> + Send;

    /// Soft-deletes a live row for the deprovision chokepoint (status `deleted`, `deleted_at`
    /// set, connection URL cleared) and records `audit` (`resource.deprovisioned`) in the same
    /// transaction. Returns `false`, writing nothing, when the row was already soft-deleted.
    fn retire(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records an audit event on its own (for a backend object no row owns).
    fn record(&self, audit: &AuditEvent) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records `audit` only while resource `id` is `active`, in one transaction that holds the
    /// row against a concurrent deprovision until it commits; answers whether it was recorded.
    /// A credential rotation is recorded this way, so it is never audited (nor its password
    /// shown) for a resource a deprovision retired meanwhile.
    fn record_while_active(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Reads a resource (soft-deleted ones included), without its secret.
    fn get(
        &self,
        id: ResourceId,
    ) -> impl Future<Output = Result<Option<ResourceRecord>, StoreError>> + Send;

    /// The live resource whose token has `digest`, if any (statuses for which
    /// [`ResourceStatus::is_live`] holds). Looked up by digest, so no token is sent.
    fn live_for_digest(
        &self,
        digest: &TokenDigest,
    ) -> impl Future<Output = Result<Option<(ResourceId, ResourceStatus)>, StoreError>> + Send;

    /// The orphan reclaim's fresh read of the platform database for the token with `digest`:
    /// this installation's id, its newest row for the token (any status) and whether the token
    /// is protected by the platform. A store that cannot answer fails the reclaim (the default),
    /// so nothing is reclaimed on a guess.
    fn orphan_standing(
        &self,
        digest: &TokenDigest,
    ) -> impl Future<Output = Result<OrphanStanding, StoreError>> + Send {
        let _ = digest;
        async {
            Err(StoreError::unavailable(
                "read an orphan's standing",
                RedactedError::new("this store does not hold installation or ownership records"),
            ))
        }
    }

    /// Records `audit` about the orphan with `digest` at most once per audit kind, refusal and
    /// incarnation (its `object_id` attribute, when it has one: an object is never audited
    /// twice for the same thing, and an object made again under the same name is another
    /// object) and only while no live row owns the token, both checked in the transaction that
    /// writes it. The default writes it unconditionally.
    fn record_orphan_event(
        &self,
        digest: &TokenDigest,
        audit: &AuditEvent,
    ) -> impl Future<Output = Result<OrphanRecord, StoreError>> + Send {
        let _ = digest;
        async move { self.record(audit).await.map(|()| OrphanRecord::Written) }
    }
}

/// What [`ResourceStore::abandon`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flip {
    /// This call flipped the row from `pending` to `failed`.
    Flipped,
    /// The row was not `pending`; nothing was written.
    Found(ResourceStatus),
}

/// Why a backend could not create or tear down an object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// This backend does not serve that resource type.
    #[error("no backend for {0} resources is configured")]
    Unsupported(ResourceType),
    /// An object with the platform's name exists but was not made by the platform (its labels
    /// or owner say otherwise); it is left alone.
    #[error("{name} exists but was not created by the platform; it was left alone")]
    Foreign {
        /// The masked name.
        name: String,
    },
    /// The backend failed.
    #[error("the backend failed to {operation} {name}")]
    Unavailable {
        /// What was being attempted.
        operation: &'static str,
        /// The masked name.
        name: String,
        /// The backend's error, with any token masked.
        #[source]
        source: BoxError,
    },
}

impl BackendError {
    /// A backend failure on `name`.
    pub fn unavailable(
        operation: &'static str,
        name: &BackendName,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Unavailable {
            operation,
            name: name.masked(),
            source: source.into(),
        }
    }
}

/// Creates and tears down backend objects.
pub trait Backend: Send + Sync {
    /// Whether this backend provisions `resource_type` (checked before anything is reserved).
    fn supports(&self, resource_type: ResourceType) -> bool;

    /// Creates the object if it is absent (so a retry is safe) and answers how it is addressed.
    /// Creating an object that already exists resets its credentials.
    fn create(
        &self,
        name: &BackendName,
        tier: &Tier,
    ) -> impl Future<Output = Result<BackendObject, BackendError>> + Send;

    /// Issues new credentials for the object if it exists and answers how it is now addressed;
    /// `None` when it does not exist. It never creates the object: a rotation racing a
    /// teardown must not bring back what the teardown removed, unowned and unbilled.
    fn reset_credentials(
        &self,
        name: &BackendName,
        tier: &Tier,
    ) -> impl Future<Output = Result<Option<BackendObject>, BackendError>> + Send;

    /// Tears the object down; an absent object is success (so a retry is safe). The customer's
    /// way in goes first (a database's role loses its login, password and sessions before
    /// anything is dropped), so a teardown that fails half way never leaves a working login.
    fn teardown(&self, name: &BackendName)
    -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Whether the object exists.
    fn exists(&self, name: &BackendName)
    -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Whether the object carries the protection mark (`keel.dev/protect=true`): the deprovision
    /// chokepoint never tears down a protected object. An absent object is not protected.
    fn protected(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Everything the orphan reclaim must know about the object before it writes an audit row:
    /// whether it exists or is already being deleted, and its ownership and protection marks.
    /// The default asks [`Backend::exists`] and [`Backend::protected`] and knows no stamp.
    fn preflight(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<Preflight, BackendError>> + Send {
        async move {
            if !self.exists(name).await? {
                return Ok(Preflight::Absent);
            }
            Ok(Preflight::Present(ObjectFacts {
                platform_made: true,
                protected: self.protected(name).await?,
                installation: None,
                incarnation: None,
            }))
        }
    }
}

/// An adapter's error kept only as text, with the customer token masked and no source attached
/// (the original error, whose text may name the object in full, is dropped). Adapters wrap
/// backend and database errors in it before they reach a port's error type.
pub struct RedactedError(String);

impl RedactedError {
    /// `text` with every occurrence of `token` masked.
    pub fn masking(text: &str, token: &Token) -> Self {
        Self(text.replace(token.expose(), &token.masked()))
    }

    /// Text that is already free of tokens.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

impl fmt::Display for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RedactedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedactedError").field(&self.0).finish()
    }
}

impl std::error::Error for RedactedError {}
