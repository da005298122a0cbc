//! Atomic two-phase provisioning: no 201 for a resource the platform cannot address.
//!
//! - **Intent first, then the side effect.** [`Provisioner::reserve`] writes a `pending` row with
//!   the resource's deterministic backend name; [`Provisioner::create`] creates the backend object
//!   (create-if-absent, so a retry is safe); [`Provisioner::finalize`] marks the row `active` with
//!   its provider id and connection URL and records `provision.created` in the same transaction.
//! - **Typestate.** A [`Reservation`] can only be consumed by `create` or `abort`; a [`Created`]
//!   only by `finalize` or `abort_created`; a [`Provisioned`] is built only by `finalize`; the
//!   201 body ([`ProvisionedBody`]) only from a `Provisioned`. A handler that skips finalize does
//!   not compile (the compile-fail tests in `crates/provision-compile-tests` show it).
//! - **Compensation wins the state flip before it destroys.** When a step fails, the row is
//!   flipped `pending → failed` (conditionally, with the step's audit row in the same
//!   transaction: `provision.create_failed` or `provision.persistence_failed`) and only then is
//!   the backend object torn down (a failed teardown is logged, counted and recorded as
//!   `provision.teardown_failed`). A row found `active` means an ambiguous finalize did commit:
//!   the resource is returned, never torn down. A store that cannot be reached tears nothing
//!   down: the row stays `pending` (ERROR log, `instant_provision_uncompensated_total`) and
//!   [`Provisioner::reconcile_pending`] settles it once it is older than its age limit.
//!   The error maps to `provision_failed` (503, retry with backoff) only when the compensation
//!   is clean, otherwise to `provision_incomplete`.
//! - **One deprovision chokepoint.** [`Provisioner::deprovision`] is the only code path that tears
//!   down a live resource's backend object: `resource.deprovisioned` (reason, actor) commits with
//!   the soft delete before anything is destroyed; it is idempotent, touches only names inside
//!   the platform's prefixes, and refuses protected objects (`keel.dev/protect=true`).
//! - **Names and secrets.** [`NamespaceName`], [`DatabaseName`] and [`RoleName`] are built only from
//!   a token; database and role names carry its [`TokenDigest`], never the token, so no
//!   statement the cluster logs names a token; [`ConnectionUrl`] and [`Password`] only display
//!   redacted.
//! - **Error envelopes.** [`ErrorCode`] is closed; each registered code carries an agent action
//!   checked against one contract ([`ErrorEnvelope`]).
//!
//! Ports: [`ResourceStore`] and [`Backend`]. Adapters: `postgres` (feature `postgres`: the
//! resource store and the shared-cluster database backend, and `register_team` /
//! `register_existing` for rows made outside Keel) and `kube` (feature `kube`: customer
//! namespaces). Fault-injection wrappers for tests: `fault` (feature `testing`).
//!
//! Public dependencies: `time` 0.3, `prometheus-client` 0.25 and `uuid` 1 are re-exported
//! ([`time`], [`prometheus_client`], [`uuid`]); the adapters take sqlx 0.9 pools and connect
//! options (`postgres`) and a kube 5 client (`kube`; the Kubernetes API version is the
//! application's k8s-openapi 0.29 feature).
//!
//! # Example
//!
//! Provisioning a customer database on a shared Postgres cluster, with the platform database's
//! pool and the cluster's admin connection options: one call reserves, creates and finalizes,
//! compensating any failed step; the password is in the answer once and stored nowhere.
//!
//! ```no_run
//! # async fn demo(
//! #     pool: sqlx::PgPool,
//! #     admin: sqlx::postgres::PgConnectOptions,
//! #     team: keel_audit::TeamId,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use keel_audit::{Actor, RequestId, ResourceType, Tier};
//! use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
//! use keel_provision::prometheus_client::registry::Registry;
//! use keel_provision::time::OffsetDateTime;
//! use keel_provision::{ProvisionMetrics, ProvisionRequest, Provisioner};
//!
//! let mut registry = Registry::default();
//! let provisioner = Provisioner::new(
//!     PgResourceStore::new(pool),
//!     PgClusterBackend::new(admin, None, 4),
//!     ProvisionMetrics::register(&mut registry),
//! );
//! let request = ProvisionRequest {
//!     team_id: team,
//!     resource_type: ResourceType::Postgres,
//!     tier: Tier::parse("pro")?,
//!     request_id: RequestId::parse("req-42")?,
//!     actor: Actor::parse("api")?,
//! };
//! match provisioner.provision(request, OffsetDateTime::now_utc()).await {
//!     // Only a finalized resource answers 201.
//!     Ok(provisioned) => println!("created {}", provisioned.id()),
//!     // The envelope says what the caller does next (retry with backoff, or not).
//!     Err(e) => println!("{}: {}", e.code().as_str(), e),
//! }
//! # Ok(()) }
//! ```
//!
//! The default build is pure: no database driver, no Kubernetes client, no async runtime.

mod envelope;
#[cfg(feature = "testing")]
pub mod fault;
mod flow;
#[cfg(feature = "kube")]
pub mod kube;
mod metrics;
mod model;
mod names;
mod ports;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reclaim;
#[cfg(feature = "postgres")]
mod register;
#[cfg(feature = "postgres")]
pub mod scram;
mod secret;

pub use envelope::{
    DocsBase, ErrorCode, ErrorEnvelope, InvalidDocsBase, MAX_AGENT_ACTION_CHARS, PROBLEM_JSON,
    UNREGISTERED,
};
pub use flow::{
    Compensation, Created, DeprovisionCause, DeprovisionError, DeprovisionTarget, Deprovisioned,
    ErrorChain, FailedStep, ProvisionError, Provisioned, ProvisionedBody, Provisioner, Reservation,
    RotateError, RowResult, StepError, TeardownResult,
};
pub use metrics::{Outcome, ProvisionMetrics, TeardownStage};
pub use model::{
    BackendName, BackendObject, DeprovisionReason, ProvisionRequest, ResourceRecord,
    ResourceStatus, new_token,
};
pub use names::{
    DATABASE_PREFIX, DIGEST_HEX_LEN, DatabaseName, ForeignName, NAMESPACE_PREFIX, NamespaceName,
    RoleName, TokenDigest,
};
pub use ports::{
    Backend, BackendError, Flip, NewReservation, RedactedError, ResourceStore, StaleCursor,
    StalePage, StoreError,
};
pub use reclaim::{
    INSTALLATION_LABEL, InstallationId, OBJECT_ID_ATTRIBUTE, ObjectFacts, OrphanRecord,
    OrphanStanding, OwnerRow, Preflight, ReclaimRefusal, Stamp, protect_value_protects,
};
pub use secret::{ConnectionUrl, Password};

/// The `prometheus-client` crate (0.25) of [`ProvisionMetrics::register`]'s registry,
/// re-exported so a caller names the same version.
pub use prometheus_client;
/// The `time` crate (0.3) of this API's timestamps, re-exported so a caller names the same
/// version.
pub use time;
/// The `uuid` crate (1.x) of [`InstallationId`], re-exported so a caller names the same version.
pub use uuid;
