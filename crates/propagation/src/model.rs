//! What a propagation is.

use std::fmt;
use std::str::FromStr;

use keel_audit::{ResourceId, ResourceType, TeamId, Tier, Token};

/// `pending_propagations.id`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct PropagationId(pub i64);

impl PropagationId {
    /// The row id.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for PropagationId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl From<PropagationId> for i64 {
    fn from(id: PropagationId) -> Self {
        id.0
    }
}

impl FromStr for PropagationId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

impl fmt::Display for PropagationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a propagation carries to a backend. Closed, so it can label metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
#[non_exhaustive]
pub enum PropagationKind {
    /// Bring a resource's backend to its team's tier (up or down): the seed's regrade.
    TierElevation,
}

impl PropagationKind {
    /// Every kind.
    pub const ALL: &'static [PropagationKind] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name stored in `pending_propagations.kind`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PropagationKind::TierElevation => "tier_elevation",
        }
    }
}

impl fmt::Display for PropagationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a known [`PropagationKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown propagation kind {0:?}: expected tier_elevation")]
pub struct UnknownPropagationKind(pub String);

impl FromStr for PropagationKind {
    type Err = UnknownPropagationKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownPropagationKind(s.chars().take(32).collect()))
    }
}

/// The token a claim hands out (`pending_propagations.claim_token`). Drawn from a sequence, so
/// it never repeats: a completion carrying an earlier claim's token can never match a later claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimToken(pub i64);

/// The version of a row's target (`pending_propagations.target_version`), bumped by every enqueue
/// that replaces the target. A result for an older version is for a replaced target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetVersion(pub i64);

/// What a completion is fenced on: the claim that produced it and the target it applied.
/// Never derived from the payload's data, so no re-serialization can make two targets look
/// alike or different.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The claim.
    pub claim: ClaimToken,
    /// The target version the claim saw.
    pub target: TargetVersion,
}

/// The target a propagation carries. Its variant fixes the kind, so a kind and a payload can
/// never disagree. Stored as JSON in `pending_propagations.payload`, decoded by the row's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// Apply `target_tier` to the resource's backend.
    TierElevation {
        /// The tier to apply.
        target_tier: Tier,
    },
}

impl Payload {
    /// The newest payload version this build reads (`pending_propagations.payload_version`).
    /// Rows with a newer version are left for a runner that knows it.
    pub const CURRENT_VERSION: i32 = 1;

    /// The kind this payload belongs to.
    pub fn kind(&self) -> PropagationKind {
        match self {
            Payload::TierElevation { .. } => PropagationKind::TierElevation,
        }
    }

    /// The JSON stored in `pending_propagations.payload`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Payload::TierElevation { target_tier } => {
                serde_json::json!({ "target_tier": target_tier.as_str() })
            }
        }
    }

    /// Decodes the JSON stored for a propagation of `kind`. Keys this version does not know are
    /// ignored (a newer writer may add optional fields); completions are fenced on
    /// [`Fence`], never on this decoding, so extra keys cannot change which result counts.
    pub fn from_json(
        kind: PropagationKind,
        json: &serde_json::Value,
    ) -> Result<Self, InvalidPayload> {
        match kind {
            PropagationKind::TierElevation => {
                let tier = json
                    .get("target_tier")
                    .and_then(serde_json::Value::as_str)
                    .ok_or(InvalidPayload::MissingField {
                        kind,
                        field: "target_tier",
                    })?;
                let target_tier = Tier::parse(tier)?;
                Ok(Payload::TierElevation { target_tier })
            }
        }
    }

    /// The tier this payload brings the resource to.
    pub fn target_tier(&self) -> &Tier {
        match self {
            Payload::TierElevation { target_tier } => target_tier,
        }
    }
}

/// What an applier needs to find a resource's backend object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// The customer token backend names derive from (masked whenever displayed).
    pub token: Option<Token>,
    /// The backend's own id for the object (for Postgres, the role and database name).
    pub provider_resource_id: Option<String>,
    /// The resource's status (`active`, `deleted`, …), if the resource row exists.
    pub status: Option<String>,
    /// The team that owns the resource, if the resource row exists.
    pub team_id: Option<TeamId>,
}

/// A claimed propagation: one attempt at carrying its payload to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Propagation {
    /// Row id.
    pub id: PropagationId,
    /// The team whose entitlement this carries.
    pub team_id: TeamId,
    /// The resource it applies to.
    pub resource_id: ResourceId,
    /// The resource's type.
    pub resource_type: ResourceType,
    /// What to apply.
    pub payload: Payload,
    /// Which attempt this is, from 1. Counted when the row is claimed, so a row whose worker
    /// dies mid-attempt still uses up its budget and cannot loop forever.
    pub attempt: u32,
    /// Where the backend object is.
    pub backend: Backend,
    /// What the completion is fenced on.
    pub fence: Fence,
}

impl Propagation {
    /// The propagation's kind.
    pub fn kind(&self) -> PropagationKind {
        self.payload.kind()
    }
}

/// A sample propagation for unit tests: a tier elevation to `pro` of a Postgres resource.
/// A stored payload that this build cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPayload {
    /// A field the kind requires is missing or not a string.
    #[error("a {kind} payload needs a string {field}")]
    MissingField {
        /// The propagation kind.
        kind: PropagationKind,
        /// The field.
        field: &'static str,
    },
    /// The target tier is not a valid tier name.
    #[error(transparent)]
    Tier(#[from] keel_audit::InvalidTier),
}

#[cfg(test)]
pub(crate) fn sample_propagation() -> Propagation {
    Propagation {
        id: PropagationId(1),
        team_id: TeamId::new_random(),
        resource_id: ResourceId::new_random(),
        resource_type: ResourceType::Postgres,
        payload: Payload::TierElevation {
            target_tier: Tier::parse("pro").unwrap_or_else(|e| panic!("{e}")),
        },
        attempt: 1,
        backend: Backend::default(),
        fence: Fence {
            claim: ClaimToken(1),
            target: TargetVersion(1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_through_json_by_kind() {
        let payload = Payload::TierElevation {
            target_tier: Tier::parse("pro").unwrap(),
        };
        let json = payload.to_json();
        assert_eq!(json, serde_json::json!({ "target_tier": "pro" }));
        assert_eq!(
            Payload::from_json(PropagationKind::TierElevation, &json),
            Ok(payload)
        );
        for bad in [
            serde_json::json!({}),
            serde_json::json!({ "target_tier": 3 }),
            serde_json::json!({ "target_tier": "Pro!" }),
        ] {
            assert!(
                Payload::from_json(PropagationKind::TierElevation, &bad).is_err(),
                "{bad}"
            );
        }
    }

    /// LIB-13: a propagation id shows, parses and serializes as its number.
    #[test]
    fn propagation_ids_display_parse_and_serialize_as_their_number() {
        let id = PropagationId::from(42);
        assert_eq!(id.to_string(), "42");
        assert_eq!("42".parse::<PropagationId>(), Ok(id));
        assert!("x".parse::<PropagationId>().is_err());
        assert_eq!(serde_json::to_string(&id).unwrap(), "42");
        assert_eq!(serde_json::from_str::<PropagationId>("42").unwrap(), id);
        assert_eq!((i64::from(id), id.get()), (42, 42));
    }
}
