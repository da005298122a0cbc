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
//! pure: no database driver, no Kubernetes client, no async runtime.

mod chokepoint;
mod detect;
mod fingerprint;
#[cfg(feature = "kube")]
pub mod kube;
mod metrics;
mod ports;
#[cfg(feature = "postgres")]
pub mod postgres;
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
pub use metrics::{Stage, SweepMetrics, TickOutcome};
pub use ports::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
    PeriodClaim, ReclaimError, Reclaimed, Reclaimer, Sighting, Standings, StateError, SweepState,
};
pub use state::{MemoryState, advance, burned_in, period_of};
pub use sweep::{Action, CandidateView, SweepConfig, Sweeper, TickReport};
