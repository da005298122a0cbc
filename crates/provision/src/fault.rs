//! Fault injection for tests (feature `testing`): wrappers that make a store or a backend fail
//! at a chosen step, a chosen number of times, and otherwise pass through to the real adapter.
//!
//! A fault fires either **before** the real call (nothing reached the store or backend) or
//! **after** it (the real call ran to completion and its answer is replaced by an error: a
//! commit that happened but whose reply was lost, a teardown that happened but was reported as
//! failed). Every step has both variants ([`When`]).
//!
//! ```
//! use keel_provision::fault::{BackendStep, FaultyBackend};
//! # struct Nothing;
//! # let real = Nothing;
//! let backend = FaultyBackend::new(real);
//! backend.fail(BackendStep::Teardown, 1); // the next teardown fails, later ones pass through
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};

use keel_audit::{AuditEvent, ResourceId, ResourceType, Tier, Token};
use time::OffsetDateTime;

use crate::model::{BackendName, BackendObject, ResourceRecord, ResourceStatus};
use crate::names::TokenDigest;
use crate::ports::{
    Backend, BackendError, Flip, NewReservation, ResourceStore, StaleCursor, StalePage, StoreError,
};
use crate::reclaim::{OrphanRecord, OrphanStanding, Preflight};

/// The error an injected fault returns.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct InjectedFault(pub &'static str);

/// When an injected fault fires relative to the real call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum When {
    /// Instead of the real call: nothing happened.
    Before,
    /// After the real call succeeded: it happened, but the caller hears an error.
    After,
}

#[derive(Debug, Default)]
struct Faults<K>(Mutex<HashMap<(K, When), usize>>);

impl<K: Hash + Eq + Copy> Faults<K> {
    fn set(&self, step: K, when: When, times: usize) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((step, when), times);
    }

    /// Whether this call at `step` fails at `when` (consuming one planned failure).
    fn take(&self, step: K, when: When) -> bool {
        let mut faults = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match faults.get_mut(&(step, when)) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            Some(_) | None => false,
        }
    }
}

/// A [`ResourceStore`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum StoreStep {
    /// [`ResourceStore::reserve`].
    Reserve,
    /// [`ResourceStore::activate`] (finalize).
    Activate,
    /// [`ResourceStore::abandon`] (compensation).
    Abandon,
    /// [`ResourceStore::retire`] (deprovision).
    Retire,
    /// [`ResourceStore::record`].
    Record,
    /// [`ResourceStore::get`].
    Get,
    /// [`ResourceStore::live_for_digest`].
    LiveForDigest,
    /// [`ResourceStore::stale_pending`].
    StalePending,
}

impl StoreStep {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "store.reserve",
            Self::Activate => "store.activate",
            Self::Abandon => "store.abandon",
            Self::Retire => "store.retire",
            Self::Record => "store.record",
            Self::Get => "store.get",
            Self::LiveForDigest => "store.live_for_digest",
            Self::StalePending => "store.stale_pending",
        }
    }
}

/// A store that fails at chosen steps and otherwise delegates to `inner`.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Faults<StoreStep>,
}

impl<S> FaultyStore<S> {
    /// Wraps `inner`; nothing fails until [`FaultyStore::fail`] is called.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Faults(Mutex::default()),
        }
    }

    /// Makes the next `times` calls at `step` fail without reaching the real store.
    pub fn fail(&self, step: StoreStep, times: usize) {
        self.faults.set(step, When::Before, times);
    }

    /// Makes the next `times` calls at `step` reach the real store and then report an error
    /// (the change is made, the reply is lost).
    pub fn fail_after(&self, step: StoreStep, times: usize) {
        self.faults.set(step, When::After, times);
    }

    /// [`FaultyStore::fail`] or [`FaultyStore::fail_after`].
    pub fn fail_at(&self, step: StoreStep, when: When, times: usize) {
        self.faults.set(step, when, times);
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&self, step: StoreStep, when: When) -> Result<(), StoreError> {
        if self.faults.take(step, when) {
            Err(StoreError::unavailable(
                step.as_str(),
                InjectedFault(step.as_str()),
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: ResourceStore> ResourceStore for FaultyStore<S> {
    fn reserve(
        &self,
        reservation: &NewReservation,
    ) -> impl Future<Output = Result<Token, StoreError>> + Send {
        self.around(StoreStep::Reserve, self.inner.reserve(reservation))
    }

    fn activate(
        &self,
        id: ResourceId,
        object: &BackendObject,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.around(
            StoreStep::Activate,
            self.inner.activate(id, object, audit, now),
        )
    }

    fn abandon(
        &self,
        id: ResourceId,
        audit: Option<&AuditEvent>,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Flip, StoreError>> + Send {
        self.around(StoreStep::Abandon, self.inner.abandon(id, audit, now))
    }

    fn stale_pending(
        &self,
        older_than: std::time::Duration,
        after: Option<StaleCursor>,
        limit: u32,
    ) -> impl Future<Output = Result<StalePage, StoreError>> + Send {
        self.around(
            StoreStep::StalePending,
            self.inner.stale_pending(older_than, after, limit),
        )
    }

    fn retire(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.around(StoreStep::Retire, self.inner.retire(id, audit, now))
    }

    fn record(&self, audit: &AuditEvent) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.around(StoreStep::Record, self.inner.record(audit))
    }

    /// Faults as [`StoreStep::Record`].
    fn record_while_active(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.around(StoreStep::Record, self.inner.record_while_active(id, audit))
    }

    fn get(
        &self,
        id: ResourceId,
    ) -> impl Future<Output = Result<Option<ResourceRecord>, StoreError>> + Send {
        self.around(StoreStep::Get, self.inner.get(id))
    }

    fn live_for_digest(
        &self,
        digest: &TokenDigest,
    ) -> impl Future<Output = Result<Option<(ResourceId, ResourceStatus)>, StoreError>> + Send {
        self.around(StoreStep::LiveForDigest, self.inner.live_for_digest(digest))
    }

    /// Faults as [`StoreStep::LiveForDigest`]: it is the orphan reclaim's liveness read.
    fn orphan_standing(
        &self,
        digest: &TokenDigest,
    ) -> impl Future<Output = Result<OrphanStanding, StoreError>> + Send {
        self.around(StoreStep::LiveForDigest, self.inner.orphan_standing(digest))
    }

    /// Faults as [`StoreStep::Record`]: it records an audit row on its own.
    fn record_orphan_event(
        &self,
        digest: &TokenDigest,
        audit: &AuditEvent,
    ) -> impl Future<Output = Result<OrphanRecord, StoreError>> + Send {
        self.around(
            StoreStep::Record,
            self.inner.record_orphan_event(digest, audit),
        )
    }
}

impl<S> FaultyStore<S> {
    /// Runs `call` unless a fault fires before it; replaces its success with an error when a
    /// fault fires after it.
    async fn around<T>(
        &self,
        step: StoreStep,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.check(step, When::Before)?;
        let value = call.await?;
        self.check(step, When::After)?;
        Ok(value)
    }
}

/// A [`Backend`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum BackendStep {
    /// [`Backend::create`].
    Create,
    /// [`Backend::reset_credentials`].
    ResetCredentials,
    /// [`Backend::teardown`].
    Teardown,
    /// [`Backend::exists`].
    Exists,
    /// [`Backend::protected`].
    Protected,
}

impl BackendStep {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Create => "backend.create",
            Self::ResetCredentials => "backend.reset_credentials",
            Self::Teardown => "backend.teardown",
            Self::Exists => "backend.exists",
            Self::Protected => "backend.protected",
        }
    }
}

/// A backend that fails at chosen steps and otherwise delegates to `inner`.
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    faults: Faults<BackendStep>,
}

impl<B> FaultyBackend<B> {
    /// Wraps `inner`; nothing fails until [`FaultyBackend::fail`] is called.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            faults: Faults(Mutex::default()),
        }
    }

    /// Makes the next `times` calls at `step` fail without reaching the real backend.
    pub fn fail(&self, step: BackendStep, times: usize) {
        self.faults.set(step, When::Before, times);
    }

    /// Makes the next `times` calls at `step` reach the real backend and then report an error
    /// (the object was created or torn down, the caller hears a failure).
    pub fn fail_after(&self, step: BackendStep, times: usize) {
        self.faults.set(step, When::After, times);
    }

    /// [`FaultyBackend::fail`] or [`FaultyBackend::fail_after`].
    pub fn fail_at(&self, step: BackendStep, when: When, times: usize) {
        self.faults.set(step, when, times);
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn check(&self, step: BackendStep, when: When, name: &BackendName) -> Result<(), BackendError> {
        if self.faults.take(step, when) {
            Err(BackendError::unavailable(
                step.as_str(),
                name,
                InjectedFault(step.as_str()),
            ))
        } else {
            Ok(())
        }
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn supports(&self, resource_type: ResourceType) -> bool {
        self.inner.supports(resource_type)
    }

    fn create(
        &self,
        name: &BackendName,
        tier: &Tier,
    ) -> impl Future<Output = Result<BackendObject, BackendError>> + Send {
        self.around(BackendStep::Create, name, self.inner.create(name, tier))
    }

    fn reset_credentials(
        &self,
        name: &BackendName,
        tier: &Tier,
    ) -> impl Future<Output = Result<Option<BackendObject>, BackendError>> + Send {
        self.around(
            BackendStep::ResetCredentials,
            name,
            self.inner.reset_credentials(name, tier),
        )
    }

    fn teardown(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.around(BackendStep::Teardown, name, self.inner.teardown(name))
    }

    fn exists(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.around(BackendStep::Exists, name, self.inner.exists(name))
    }

    fn protected(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.around(BackendStep::Protected, name, self.inner.protected(name))
    }

    /// Faults as [`BackendStep::Exists`]: it is the orphan reclaim's read of the object.
    fn preflight(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<Preflight, BackendError>> + Send {
        self.around(BackendStep::Exists, name, self.inner.preflight(name))
    }
}

impl<B> FaultyBackend<B> {
    /// Runs `call` unless a fault fires before it; replaces its success with an error when a
    /// fault fires after it.
    async fn around<T>(
        &self,
        step: BackendStep,
        name: &BackendName,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        self.check(step, When::Before, name)?;
        let value = call.await?;
        self.check(step, When::After, name)?;
        Ok(value)
    }
}
