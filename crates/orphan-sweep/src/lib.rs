//! Orphan detection, audit-only by default, with a gated, audited reclaim arm.
//!
//! - **Pure detection** ([`detect`], [`classify`]): inventory items whose token has no live
//!   resource row (pending, active, paused, suspended) and which are older than the grace window.
//!   Kinds are closed ([`OrphanKind`]); anything unrecognised is generic and never reclaimed, and
//!   so is anything not labelled `app.kubernetes.io/managed-by=keel` (made by hand or by an older
//!   platform): it is reported for review only.
//! - **Ports** ([`Inventory`], [`LiveTokens`], [`Reclaimer`]): an inventory answers a complete
//!   list or an error, never a partial list; live tokens are read by digest (no token is sent)
//!   in one set-based query per tick; the only reclaimer is keel-provision's audited deprovision chokepoint.
//! - **Gates** ([`SweepConfig`]): `ORPHAN_DB_SWEEP_ENABLED` (off: a tick is a DEBUG no-op, no list,
//!   no read, no metric) and `ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED`, both off by default. The reclaim
//!   arm is armed only when both are on and a reclaimer is wired.
//! - **Fail safe** ([`Sweeper::tick`]): a list or liveness error gives zero candidates for the tick;
//!   a token is re-read just before its reclaim; `keel.dev/protect=true` is never reclaimed; a
//!   blast-radius cap aborts every reclaim of a tick that exceeds it; a candidate must be seen in
//!   N consecutive ticks before it is reclaimed.
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
