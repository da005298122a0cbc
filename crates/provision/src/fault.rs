//! Fault injection for tests (feature `testing`): wrappers that make a store or a backend fail
//! at a chosen step, a chosen number of times, and otherwise pass through to the real adapter.
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
use crate::ports::{Backend, BackendError, NewReservation, ResourceStore, StoreError};

/// The error an injected fault returns.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct InjectedFault(pub &'static str);

#[derive(Debug, Default)]
struct Faults<K>(Mutex<HashMap<K, usize>>);

impl<K: Hash + Eq> Faults<K> {
    fn set(&self, step: K, times: usize) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(step, times);
    }

    /// Whether this call at `step` fails (consuming one planned failure).
    fn take(&self, step: K) -> bool {
        let mut faults = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match faults.get_mut(&step) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            Some(_) | None => false,
        }
    }
}

/// A [`ResourceStore`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// [`ResourceStore::live_for_token`].
    LiveForToken,
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
            Self::LiveForToken => "store.live_for_token",
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
        self.faults.set(step, times);
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&self, step: StoreStep) -> Result<(), StoreError> {
        if self.faults.take(step) {
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
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.check(StoreStep::Reserve);
        async move {
            fault?;
            self.inner.reserve(reservation).await
        }
    }

    fn activate(
        &self,
        id: ResourceId,
        object: &BackendObject,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.check(StoreStep::Activate);
        async move {
            fault?;
            self.inner.activate(id, object, audit, now).await
        }
    }

    fn abandon(
        &self,
        id: ResourceId,
        audit: Option<&AuditEvent>,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.check(StoreStep::Abandon);
        async move {
            fault?;
            self.inner.abandon(id, audit, now).await
        }
    }

    fn retire(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let fault = self.check(StoreStep::Retire);
        async move {
            fault?;
            self.inner.retire(id, audit, now).await
        }
    }

    fn record(&self, audit: &AuditEvent) -> impl Future<Output = Result<(), StoreError>> + Send {
        let fault = self.check(StoreStep::Record);
        async move {
            fault?;
            self.inner.record(audit).await
        }
    }

    fn get(
        &self,
        id: ResourceId,
    ) -> impl Future<Output = Result<Option<ResourceRecord>, StoreError>> + Send {
        let fault = self.check(StoreStep::Get);
        async move {
            fault?;
            self.inner.get(id).await
        }
    }

    fn live_for_token(
        &self,
        token: &Token,
    ) -> impl Future<Output = Result<Option<(ResourceId, ResourceStatus)>, StoreError>> + Send {
        let fault = self.check(StoreStep::LiveForToken);
        async move {
            fault?;
            self.inner.live_for_token(token).await
        }
    }
}

/// A [`Backend`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendStep {
    /// [`Backend::create`].
    Create,
    /// [`Backend::teardown`].
    Teardown,
    /// [`Backend::exists`].
    Exists,
}

impl BackendStep {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Create => "backend.create",
            Self::Teardown => "backend.teardown",
            Self::Exists => "backend.exists",
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
        self.faults.set(step, times);
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn check(&self, step: BackendStep, name: &BackendName) -> Result<(), BackendError> {
        if self.faults.take(step) {
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
        let fault = self.check(BackendStep::Create, name);
        async move {
            fault?;
            self.inner.create(name, tier).await
        }
    }

    fn teardown(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let fault = self.check(BackendStep::Teardown, name);
        async move {
            fault?;
            self.inner.teardown(name).await
        }
    }

    fn exists(
        &self,
        name: &BackendName,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let fault = self.check(BackendStep::Exists, name);
        async move {
            fault?;
            self.inner.exists(name).await
        }
    }
}
