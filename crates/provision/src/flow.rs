//! The provisioning flow as typestate: reserve → create → finalize → [`Provisioned`], and the one
//! audited deprovision chokepoint.
//!
//! - A [`Reservation`] (the `pending` row) can only be consumed by [`Provisioner::create`] or
//!   [`Provisioner::abort`].
//! - A [`Created`] (the backend object exists) can only be consumed by [`Provisioner::finalize`] or
//!   [`Provisioner::abort_created`].
//! - A [`Provisioned`] can only be built by `finalize`, after the row is `active` with its provider
//!   id and connection URL and its `provision.created` audit row committed.
//! - The 201 body, [`ProvisionedBody`], can only be built from a `Provisioned`.
//!
//! Rust cannot forbid dropping a value, so a dropped `Reservation` leaves its `pending` row behind
//! (with its deterministic name, which is how an operator finds it: the sweep counts `pending` as
//! live); both types are `#[must_use]`, so ignoring one is a warning (an error under
//! `deny(unused_must_use)`). The API runs each provisioning in a task of its own, so a client
//! that disconnects mid-flow does not cut it short.

use keel_audit::{
    Actor, AuditEvent, AuditFieldError, AuditKind, RequestId, ResourceId, ResourceType, TeamId,
    Tier, Token,
};
use time::OffsetDateTime;

use crate::envelope::ErrorCode;
use crate::metrics::{Outcome, ProvisionMetrics, TeardownStage};
use crate::model::{
    BackendName, BackendObject, DeprovisionReason, ProvisionRequest, ResourceRecord, ResourceStatus,
};
use crate::ports::{Backend, BackendError, Flip, NewReservation, ResourceStore, StoreError};
use crate::reclaim::{OBJECT_ID_ATTRIBUTE, OrphanRecord, Preflight, ReclaimRefusal};
use crate::secret::ConnectionUrl;

/// Why [`Provisioner::rotate_credentials`] issued no credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    /// Only an active resource has credentials to rotate.
    #[error("the resource is {}; only an active resource's credentials rotate", .0.as_str())]
    NotActive(ResourceStatus),
    /// The backend could not reset them (the old ones may still work).
    #[error("could not reset the credentials")]
    Backend(#[source] BackendError),
    /// The resource is active but its backend object does not exist (removed outside the
    /// platform): nothing was created, rotated or audited.
    #[error("the resource is active but its backend object does not exist; nothing was rotated")]
    ObjectMissing,
    /// The rotation could not be recorded (the new password is shown to nobody).
    #[error("could not record the rotation")]
    Store(#[source] StoreError),
}

/// A reserved resource: its `pending` row is written, its backend object not created yet.
#[derive(Debug)]
#[must_use = "a reservation must be created and finalized, or aborted; dropping it leaves a pending row"]
pub struct Reservation {
    id: ResourceId,
    team_id: TeamId,
    tier: Tier,
    token: Token,
    name: BackendName,
    request_id: Option<RequestId>,
    actor: Actor,
}

impl Reservation {
    /// The reserved resource's id.
    pub fn id(&self) -> ResourceId {
        self.id
    }

    /// The backend object it names (deterministic from its token).
    pub fn backend_name(&self) -> &BackendName {
        &self.name
    }
}

/// A reservation whose backend object exists; the row is still `pending`.
#[derive(Debug)]
#[must_use = "a created backend object must be finalized or aborted; dropping it leaves an unaddressable object"]
pub struct Created {
    reservation: Reservation,
    object: BackendObject,
}

impl Created {
    /// The resource's id.
    pub fn id(&self) -> ResourceId {
        self.reservation.id
    }
}

/// A resource that is addressable: the row is `active` with its provider id and connection URL,
/// and its `provision.created` audit row is committed. Only [`Provisioner::finalize`] builds one.
#[derive(Debug)]
pub struct Provisioned {
    id: ResourceId,
    team_id: TeamId,
    resource_type: ResourceType,
    tier: Tier,
    token: Token,
    connection_url: ConnectionUrl,
    request_id: Option<RequestId>,
}

impl Provisioned {
    /// The resource id.
    pub fn id(&self) -> ResourceId {
        self.id
    }

    /// The token (displays masked).
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// How the customer connects.
    pub fn connection_url(&self) -> &ConnectionUrl {
        &self.connection_url
    }
}

/// The body of the 201: the one response that shows the connection URL. Only built from a
/// [`Provisioned`]. Its `Debug` redacts the URL.
#[derive(serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProvisionedBody {
    /// Always `true`.
    ok: bool,
    /// The resource id.
    id: String,
    /// The owning team.
    team_id: String,
    /// What was provisioned.
    resource_type: &'static str,
    /// Its tier.
    tier: String,
    /// Always `active`.
    status: &'static str,
    /// How to connect, password included. Shown in the first 201 only: a replay of the same
    /// `Idempotency-Key` omits it (rotate the credentials for a new one).
    #[cfg_attr(feature = "openapi", schema(required = false))]
    connection_url: String,
    /// The request id.
    request_id: String,
}

impl std::fmt::Debug for ProvisionedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionedBody")
            .field("id", &self.id)
            .field("resource_type", &self.resource_type)
            .field("tier", &self.tier)
            .field("connection_url", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl From<Provisioned> for ProvisionedBody {
    fn from(provisioned: Provisioned) -> Self {
        Self {
            ok: true,
            id: provisioned.id.to_string(),
            team_id: provisioned.team_id.to_string(),
            resource_type: provisioned.resource_type.as_str(),
            tier: provisioned.tier.as_str().to_owned(),
            status: "active",
            connection_url: provisioned.connection_url.expose().to_owned(),
            request_id: provisioned
                .request_id
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// Whether a compensating teardown removed the backend object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeardownResult {
    /// The object is gone (or was never there).
    TornDown,
    /// The teardown failed: the object may be left behind. Logged, counted and audited
    /// (`provision.teardown_failed`).
    Failed,
    /// The backend said an object under the platform's name is not the platform's: it was left
    /// alone (never torn down by a compensation).
    LeftAlone,
    /// Nothing was torn down because the state flip did not prove the object is the
    /// compensation's to destroy: the row is live (its finalize committed) or the store could not
    /// be reached (the reconciler settles the row later).
    NotAttempted,
}

/// What the compensation's `pending → failed` flip found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowResult {
    /// This compensation flipped the row to `failed` (soft-deleted), with its audit row.
    SoftDeleted,
    /// The row was already settled (`failed` by another compensation, or `deleted` by the
    /// deprovision chokepoint); nothing was written again.
    AlreadySettled,
    /// The row is live (`active`, `paused` or `suspended`): a finalize committed even though its
    /// caller heard an error. It is the truth, never torn down.
    Live,
    /// The store failed: the row stays `pending` (ERROR log,
    /// `instant_provision_uncompensated_total`) and the reconciler settles it once it is older
    /// than its age limit.
    LeftPending,
}

/// What compensating a failed provisioning did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compensation {
    /// The backend object.
    pub teardown: TeardownResult,
    /// The row.
    pub row: RowResult,
    /// Whether this compensation recorded its audit row (with its state flip).
    pub audited: bool,
}

impl Compensation {
    /// Whether nothing of the attempt is left to clean up: the row is settled and no object of
    /// the platform's is left behind.
    pub fn is_clean(&self) -> bool {
        let row_settled = match self.row {
            RowResult::SoftDeleted | RowResult::AlreadySettled => true,
            RowResult::Live | RowResult::LeftPending => false,
        };
        let object_gone = match self.teardown {
            TeardownResult::TornDown | TeardownResult::LeftAlone => true,
            TeardownResult::Failed | TeardownResult::NotAttempted => false,
        };
        row_settled && object_gone
    }
}

impl std::fmt::Display for Compensation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let object = match (self.teardown, self.audited) {
            (TeardownResult::TornDown, _) => "the backend object was torn down",
            (TeardownResult::Failed, true) => {
                "the backend object could not be torn down (recorded for cleanup)"
            }
            (TeardownResult::Failed, false) => "the backend object could not be torn down",
            (TeardownResult::LeftAlone, _) => "an object that is not the platform's was left alone",
            (TeardownResult::NotAttempted, _) => "nothing was torn down",
        };
        let row = match self.row {
            RowResult::SoftDeleted => "the reservation was marked failed",
            RowResult::AlreadySettled => "the reservation was already settled",
            RowResult::Live => "the resource is live",
            RowResult::LeftPending => {
                "the reservation stays pending until the reconciler settles it"
            }
        };
        write!(f, "{object} and {row}")
    }
}

/// The step a provisioning failed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailedStep {
    /// Creating the backend object.
    Create,
    /// Finalizing the row (including its audit row).
    Finalize,
    /// Nothing failed in this process: the reservation stayed `pending` past the reconciler's
    /// age limit (a provisioning cut short by a crash or a shutdown deadline).
    Stale,
}

impl FailedStep {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Finalize => "finalize",
            Self::Stale => "stale",
        }
    }

    /// The audit kind its compensation records: only a failure after a successful create is a
    /// persistence failure (which pages).
    const fn audit_kind(self) -> AuditKind {
        match self {
            Self::Create => AuditKind::ProvisionCreateFailed,
            Self::Finalize => AuditKind::ProvisionPersistenceFailed,
            Self::Stale => AuditKind::ProvisionReconciled,
        }
    }
}

/// Why a provisioning did not produce a [`Provisioned`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The team does not exist; nothing was written.
    #[error("the team does not exist")]
    TeamNotFound,
    /// No backend for this resource type is configured here; nothing was written.
    #[error("{0} resources are not offered here")]
    Unsupported(ResourceType),
    /// The reservation could not be written; nothing was created.
    #[error("could not reserve the resource")]
    Reserve(#[source] StoreError),
    /// A step after the reservation failed and the flow was compensated.
    #[error("could not {} the resource; {compensation}", step.as_str())]
    Failed {
        /// The reserved resource (its row tells what became of it).
        resource_id: ResourceId,
        /// The step that failed.
        step: FailedStep,
        /// What the compensation did.
        compensation: Compensation,
        /// The failure.
        #[source]
        source: StepError,
    },
}

/// The failure behind [`ProvisionError::Failed`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// The backend failed.
    #[error(transparent)]
    Backend(BackendError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// An audit row could not be built.
    #[error(transparent)]
    Audit(AuditFieldError),
}

impl ProvisionError {
    /// The error code the API answers with. A failed attempt whose compensation left something
    /// to clean up answers `provision_incomplete`, never "nothing was left behind".
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TeamNotFound => ErrorCode::TeamNotFound,
            Self::Unsupported(_) => ErrorCode::UnknownResourceType,
            Self::Reserve(_) => ErrorCode::ProvisionFailed,
            Self::Failed { compensation, .. } if compensation.is_clean() => {
                ErrorCode::ProvisionFailed
            }
            Self::Failed { .. } => ErrorCode::ProvisionIncomplete,
        }
    }

    /// Whether the reserved resource's fate is still open after this error: its row was left
    /// `pending` (the store failed while compensating, so a finalize whose reply was lost may
    /// have committed) or found live. While it holds, a retry of the same request must not
    /// create another resource: it waits for the row to be settled, and answers the resource if
    /// the row turned out live. Without a reservation, or with its row settled `failed` or
    /// `deleted`, nothing of the attempt can be live.
    pub fn fate_unsettled(&self) -> bool {
        match self {
            Self::TeamNotFound | Self::Unsupported(_) | Self::Reserve(_) => false,
            Self::Failed { compensation, .. } => match compensation.row {
                RowResult::SoftDeleted | RowResult::AlreadySettled => false,
                RowResult::Live | RowResult::LeftPending => true,
            },
        }
    }

    /// The reserved resource's id, when a reservation was written.
    pub fn resource_id(&self) -> Option<ResourceId> {
        match self {
            Self::Failed { resource_id, .. } => Some(*resource_id),
            Self::TeamNotFound | Self::Unsupported(_) | Self::Reserve(_) => None,
        }
    }
}

/// A closed bucket for why a step failed, recorded as the `reason` attribute of the
/// compensation's audit row (never the error text, which may name a customer object).
fn reason_of(error: &StepError) -> &'static str {
    match error {
        StepError::Backend(BackendError::Unsupported(_)) => "backend_unsupported",
        StepError::Backend(BackendError::Foreign { .. }) => "foreign_object",
        StepError::Backend(BackendError::Unavailable { .. }) => "backend_unavailable",
        StepError::Store(StoreError::WrongStatus { .. }) => "row_not_pending",
        StepError::Store(
            StoreError::TeamNotFound
            | StoreError::ResourceNotFound
            | StoreError::Unavailable { .. },
        ) => "store_unavailable",
        StepError::Store(StoreError::Corrupt { .. }) => "store_row_corrupt",
        StepError::Audit(_) => "audit_row_invalid",
    }
}

/// An error with its whole `source()` chain, for logs (each adapter error is already redacted).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// What the deprovision chokepoint tears down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeprovisionTarget {
    /// A resource (live or already soft-deleted).
    Resource(ResourceId),
    /// A backend object no live resource owns (the orphan sweep's reclaim).
    Orphan(BackendName),
}

/// What the chokepoint did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deprovisioned {
    /// The resource was live: audited, soft-deleted, and its object torn down.
    Retired,
    /// The resource was already soft-deleted: nothing was audited again; its object was torn
    /// down if it was still there (which finishes a teardown that failed before).
    AlreadyRetired,
    /// An orphan was audited and torn down.
    OrphanReclaimed,
    /// The orphan was already gone: nothing was done.
    OrphanAbsent,
}

/// Why the chokepoint refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeprovisionError {
    /// No such resource.
    #[error("the resource does not exist")]
    NotFound,
    /// The row's provider id is not the platform's name for its token: nothing was touched.
    #[error("the resource's provider id is not one of the platform's names; nothing was touched")]
    ForeignName,
    /// The orphan's token has a live resource: nothing was touched.
    #[error("a live resource ({status}) owns this backend object; nothing was touched")]
    Live {
        /// The live resource's status.
        status: &'static str,
    },
    /// No backend for the resource's type is configured in this deployment: a permanent
    /// configuration error, found before anything was written or torn down.
    #[error("{0} resources are not served by this deployment; nothing was touched")]
    Unsupported(ResourceType),
    /// The backend object carries `keel.dev/protect=true`: nothing was torn down. (When the
    /// mark appeared between the audit and the teardown, the row is already retired and the
    /// object is kept.)
    #[error("the backend object is protected (keel.dev/protect); it was not torn down")]
    Protected,
    /// The store failed (the deprovision may or may not have been recorded); nothing was torn
    /// down. Calling the chokepoint again finishes it either way.
    #[error("the store failed; nothing was torn down; call again to finish the deprovision")]
    Store(#[source] StoreError),
    /// An audit row could not be built; nothing was touched.
    #[error(transparent)]
    Audit(AuditFieldError),
    /// The deprovision is audited (and the row soft-deleted) but the teardown failed; calling the
    /// chokepoint again retries it, and the orphan sweep finds the object too.
    #[error("deprovision audited but the teardown failed")]
    Teardown(#[source] BackendError),
    /// The orphan reclaim was refused before anything was destroyed or audited as
    /// deprovisioned (`resource.reclaim_refused` records it once per object and reason).
    #[error("the orphan reclaim was refused ({0}); nothing was destroyed")]
    Refused(ReclaimRefusal),
    /// The orphan is already being deleted (a namespace stuck terminating): nothing was audited
    /// or destroyed again.
    #[error("the backend object is already being deleted; nothing was done")]
    BeingDeleted,
}

impl DeprovisionError {
    /// The error code the API answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotFound => ErrorCode::ResourceNotFound,
            Self::Protected | Self::Refused(ReclaimRefusal::Protected) => {
                ErrorCode::ResourceProtected
            }
            Self::Store(_) | Self::Teardown(_) => ErrorCode::BackendUnavailable,
            Self::Unsupported(_)
            | Self::ForeignName
            | Self::Live { .. }
            | Self::Audit(_)
            | Self::BeingDeleted
            | Self::Refused(
                ReclaimRefusal::ForeignInstallation
                | ReclaimRefusal::Unowned
                | ReclaimRefusal::NotPlatformMade,
            ) => ErrorCode::Internal,
        }
    }
}

/// Who deprovisions, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeprovisionCause {
    /// Why.
    pub reason: DeprovisionReason,
    /// Who.
    pub actor: Actor,
    /// The request, when there is one.
    pub request_id: Option<RequestId>,
}

/// Drives the flow over a resource store and a backend.
#[derive(Debug)]
pub struct Provisioner<S, B> {
    store: S,
    backend: B,
    metrics: ProvisionMetrics,
}

impl<S: ResourceStore, B: Backend> Provisioner<S, B> {
    /// A provisioner over `store` and `backend`, counting into `metrics`.
    pub fn new(store: S, backend: B, metrics: ProvisionMetrics) -> Self {
        Self {
            store,
            backend,
            metrics,
        }
    }

    /// The store, for tests that inject faults into it (feature `testing`). Outside tests the
    /// store is reachable only through the flow, so no caller can activate a row by hand.
    #[cfg(feature = "testing")]
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reads a resource (soft-deleted ones included), without its secret.
    pub async fn get(&self, id: ResourceId) -> Result<Option<ResourceRecord>, StoreError> {
        self.store.get(id).await
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The metrics.
    pub fn metrics(&self) -> &ProvisionMetrics {
        &self.metrics
    }

    /// Reserve, create and finalize: the whole flow, every step at `now`. On any failure after
    /// the reservation the flow is compensated before this returns.
    pub async fn provision(
        &self,
        request: ProvisionRequest,
        now: OffsetDateTime,
    ) -> Result<Provisioned, ProvisionError> {
        self.provision_at(request, || now).await
    }

    /// [`Provisioner::provision`] reading `clock` once per step, so each row change and audit
    /// row carries the time it happened (a finalize that fails a minute in is not recorded at
    /// the request's start).
    pub async fn provision_at(
        &self,
        request: ProvisionRequest,
        clock: impl Fn() -> OffsetDateTime + Send + Sync,
    ) -> Result<Provisioned, ProvisionError> {
        let reservation = self.reserve(request, clock()).await?;
        let created = self.create(reservation, clock()).await?;
        self.finalize(created, clock()).await
    }

    /// Writes the intent: a `pending` row with a fresh token and its deterministic backend name.
    pub async fn reserve(
        &self,
        request: ProvisionRequest,
        now: OffsetDateTime,
    ) -> Result<Reservation, ProvisionError> {
        let resource_type = request.resource_type;
        if !self.backend.supports(resource_type) {
            self.metrics.outcome(resource_type, Outcome::Refused);
            return Err(ProvisionError::Unsupported(resource_type));
        }
        let new = NewReservation {
            id: ResourceId::new_random(),
            team_id: request.team_id,
            resource_type,
            tier: request.tier.clone(),
            now,
        };
        match self.store.reserve(&new).await {
            Ok(token) => Ok(Reservation {
                id: new.id,
                team_id: request.team_id,
                tier: request.tier,
                name: BackendName::for_resource(resource_type, &token),
                token,
                request_id: Some(request.request_id),
                actor: request.actor,
            }),
            Err(StoreError::TeamNotFound) => {
                self.metrics.outcome(resource_type, Outcome::Refused);
                Err(ProvisionError::TeamNotFound)
            }
            Err(e) => {
                tracing::error!(resource_type = %resource_type, error = %ErrorChain(&e), "could not reserve a resource; nothing was created");
                // The reservation may have been written although its answer was lost (a deadline,
                // a connection that ended after the commit): it is settled now, so no `pending`
                // row the client never heard of holds the team's quota until the reconciler.
                let audit = AuditEvent::new(AuditKind::ProvisionReconciled, request.actor, now)
                    .team(request.team_id)
                    .resource(new.id)
                    .request(request.request_id)
                    .attr("resource_type", resource_type.as_str())
                    .and_then(|event| event.attr("tier", request.tier.as_str()))
                    .and_then(|event| event.attr("failed_step", "reserve"))
                    .and_then(|event| event.attr("reason", "reservation_reply_lost"))
                    .map_err(|e| {
                        tracing::error!(error = %e, "could not build the settled reservation's audit row")
                    })
                    .ok();
                match self.store.abandon(new.id, audit.as_ref(), now).await {
                    Ok(Flip::Flipped) => tracing::warn!(
                        resource_id = %new.id,
                        "a reservation had been written although its answer was lost; it is marked failed"
                    ),
                    Ok(Flip::Found(_)) | Err(StoreError::ResourceNotFound) => {}
                    Err(settle) => tracing::error!(
                        resource_id = %new.id,
                        error = %ErrorChain(&settle),
                        "could not settle a reservation that may have been written; the \
                         stale-pending reconciler settles it"
                    ),
                }
                self.metrics.outcome(resource_type, Outcome::ReserveFailed);
                Err(ProvisionError::Reserve(e))
            }
        }
    }

    /// Creates the backend object (create-if-absent). On failure the reservation is compensated.
    pub async fn create(
        &self,
        reservation: Reservation,
        now: OffsetDateTime,
    ) -> Result<Created, ProvisionError> {
        match self
            .backend
            .create(&reservation.name, &reservation.tier)
            .await
        {
            Ok(object) => Ok(Created {
                reservation,
                object,
            }),
            Err(e) => {
                let foreign = match &e {
                    BackendError::Foreign { .. } => true,
                    BackendError::Unsupported(_) | BackendError::Unavailable { .. } => false,
                };
                let source = StepError::Backend(e);
                tracing::error!(
                    resource_id = %reservation.id,
                    name = %reservation.name,
                    error = %ErrorChain(&source),
                    "could not create a backend object; compensating"
                );
                let compensation = self
                    .compensate(
                        &reservation,
                        FailedStep::Create,
                        reason_of(&source),
                        !foreign,
                        now,
                    )
                    .await;
                self.metrics
                    .outcome(reservation.name.resource_type(), Outcome::CreateFailed);
                Err(ProvisionError::Failed {
                    resource_id: reservation.id,
                    step: FailedStep::Create,
                    compensation,
                    source,
                })
            }
        }
    }

    /// Marks the row `active` with its provider id and connection address and records
    /// `provision.created`, in one transaction. On failure the compensation first wins the
    /// `pending → failed` flip, then tears the backend object down and records
    /// `provision.persistence_failed`; the error maps to a 503. When the flip finds the row
    /// already `active`, the activation committed although its reply was lost: that is the
    /// truth, and the resource is returned as provisioned.
    pub async fn finalize(
        &self,
        created: Created,
        now: OffsetDateTime,
    ) -> Result<Provisioned, ProvisionError> {
        let Created {
            reservation,
            object,
        } = created;
        let resource_type = reservation.name.resource_type();
        let activated = match self.audit_for(AuditKind::ProvisionCreated, &reservation, now) {
            Ok(audit) => self
                .store
                .activate(reservation.id, &object, &audit, now)
                .await
                .map_err(StepError::Store),
            Err(e) => Err(StepError::Audit(e)),
        };
        let provisioned = |reservation: Reservation, object: BackendObject| Provisioned {
            id: reservation.id,
            team_id: reservation.team_id,
            resource_type,
            tier: reservation.tier,
            token: reservation.token.clone(),
            connection_url: object.connection_url,
            request_id: reservation.request_id,
        };
        match activated {
            Ok(()) => {
                self.metrics.outcome(resource_type, Outcome::Provisioned);
                tracing::info!(resource_id = %reservation.id, name = %reservation.name, "provisioned a resource");
                Ok(provisioned(reservation, object))
            }
            Err(source) => {
                tracing::error!(
                    resource_id = %reservation.id,
                    resource_type = %resource_type,
                    error = %ErrorChain(&source),
                    "could not finalize a provisioned resource; compensating"
                );
                let compensation = self
                    .compensate(
                        &reservation,
                        FailedStep::Finalize,
                        reason_of(&source),
                        true,
                        now,
                    )
                    .await;
                if compensation.row == RowResult::Live {
                    tracing::warn!(
                        resource_id = %reservation.id,
                        "the finalize committed although its reply was lost; the resource is live"
                    );
                    self.metrics.outcome(resource_type, Outcome::Provisioned);
                    return Ok(provisioned(reservation, object));
                }
                self.metrics.outcome(resource_type, Outcome::FinalizeFailed);
                Err(ProvisionError::Failed {
                    resource_id: reservation.id,
                    step: FailedStep::Finalize,
                    compensation,
                    source,
                })
            }
        }
    }

    /// Gives up on a reservation before its backend object is created: flips the row to `failed`
    /// and tears down anything a partial create may have left.
    pub async fn abort(&self, reservation: Reservation, now: OffsetDateTime) -> Compensation {
        self.compensate(&reservation, FailedStep::Create, "aborted", true, now)
            .await
    }

    /// Gives up on a created backend object: flips the row to `failed`, records
    /// `provision.persistence_failed`, then tears the object down.
    pub async fn abort_created(&self, created: Created, now: OffsetDateTime) -> Compensation {
        self.compensate(
            &created.reservation,
            FailedStep::Finalize,
            "aborted",
            true,
            now,
        )
        .await
    }

    /// Settles up to `limit` `pending` rows reserved more than `older_than` ago (by the store's
    /// clock), oldest first: each is compensated like a failed provisioning (flip to `failed`
    /// with `provision.reconciled`, then teardown). A row whose provisioning is still running
    /// loses the flip race harmlessly: the flow's own finalize then finds it `failed` and tears
    /// its object down. A row whose finalize commits first is left alone (the flip finds it
    /// `active`). Rows that do not decode are read past, not counted against `limit`, so any
    /// number of them never holds back a decodable stale row.
    pub async fn reconcile_pending(
        &self,
        older_than: std::time::Duration,
        limit: u32,
        now: OffsetDateTime,
    ) -> Result<Vec<(ResourceId, Compensation)>, StoreError> {
        let mut stale = Vec::new();
        let mut after = None;
        loop {
            let wanted = limit.saturating_sub(u32::try_from(stale.len()).unwrap_or(u32::MAX));
            if wanted == 0 {
                break;
            }
            let page = self.store.stale_pending(older_than, after, wanted).await?;
            stale.extend(page.records);
            match page.next {
                // The cursor only moves forward, so the listing ends.
                Some(next) if after.is_none_or(|a: crate::StaleCursor| next != a) => {
                    after = Some(next);
                }
                _ => break,
            }
        }
        let mut settled = Vec::with_capacity(stale.len());
        for record in stale {
            let reservation = Reservation {
                id: record.id,
                team_id: record.team_id,
                tier: record.tier.clone(),
                name: record.backend_name(),
                token: record.token.clone(),
                request_id: None,
                actor: Actor::system(),
            };
            let compensation = self
                .compensate(&reservation, FailedStep::Stale, "stale_pending", true, now)
                .await;
            tracing::warn!(
                resource_id = %record.id,
                name = %reservation.name,
                %compensation,
                "reconciled a stale pending reservation"
            );
            settled.push((record.id, compensation));
        }
        Ok(settled)
    }

    fn audit_for(
        &self,
        kind: AuditKind,
        reservation: &Reservation,
        now: OffsetDateTime,
    ) -> Result<AuditEvent, AuditFieldError> {
        let mut event = AuditEvent::new(kind, reservation.actor.clone(), now)
            .team(reservation.team_id)
            .resource(reservation.id);
        if let Some(request_id) = &reservation.request_id {
            event = event.request(request_id.clone());
        }
        event
            .attr("resource_type", reservation.name.resource_type().as_str())?
            .attr("tier", reservation.tier.as_str())?
            .attr("provider_id", reservation.name.masked())
    }

    /// Compensates a reservation. **The state flip comes first**: `pending → failed`,
    /// conditional, with the step's audit row in the same transaction. Only what that flip
    /// proves is the compensation's own is torn down (the flip happened, or the row was already
    /// `failed`/`deleted` so no one will make it live again); a live row (an ambiguous finalize
    /// that did commit) and an unreachable store tear nothing down. A teardown that fails is
    /// recorded as `provision.teardown_failed`, logged and counted.
    async fn compensate(
        &self,
        reservation: &Reservation,
        step: FailedStep,
        reason: &'static str,
        tear_down: bool,
        now: OffsetDateTime,
    ) -> Compensation {
        let resource_type = reservation.name.resource_type();
        let audit = self
            .audit_for(step.audit_kind(), reservation, now)
            .and_then(|event| event.attr("failed_step", step.as_str()))
            .and_then(|event| event.attr("reason", reason))
            .and_then(|event| {
                event.attr(
                    "compensation",
                    if tear_down { "teardown" } else { "left_alone" },
                )
            })
            .map_err(
                |e| tracing::error!(error = %e, "could not build the compensation's audit row"),
            )
            .ok();
        // One retry: a flip whose reply was lost is found `failed` by the second attempt.
        let mut flip = self
            .store
            .abandon(reservation.id, audit.as_ref(), now)
            .await;
        if let Err(e) = &flip {
            tracing::warn!(resource_id = %reservation.id, error = %ErrorChain(e), "the compensation's state flip failed; retrying once");
            flip = self
                .store
                .abandon(reservation.id, audit.as_ref(), now)
                .await;
        }
        let (row, audited, owned) = match flip {
            Ok(Flip::Flipped) => (RowResult::SoftDeleted, audit.is_some(), true),
            Ok(Flip::Found(ResourceStatus::Failed | ResourceStatus::Deleted)) => {
                (RowResult::AlreadySettled, false, true)
            }
            Ok(Flip::Found(
                ResourceStatus::Active | ResourceStatus::Paused | ResourceStatus::Suspended,
            )) => (RowResult::Live, false, false),
            Ok(Flip::Found(ResourceStatus::Pending)) => (RowResult::LeftPending, false, false),
            Err(e) => {
                tracing::error!(resource_id = %reservation.id, error = %ErrorChain(&e), "could not flip the reservation to failed");
                (RowResult::LeftPending, false, false)
            }
        };
        if row == RowResult::LeftPending {
            tracing::error!(
                resource_id = %reservation.id,
                name = %reservation.name,
                "a failed reservation stays pending: nothing was torn down; the reconciler settles it"
            );
            self.metrics.uncompensated(resource_type);
        }
        let teardown = match (owned, tear_down) {
            (false, _) => TeardownResult::NotAttempted,
            (true, false) => TeardownResult::LeftAlone,
            (true, true) => match self.backend.teardown(&reservation.name).await {
                Ok(()) => TeardownResult::TornDown,
                Err(e) => {
                    tracing::error!(
                        resource_id = %reservation.id,
                        name = %reservation.name,
                        error = %ErrorChain(&e),
                        "compensating teardown failed: the backend object may be left behind"
                    );
                    self.metrics
                        .teardown_failed(resource_type, TeardownStage::Compensation);
                    TeardownResult::Failed
                }
            },
        };
        let mut compensation = Compensation {
            teardown,
            row,
            audited,
        };
        if teardown == TeardownResult::Failed {
            let recorded = match self
                .audit_for(AuditKind::ProvisionTeardownFailed, reservation, now)
                .and_then(|event| event.attr("failed_step", step.as_str()))
            {
                Ok(event) => self.store.record(&event).await.map_err(|e| {
                    tracing::error!(resource_id = %reservation.id, error = %ErrorChain(&e), "could not record provision.teardown_failed");
                }),
                Err(e) => {
                    tracing::error!(error = %e, "could not build the teardown_failed audit row");
                    Err(())
                }
            };
            compensation.audited = compensation.audited && recorded.is_ok();
        }
        compensation
    }

    /// The one code path that tears down a live resource's backend object.
    ///
    /// For a resource: records `resource.deprovisioned` (reason, actor) and soft-deletes the row in
    /// one transaction, then tears the object down. The audit row commits before anything is
    /// destroyed, so no object is ever dropped without one; if the teardown then fails, the
    /// error says so, and calling again (the resource is already retired, so nothing is audited
    /// twice) retries it. For an orphan: refuses when the token has a live resource, records
    /// `orphan_sweep.reclaimed`, then tears down; an absent orphan is left alone.
    ///
    /// Every name it touches carries the platform's prefix: names are derived from tokens, and a
    /// row whose provider id is not that name is refused.
    pub async fn deprovision(
        &self,
        target: DeprovisionTarget,
        cause: &DeprovisionCause,
        now: OffsetDateTime,
    ) -> Result<Deprovisioned, DeprovisionError> {
        match target {
            DeprovisionTarget::Resource(id) => self.deprovision_resource(id, cause, now).await,
            DeprovisionTarget::Orphan(name) => self.reclaim_orphan(&name, cause, now).await,
        }
    }

    /// Issues new credentials for an active resource: the backend resets them (it never
    /// creates the object: a rotation racing a deprovision must not bring back what the
    /// teardown removed), then `resource.credentials_rotated` is recorded while the resource
    /// is still active, in a transaction that holds its row against a concurrent deprovision.
    /// The new URL is returned only once that row is committed. A resource that stopped being
    /// active meanwhile, or whose object is gone, answers [`RotateError::NotActive`] and
    /// nothing is audited; a failure after the reset leaves a password nobody holds, and
    /// calling again issues another.
    pub async fn rotate_credentials(
        &self,
        record: &ResourceRecord,
        actor: Actor,
        request_id: Option<RequestId>,
        now: OffsetDateTime,
    ) -> Result<ConnectionUrl, RotateError> {
        match record.status {
            ResourceStatus::Active => {}
            ResourceStatus::Pending
            | ResourceStatus::Paused
            | ResourceStatus::Suspended
            | ResourceStatus::Deleted
            | ResourceStatus::Failed => return Err(RotateError::NotActive(record.status)),
        }
        let reset = self
            .backend
            .reset_credentials(&record.backend_name(), &record.tier)
            .await
            .map_err(RotateError::Backend)?;
        let mut audit = AuditEvent::new(AuditKind::ResourceCredentialsRotated, actor, now)
            .team(record.team_id)
            .resource(record.id);
        if let Some(request_id) = request_id {
            audit = audit.request(request_id);
        }
        let recorded = match reset {
            Some(_) => self
                .store
                .record_while_active(record.id, &audit)
                .await
                .map_err(RotateError::Store)?,
            None => false,
        };
        match reset {
            Some(object) if recorded => Ok(object.connection_url),
            Some(_) | None => {
                let now_status = self
                    .store
                    .get(record.id)
                    .await
                    .map_err(RotateError::Store)?
                    .map_or(ResourceStatus::Deleted, |current| current.status);
                match now_status {
                    ResourceStatus::Active => {
                        tracing::error!(
                            resource_id = %record.id,
                            "an active resource's backend object does not exist; nothing was \
                             rotated (the orphan sweep and the reconciler do not recreate it)"
                        );
                        Err(RotateError::ObjectMissing)
                    }
                    ResourceStatus::Pending
                    | ResourceStatus::Paused
                    | ResourceStatus::Suspended
                    | ResourceStatus::Deleted
                    | ResourceStatus::Failed => {
                        tracing::warn!(
                            resource_id = %record.id,
                            status = now_status.as_str(),
                            "a credential rotation found its resource no longer active; nothing \
                             was audited and no password is shown"
                        );
                        Err(RotateError::NotActive(now_status))
                    }
                }
            }
        }
    }

    fn deprovision_audit(
        &self,
        name: &BackendName,
        cause: &DeprovisionCause,
        now: OffsetDateTime,
    ) -> Result<AuditEvent, AuditFieldError> {
        let mut event = AuditEvent::new(AuditKind::ResourceDeprovisioned, cause.actor.clone(), now)
            .attr("reason", cause.reason.as_str())?
            .attr("resource_type", name.resource_type().as_str())?
            .attr("provider_id", name.masked())?;
        if let Some(request_id) = &cause.request_id {
            event = event.request(request_id.clone());
        }
        Ok(event)
    }

    async fn deprovision_resource(
        &self,
        id: ResourceId,
        cause: &DeprovisionCause,
        now: OffsetDateTime,
    ) -> Result<Deprovisioned, DeprovisionError> {
        let record: ResourceRecord = self
            .store
            .get(id)
            .await
            .map_err(DeprovisionError::Store)?
            .ok_or(DeprovisionError::NotFound)?;
        // A deployment that cannot tear this type down must not retire the row (and notify the
        // customer) first.
        if !self.backend.supports(record.resource_type) {
            return Err(DeprovisionError::Unsupported(record.resource_type));
        }
        let name = record.backend_name();
        if let Some(provider_id) = &record.provider_resource_id {
            match BackendName::parse_provider_id(record.resource_type, provider_id) {
                Ok(stored) if stored == name => {}
                Ok(_) | Err(_) => {
                    tracing::error!(resource_id = %id, "refusing to deprovision: the provider id is not the platform's name for the token");
                    return Err(DeprovisionError::ForeignName);
                }
            }
        }
        self.refuse_protected(&name).await?;
        let outcome = if record.status.is_live() {
            let audit = self
                .deprovision_audit(&name, cause, now)
                .map_err(DeprovisionError::Audit)?
                .team(record.team_id)
                .resource(id);
            let retired = self
                .store
                .retire(id, &audit, now)
                .await
                .map_err(DeprovisionError::Store)?;
            if retired {
                self.metrics
                    .deprovisioned(record.resource_type, cause.reason);
                Deprovisioned::Retired
            } else {
                Deprovisioned::AlreadyRetired
            }
        } else {
            // A failed provisioning's object may have outlived its compensation; it was never
            // deprovisioned, so it is audited before it is torn down.
            let failed = match record.status {
                ResourceStatus::Failed => true,
                ResourceStatus::Pending
                | ResourceStatus::Active
                | ResourceStatus::Paused
                | ResourceStatus::Suspended
                | ResourceStatus::Deleted => false,
            };
            let left_behind = failed
                && self
                    .backend
                    .exists(&name)
                    .await
                    .map_err(DeprovisionError::Teardown)?;
            if left_behind {
                let audit = self
                    .deprovision_audit(&name, cause, now)
                    .map_err(DeprovisionError::Audit)?
                    .team(record.team_id)
                    .resource(id);
                self.store
                    .record(&audit)
                    .await
                    .map_err(DeprovisionError::Store)?;
                self.metrics
                    .deprovisioned(record.resource_type, cause.reason);
            }
            Deprovisioned::AlreadyRetired
        };
        self.teardown_after_audit(&name, id.to_string().as_str())
            .await?;
        Ok(outcome)
    }

    /// The orphan reclaim. Every refusable check runs on a fresh read before any audit row:
    /// liveness (fails closed on an unknown status), the backend's pre-flight (absent, being
    /// deleted, platform-made, installation stamp, protection mark), this installation's
    /// ownership row and the platform's protection. A refusal is recorded once per object and
    /// reason as `resource.reclaim_refused`; only then is `orphan_sweep.reclaimed` written (once
    /// per object, with the liveness check in the same transaction), the object torn down, and
    /// the deprovision counted after the teardown succeeded. A failed teardown is recorded once
    /// as `resource.reclaim_failed`; calling again retries it without a second audit row.
    async fn reclaim_orphan(
        &self,
        name: &BackendName,
        cause: &DeprovisionCause,
        now: OffsetDateTime,
    ) -> Result<Deprovisioned, DeprovisionError> {
        let digest = name.digest();
        let standing = self
            .store
            .orphan_standing(&digest)
            .await
            .map_err(DeprovisionError::Store)?;
        if let Some(row) = standing.row.as_ref().filter(|row| row.status_is_live()) {
            let status = row.status.map_or("unknown", ResourceStatus::as_str);
            tracing::warn!(name = %name, status, "refusing to reclaim: a live resource owns it");
            return Err(DeprovisionError::Live { status });
        }
        let facts = match self
            .backend
            .preflight(name)
            .await
            .map_err(DeprovisionError::Teardown)?
        {
            Preflight::Absent => return Ok(Deprovisioned::OrphanAbsent),
            Preflight::Terminating => {
                tracing::info!(name = %name, "the orphan is already being deleted; nothing to do");
                return Err(DeprovisionError::BeingDeleted);
            }
            Preflight::Present(facts) => facts,
        };
        let orphan_audit = |kind| {
            let mut event = AuditEvent::new(kind, cause.actor.clone(), now)
                .attr("reason", cause.reason.as_str())?
                .attr("resource_type", name.resource_type().as_str())?
                .attr("provider_id", name.masked())?
                .attr("token_fingerprint", digest.fingerprint())?
                .attr("installation", standing.installation.to_string())?;
            if let Some(incarnation) = &facts.incarnation {
                event = event.attr(OBJECT_ID_ATTRIBUTE, incarnation.as_str())?;
            }
            if let Some(row) = &standing.row {
                event = event.team(row.team_id).resource(row.id);
            }
            if let Some(request_id) = &cause.request_id {
                event = event.request(request_id.clone());
            }
            Ok(event)
        };
        if let Some(refusal) = ReclaimRefusal::check(&standing, &facts) {
            tracing::warn!(name = %name, refusal = refusal.as_str(), "refusing to reclaim an orphan");
            let audit = orphan_audit(AuditKind::ResourceReclaimRefused)
                .and_then(|event| event.attr("refusal", refusal.as_str()))
                .map_err(DeprovisionError::Audit)?;
            self.store
                .record_orphan_event(&digest, &audit)
                .await
                .map_err(DeprovisionError::Store)?;
            return Err(DeprovisionError::Refused(refusal));
        }
        let audit =
            orphan_audit(AuditKind::OrphanSweepReclaimed).map_err(DeprovisionError::Audit)?;
        match self
            .store
            .record_orphan_event(&digest, &audit)
            .await
            .map_err(DeprovisionError::Store)?
        {
            OrphanRecord::Written | OrphanRecord::AlreadyRecorded => {}
            OrphanRecord::Live => {
                tracing::warn!(name = %name, "refusing to reclaim: the token turned live");
                return Err(DeprovisionError::Live { status: "live" });
            }
        }
        if let Err(e) = self.teardown_after_audit(name, "orphan").await {
            let failed = orphan_audit(AuditKind::ResourceReclaimFailed)
                .and_then(|event| event.attr("error", failure_kind(&e)));
            match failed {
                Ok(failed) => {
                    if let Err(store) = self.store.record_orphan_event(&digest, &failed).await {
                        tracing::error!(name = %name, error = %ErrorChain(&store), "could not record the failed reclaim");
                    }
                }
                Err(build) => {
                    tracing::error!(name = %name, error = %build, "could not build the failed reclaim's audit row")
                }
            }
            return Err(e);
        }
        self.metrics
            .deprovisioned(name.resource_type(), cause.reason);
        Ok(Deprovisioned::OrphanReclaimed)
    }

    /// The chokepoint's own protection check: every path that tears down asks it, immediately
    /// before the teardown (and before retiring a row).
    async fn refuse_protected(&self, name: &BackendName) -> Result<(), DeprovisionError> {
        match self.backend.protected(name).await {
            Ok(false) => Ok(()),
            Ok(true) => {
                tracing::warn!(name = %name, "refusing to tear down a protected backend object");
                Err(DeprovisionError::Protected)
            }
            Err(e) => Err(DeprovisionError::Teardown(e)),
        }
    }

    async fn teardown_after_audit(
        &self,
        name: &BackendName,
        what: &str,
    ) -> Result<(), DeprovisionError> {
        self.refuse_protected(name).await?;
        self.backend.teardown(name).await.map_err(|e| {
            tracing::error!(target_resource = what, name = %name, error = %ErrorChain(&e), "deprovision is audited but the teardown failed; call it again to retry");
            self.metrics
                .teardown_failed(name.resource_type(), TeardownStage::Deprovision);
            DeprovisionError::Teardown(e)
        })
    }
}

/// A failed reclaim's cause as a closed value for its audit row (never backend text).
fn failure_kind(error: &DeprovisionError) -> &'static str {
    match error {
        DeprovisionError::Protected | DeprovisionError::Refused(_) => "refused",
        DeprovisionError::Teardown(BackendError::Foreign { .. }) => "foreign",
        DeprovisionError::Teardown(BackendError::Unsupported(_)) => "unsupported",
        DeprovisionError::Teardown(BackendError::Unavailable { .. }) => "backend_unavailable",
        DeprovisionError::NotFound
        | DeprovisionError::ForeignName
        | DeprovisionError::Live { .. }
        | DeprovisionError::Unsupported(_)
        | DeprovisionError::Store(_)
        | DeprovisionError::Audit(_)
        | DeprovisionError::BeingDeleted => "other",
    }
}
