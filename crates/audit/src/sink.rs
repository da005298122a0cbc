//! The `AuditSink` port.

use std::future::Future;

use crate::event::AuditEvent;

/// A boxed error from an audit store, kept opaque so that no adapter's error type leaks into the
/// port.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an audit store could not record or read events.
///
/// The `source` of [`Store`](Self::Store) and [`Read`](Self::Read) is the adapter's own error:
/// from the Postgres adapter (feature `postgres`), a database failure downcasts to `sqlx::Error`
/// (sqlx 0.9), e.g. `source.downcast_ref::<sqlx::Error>()`, for a caller deciding whether to
/// retry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditSinkError {
    /// The store failed the operation; nothing was recorded.
    #[error("the audit store failed to {operation}; nothing was recorded")]
    Store {
        /// What was being attempted, e.g. "insert an audit event".
        operation: &'static str,
        /// The store's own error.
        #[source]
        source: BoxError,
    },
    /// The store failed to read; nothing was changed.
    #[error("the audit store failed to {operation}")]
    Read {
        /// What was being attempted, e.g. "read audit events".
        operation: &'static str,
        /// The store's own error.
        #[source]
        source: BoxError,
    },
    /// A stored row could not be turned back into an [`AuditEvent`].
    #[error("audit row {id} cannot be read back: {reason}")]
    Corrupt {
        /// `audit_events.id` of the row.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },
}

impl AuditSinkError {
    /// The row that could not be read back, for [`Corrupt`](Self::Corrupt).
    #[cfg(feature = "postgres")]
    pub fn corrupt_row(&self) -> Option<crate::postgres::AuditEventId> {
        match self {
            Self::Corrupt { id, .. } => Some(crate::postgres::AuditEventId(*id)),
            Self::Store { .. } | Self::Read { .. } => None,
        }
    }

    /// A read failure with its source.
    pub fn read(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Read {
            operation,
            source: source.into(),
        }
    }

    /// A store failure with a plain message as its source.
    pub fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Store {
            operation,
            source: source.into(),
        }
    }
}

/// Where audit events go.
///
/// Both methods are all-or-nothing: on error, none of the events were recorded. Implementations:
/// `PgAuditSink` (feature `postgres`) and `MemoryAuditSink` (feature `testing`).
///
/// A state change and its audit row should commit together; a store that shares the caller's
/// transaction (the Postgres adapter's `insert`/`insert_batch` over a `&mut PgConnection`) is the
/// way to get that. This trait is for callers that have no transaction of their own.
pub trait AuditSink: Send + Sync {
    /// Records one event.
    fn record(&self, event: &AuditEvent)
    -> impl Future<Output = Result<(), AuditSinkError>> + Send;

    /// Records several events atomically, in order.
    fn record_batch(
        &self,
        events: &[AuditEvent],
    ) -> impl Future<Output = Result<(), AuditSinkError>> + Send;
}
