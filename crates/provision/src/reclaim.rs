//! Installation identity and the orphan reclaim's pre-flight: what the deprovision chokepoint
//! reads, fresh, immediately before it may destroy a backend object no live resource owns.
//!
//! - **Installation.** Each installation (one platform database) has an [`InstallationId`],
//!   created once, on first use, in its platform database (`keel_installation`). keel-provision stamps it on every object
//!   it creates ([`INSTALLATION_LABEL`] in a database's COMMENT and on a namespace).
//! - **Ownership is platform-held.** An object is this installation's only when its platform
//!   database holds a `resources` row for its token (any status): a stamp alone proves nothing
//!   (a customer owns its database's COMMENT), and another installation's stamp refuses it.
//! - **Protection is platform-held too** (`reclaim_protections`), and an object's own
//!   `keel.dev/protect` mark protects whatever its value, except `false` ([`protect_value_protects`]).

use std::fmt;

use keel_audit::{ResourceId, TeamId};

use crate::model::ResourceStatus;

/// The label (namespace) or COMMENT label (database) naming the installation that created an
/// object.
pub const INSTALLATION_LABEL: &str = "keel.dev/installation";

/// The orphan audit rows' attribute holding the reclaimed object's incarnation
/// ([`ObjectFacts::incarnation`]): a database's oid, a namespace's uid. Not secret.
pub const OBJECT_ID_ATTRIBUTE: &str = "object_id";

/// An installation's identity: created once in its platform database, never changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstallationId(uuid::Uuid);

impl InstallationId {
    /// The id `uuid`.
    pub const fn from_uuid(uuid: uuid::Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// Parses the hyphenated form written on objects; anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        uuid::Uuid::try_parse(text).ok().map(Self)
    }
}

impl fmt::Display for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Whether a `keel.dev/protect` value protects: every value except `false` (any case, spaces
/// trimmed) does, so a misspelt `yes`, `1` or `true ` never leaves an object unprotected.
pub fn protect_value_protects(value: &str) -> bool {
    !value.trim().eq_ignore_ascii_case("false")
}

/// Whose an object is, by the stamp on it compared with this installation's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stamp {
    /// No installation stamp (created before stamping, or by hand).
    None,
    /// This installation's stamp.
    Ours,
    /// Another installation's stamp (or one that does not parse): never reclaimed.
    Foreign,
}

impl Stamp {
    /// The stamp `value` (the object's [`INSTALLATION_LABEL`]) compared with `ours`.
    pub fn of(value: Option<&str>, ours: InstallationId) -> Self {
        match value {
            None => Self::None,
            Some(text) => match InstallationId::parse(text.trim()) {
                Some(id) if id == ours => Self::Ours,
                Some(_) | None => Self::Foreign,
            },
        }
    }
}

/// The platform database's view of a token, read fresh by the chokepoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrphanStanding {
    /// This installation's id.
    pub installation: InstallationId,
    /// The newest `resources` row for the token (any status), when this installation has one:
    /// the proof that this installation made the object.
    pub row: Option<OwnerRow>,
    /// Whether the token is protected in `reclaim_protections`.
    pub protected: bool,
}

impl OrphanStanding {
    /// Whether a row that is not terminal owns the token. A status other than `deleted` and
    /// `failed` (including one this build does not know) counts as live: liveness fails closed.
    pub fn live(&self) -> bool {
        self.row.as_ref().is_some_and(|row| row.status_is_live())
    }
}

/// A `resources` row owning a token, as the chokepoint sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRow {
    /// The resource.
    pub id: ResourceId,
    /// Its team.
    pub team_id: TeamId,
    /// Its status as stored; `None` when this build does not know it (counted as live).
    pub status: Option<ResourceStatus>,
}

impl OwnerRow {
    /// Live unless the status is known to be terminal.
    pub fn status_is_live(&self) -> bool {
        match self.status {
            Some(ResourceStatus::Deleted | ResourceStatus::Failed) => false,
            Some(
                ResourceStatus::Pending
                | ResourceStatus::Active
                | ResourceStatus::Paused
                | ResourceStatus::Suspended,
            )
            | None => true,
        }
    }
}

/// What the backend says about an object, read immediately before a reclaim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preflight {
    /// No such object.
    Absent,
    /// The object is already being deleted (a namespace stuck terminating): nothing to do.
    Terminating,
    /// The object exists.
    Present(ObjectFacts),
}

/// An existing object's ownership and protection marks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectFacts {
    /// Made by the platform as far as the backend can tell (the managed-by label; for a
    /// database, also owned by its customer role).
    pub platform_made: bool,
    /// Carries a `keel.dev/protect` mark that protects ([`protect_value_protects`]).
    pub protected: bool,
    /// The installation stamp ([`INSTALLATION_LABEL`]), as written.
    pub installation: Option<String>,
    /// The backend's own id of this incarnation of the object (a database's oid, a namespace's
    /// uid), when it has one: an object made again under the same name after a reclaim is
    /// another incarnation, whose reclaim is audited again (never taken for a retry of the
    /// first one). `None` records reclaims once per token.
    pub incarnation: Option<String>,
}

/// Why the chokepoint refused to reclaim an object. Closed: it labels audit rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum ReclaimRefusal {
    /// Another installation's stamp is on it.
    ForeignInstallation,
    /// This installation has no `resources` row for its token: not provably its own.
    Unowned,
    /// The backend says the platform did not make it (label, or a database not owned by its
    /// customer role).
    NotPlatformMade,
    /// Protected, by the platform's table or the object's own mark.
    Protected,
}

impl ReclaimRefusal {
    /// Every refusal.
    pub const ALL: &'static [ReclaimRefusal] = <Self as strum::VariantArray>::VARIANTS;

    /// The audit and log value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ForeignInstallation => "foreign_installation",
            Self::Unowned => "unowned",
            Self::NotPlatformMade => "not_platform_made",
            Self::Protected => "protected",
        }
    }

    /// The first refusal that applies to an object with `facts` and `standing`, in order:
    /// foreign stamp, not platform-made, no owning row, protection. `None`: it may be reclaimed.
    pub fn check(standing: &OrphanStanding, facts: &ObjectFacts) -> Option<Self> {
        match Stamp::of(facts.installation.as_deref(), standing.installation) {
            Stamp::Foreign => return Some(Self::ForeignInstallation),
            Stamp::None | Stamp::Ours => {}
        }
        if !facts.platform_made {
            return Some(Self::NotPlatformMade);
        }
        if standing.row.is_none() {
            return Some(Self::Unowned);
        }
        if standing.protected || facts.protected {
            return Some(Self::Protected);
        }
        None
    }
}

impl fmt::Display for ReclaimRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`crate::ResourceStore::record_orphan_event`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrphanRecord {
    /// The audit row was written.
    Written,
    /// A row of the same kind already names this object: nothing was written.
    AlreadyRecorded,
    /// The token turned live: nothing was written.
    Live,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> InstallationId {
        InstallationId::from_uuid(uuid::Uuid::from_u128(n))
    }

    /// SWEEP-9: a protect mark fails closed; only `false` leaves an object unprotected.
    #[test]
    fn any_protect_value_other_than_false_protects() {
        for value in ["true", "TRUE", "yes", "1", "true ", "", "on", "maybe"] {
            assert!(protect_value_protects(value), "{value:?}");
        }
        for value in ["false", "FALSE", " false ", "False"] {
            assert!(!protect_value_protects(value), "{value:?}");
        }
    }

    /// SWEEP-1: another installation's (or an unreadable) stamp refuses the reclaim, whatever
    /// else holds; without an owning row nothing is reclaimed.
    #[test]
    fn an_object_of_another_installation_is_never_reclaimable() {
        let ours = id(1);
        let row = OwnerRow {
            id: ResourceId::from_uuid(uuid::Uuid::from_u128(7)),
            team_id: TeamId::from_uuid(uuid::Uuid::from_u128(8)),
            status: Some(ResourceStatus::Deleted),
        };
        let standing = |row: Option<OwnerRow>, protected| OrphanStanding {
            installation: ours,
            row,
            protected,
        };
        let facts = |stamp: Option<String>, made, protected| ObjectFacts {
            platform_made: made,
            protected,
            installation: stamp,
            incarnation: None,
        };
        let theirs = Some(id(2).to_string());
        let mine = Some(ours.to_string());
        let cases = [
            (
                standing(Some(row.clone()), false),
                facts(theirs.clone(), true, false),
                Some(ReclaimRefusal::ForeignInstallation),
            ),
            (
                standing(Some(row.clone()), false),
                facts(Some("garbage".into()), true, false),
                Some(ReclaimRefusal::ForeignInstallation),
            ),
            (
                standing(None, false),
                facts(mine.clone(), true, false),
                Some(ReclaimRefusal::Unowned),
            ),
            (
                standing(Some(row.clone()), false),
                facts(mine.clone(), false, false),
                Some(ReclaimRefusal::NotPlatformMade),
            ),
            (
                standing(Some(row.clone()), true),
                facts(mine.clone(), true, false),
                Some(ReclaimRefusal::Protected),
            ),
            (
                standing(Some(row.clone()), false),
                facts(None, true, true),
                Some(ReclaimRefusal::Protected),
            ),
            (
                standing(Some(row.clone()), false),
                facts(mine, true, false),
                None,
            ),
            (standing(Some(row), false), facts(None, true, false), None),
        ];
        for (i, (standing, facts, expected)) in cases.into_iter().enumerate() {
            assert_eq!(
                ReclaimRefusal::check(&standing, &facts),
                expected,
                "case {i}"
            );
        }
    }

    /// SWEEP-10: liveness fails closed on a status this build does not know.
    #[test]
    fn an_unknown_status_counts_as_live() {
        let row = |status| OwnerRow {
            id: ResourceId::from_uuid(uuid::Uuid::from_u128(7)),
            team_id: TeamId::from_uuid(uuid::Uuid::from_u128(8)),
            status,
        };
        assert!(row(None).status_is_live());
        for &status in ResourceStatus::ALL {
            assert_eq!(
                row(Some(status)).status_is_live(),
                status.is_live(),
                "{status:?}"
            );
        }
    }
}
