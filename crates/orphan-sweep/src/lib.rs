//! Orphan detection, audit-only by default, with a gated, audited reclaim arm.
//!
//! - **Pure detection** ([`detect`], [`classify`]): inventory items whose token has no live
//!   resource row (any status but `deleted` and `failed`) and which are older than the grace
//!   window. Kinds are closed ([`OrphanKind`]); what keeps a candidate from ever being reclaimed
//!   is a closed [`Blocker`]: generic (no token), another installation's stamp, terminating,
//!   unmanaged (no `app.kubernetes.io/managed-by=keel`), unowned (this installation has no row
//!   for its token: ownership is platform-held), protected.
//! - **Ports** ([`Inventory`], [`LiveTokens`], [`SweepState`], [`Reclaimer`]): an inventory
//!   answers a complete list or an error, never a partial list; standings are read by digest (no
//!   token is sent) in one set-based query per tick; the state holds period claims and sightings
//!   ([`MemoryState`] in memory, `postgres::PgSweepState` in the platform database); the
//!   reclaimer is sealed and its only destructive implementation is keel-provision's audited
//!   deprovision chokepoint (feature `testing`: `testing::ScriptedReclaimer`).
//! - **Gates** ([`SweepConfig`]): `ORPHAN_DB_SWEEP_ENABLED` (off: a tick is a DEBUG no-op, no list,
//!   no read, no metric) and `ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED`, both off by default. The reclaim
//!   arm is armed only when both are on and a reclaimer is wired.
//! - **Fail safe** ([`Sweeper::tick`]): each period is claimed once across replicas; a list,
//!   standing or state error gives zero candidates for the tick; burn-in is durable and measured
//!   in time and periods while reclaimable ([`advance`], [`burned_in`]); the circuit breaker and
//!   the rate limit are evaluated the same way in the dry run; the claim (a fence) and a stop flag
//!   are checked, and the token's standing re-read, just before each reclaim; a refused reclaim
//!   is quarantined.
//! - **Logs never show a token**: a masked form plus a keyed fingerprint ([`FingerprintKey`]).
//!
//! Adapters: `postgres` (feature `postgres`) and `kube` (feature `kube`). The default build is
//! pure: no database driver, no Kubernetes client, no async runtime. Fakes of the inventory and
//! live-token ports and their contract suites: [`testing`] (feature `testing`).
//!
//! Public dependencies: `time` 0.3 and `prometheus-client` 0.25 are re-exported
//! ([`time`], [`prometheus_client`]); the adapters take sqlx 0.9 pools (`postgres`) and a kube 5
//! client (`kube`; the Kubernetes API version is the application's k8s-openapi 0.29 feature).
//!
//! # Example
//!
//! An audit-only sweep over a custom inventory (here the `testing` fakes): each hourly tick
//! lists the inventory, reads the standings of its tokens in one read, and reports what the
//! armed run would reclaim. Nothing is destroyed: no reclaimer is wired.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use keel_audit::Token;
//! use keel_orphan_sweep::prometheus_client::registry::Registry;
//! use keel_orphan_sweep::testing::{FakeInventory, FakeLiveTokens, ScriptedReclaimer};
//! use keel_orphan_sweep::time::{self, macros::datetime};
//! use keel_orphan_sweep::{
//!     Action, FingerprintKey, InventoryItem, InventorySource, MANAGED_BY, MANAGED_BY_LABEL,
//!     MemoryState, SweepConfig, SweepMetrics, Sweeper, TickReport,
//! };
//! use keel_provision::InstallationId;
//!
//! let now = datetime!(2026-11-22 10:00 UTC);
//! let inventory = FakeInventory::new(InventorySource::Postgres, "cust_");
//! let installation = InstallationId::from_uuid(keel_audit::uuid::Uuid::from_u128(1));
//! let tokens = FakeLiveTokens::new(installation);
//! for (token, live) in [("gone00000001", false), ("live00000001", true)] {
//!     inventory.put(
//!         InventoryItem::new(format!("cust_{token}"))
//!             .with_created_at(now - time::Duration::hours(5))
//!             .with_label(MANAGED_BY_LABEL, MANAGED_BY),
//!     );
//!     let token = Token::parse(token)?;
//!     if live { tokens.live(&token) } else { tokens.ended(&token) }
//! }
//!
//! let mut config = SweepConfig::default();
//! config.enabled = true; // ORPHAN_DB_SWEEP_ENABLED; the destructive gate stays off
//! config.burn_in = Duration::from_secs(3600);
//! let mut sweeper = Sweeper::new(
//!     inventory.clone(),
//!     tokens.clone(),
//!     None::<ScriptedReclaimer>,
//!     MemoryState::new(),
//!     config,
//!     SweepMetrics::register(&mut Registry::default()),
//!     FingerprintKey::new(*b"example-fingerprint-key")?,
//! );
//! let TickReport::Swept { candidates, .. } = sweeper.tick(now).await else {
//!     panic!("an enabled sweep with a working inventory sweeps");
//! };
//! // Only the token whose rows all ended is a candidate; it is reported, never reclaimed.
//! assert_eq!(candidates.len(), 1);
//! assert_eq!(candidates[0].action, Action::Reported);
//! assert!(!candidates[0].name_masked.contains("gone00000001"));
//! assert_eq!(tokens.asked(), [2]); // one read for the whole inventory
//! # Ok(()) }
//! ```

mod chokepoint;
mod detect;
mod fingerprint;
#[cfg(feature = "kube")]
pub mod kube;
mod labels;
mod metrics;
mod ports;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod protections;
mod split;
mod state;
mod sweep;
#[cfg(feature = "testing")]
pub mod testing;

pub use chokepoint::SWEEP_ACTOR;
pub use detect::{
    Blocker, Candidate, Classified, MANAGED_BY, MANAGED_BY_LABEL, OrphanKind, PROTECT_ANNOTATION,
    RESOURCE_TYPE_LABEL, classify, detect, digests_of, is_managed, is_protected,
};
pub use fingerprint::{FingerprintKey, WeakKey};
pub use labels::Labels;
pub use metrics::{Stage, SweepMetrics, TickOutcome};
pub use ports::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
    PeriodClaim, ReclaimError, Reclaimed, Reclaimer, Sighting, SightingChanges, Standings,
    StateError, SweepState,
};
pub use state::{MemoryState, advance, burned_in, period_of};
pub use sweep::{Action, CandidateView, SweepConfig, Sweeper, TickReport};

/// The `prometheus-client` crate (0.25) of [`SweepMetrics::register`]'s registry, re-exported so
/// a caller names the same version.
pub use prometheus_client;
/// The `time` crate (0.3) of this API's timestamps, re-exported so a caller names the same
/// version.
pub use time;
