//! An in-memory [`AuditSink`] for tests (feature `testing`).

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::event::AuditEvent;
use crate::kind::AuditKind;
use crate::sink::{AuditSink, AuditSinkError};

/// An [`AuditSink`] that keeps events in memory and can be told to fail.
///
/// It honours the port's contract (all-or-nothing batches, order kept), which the contract test
/// checks against the Postgres adapter too.
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: Vec<AuditEvent>,
    failures_left: usize,
    calls: usize,
}

impl MemoryAuditSink {
    /// An empty sink that never fails.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the next `n` calls fail without recording anything.
    pub fn fail_next(&self, n: usize) {
        self.lock().failures_left = n;
    }

    /// Every recorded event, oldest first.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.lock().events.clone()
    }

    /// The kinds of every recorded event, oldest first.
    pub fn kinds(&self) -> Vec<AuditKind> {
        self.lock().events.iter().map(AuditEvent::kind).collect()
    }

    /// How many times `record` or `record_batch` was called, failed calls included.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    fn push(&self, events: &[AuditEvent]) -> Result<(), AuditSinkError> {
        let mut inner = self.lock();
        inner.calls += 1;
        if inner.failures_left > 0 {
            inner.failures_left -= 1;
            return Err(AuditSinkError::store(
                "record audit events",
                "failure injected by MemoryAuditSink::fail_next",
            ));
        }
        inner.events.extend_from_slice(events);
        Ok(())
    }
}

impl AuditSink for MemoryAuditSink {
    async fn record(&self, event: &AuditEvent) -> Result<(), AuditSinkError> {
        self.push(std::slice::from_ref(event))
    }

    async fn record_batch(&self, events: &[AuditEvent]) -> Result<(), AuditSinkError> {
        self.push(events)
    }
}
