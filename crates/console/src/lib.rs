//! keel-console: the operator's web console as an [`axum::Router`] a platform mounts in its own
//! service (the `keel-console` binary only wires it).
//!
//! Server-rendered HTML over the domain crates' store functions, with no front-end build and no
//! JavaScript needed: one place where an on-call engineer answers "what failed silently?".
//!
//! - **Sign-in** with an operator API key (`keel-provision-api keys create --operator`): a
//!   server-side session (only the SHA-256 of its cookie is stored), a cookie that is
//!   `HttpOnly`, `SameSite=Strict` and `Secure` when [`ConsoleConfig::secure_cookies`] is set,
//!   and a CSRF token in every form. A request without a session is sent to the sign-in page
//!   (GET) or refused with 401 (POST); a POST whose CSRF token is missing or wrong is refused
//!   with 403 and changes nothing.
//! - **Pages**: overview, dead letters (with the attempt history from the audit trail), orphan
//!   review, rater runs, the audit trail (cursor-paginated in commit order) and a resource's
//!   timeline. Times are RFC 3339 UTC; tokens are masked; no connection URL is ever read.
//! - **Actions**, each audited with the operator (`operator:key-<id>`) as actor, through the
//!   same functions as the CLIs: requeue dead letters
//!   ([`keel_propagation::postgres::PgPropagationStore::requeue`], as
//!   `keel-propagation-runner dead-letters requeue`), protect / unprotect a token digest
//!   ([`keel_orphan_sweep::protections`], as `keel-orphan-sweep protections`). Nothing in the
//!   console destroys anything.

mod actions;
pub mod html;
mod pages;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use sqlx::PgPool;

/// How the console serves.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// Mark cookies `Secure` (set it when the console is served over TLS, directly or behind a
    /// TLS-terminating proxy).
    pub secure_cookies: bool,
    /// How long a session lasts after sign-in.
    pub session_ttl: time::Duration,
    /// Rows per audit-trail page.
    pub page_size: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            secure_cookies: true,
            session_ttl: time::Duration::hours(8),
            page_size: 50,
        }
    }
}

/// The console's shared state: the platform database and the configuration.
#[derive(Clone, Debug)]
pub struct Console {
    pool: PgPool,
    config: ConsoleConfig,
}

impl Console {
    /// A console over the platform database `pool`.
    pub fn new(pool: PgPool, config: ConsoleConfig) -> Self {
        Self { pool, config }
    }
}

/// Why a console request failed (shown as a 500 page that names the operation, never a secret).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The database failed.
    #[error("the database failed to {operation}")]
    Store {
        /// What was being attempted.
        operation: &'static str,
        /// The error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An audit row could not be built.
    #[error("the audit row could not be built: {0}")]
    Audit(#[from] keel_audit::AuditFieldError),
}

impl ConsoleError {
    /// Whether the database could not be reached at all (no connection within the pool's
    /// timeout, a refused or broken connection, a server shutting down or not yet accepting
    /// connections), as opposed to a statement that failed: the request may succeed unchanged
    /// once the database is back, so it is answered 503, not 500.
    pub fn is_unavailable(&self) -> bool {
        let ConsoleError::Store { source, .. } = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = next {
            if let Some(error) = error.downcast_ref::<sqlx::Error>() {
                // Connection exceptions (class 08), and the server shutting down or not yet
                // accepting connections.
                let refused = |e: &dyn sqlx::error::DatabaseError| {
                    e.code().is_some_and(|code| {
                        code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
                    })
                };
                return matches!(
                    error,
                    sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::WorkerCrashed
                ) || matches!(error, sqlx::Error::Database(e) if refused(e.as_ref()));
            }
            next = error.source();
        }
        false
    }
}

/// Every console route. Mount it at the root of its own listener (its links are absolute).
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/sign-in", get(pages::sign_in_form).post(actions::sign_in))
        .route("/sign-out", post(actions::sign_out))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/{id}", get(pages::dead_letter))
        .route("/dead-letters/requeue", post(actions::requeue))
        .route("/orphans", get(pages::orphans))
        .route("/orphans/protect", post(actions::protect))
        .route("/orphans/unprotect", post(actions::unprotect))
        .route("/rater-runs", get(pages::rater_runs))
        .route("/audit", get(pages::audit))
        .route("/resources/{id}", get(pages::resource))
        .with_state(console)
}
