//! Identifiers and vocabulary shared by every Keel crate.
//!
//! Each id is its own type so that, say, a team id cannot be passed where a resource id is
//! expected. They are parsed at the edge with [`FromStr`](std::str::FromStr).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        ///
        /// Serialized as the plain UUID string, and (feature `postgres`) bound and decoded as a
        /// Postgres `uuid` directly.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize,
            serde::Deserialize,
        )]
        #[cfg_attr(feature = "postgres", derive(sqlx::Type), sqlx(transparent))]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl $name {
            /// Wraps a UUID that is known to identify this kind of thing.
            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            /// A fresh random (v4) id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| InvalidId { what: $what })
            }
        }
    };
}

uuid_id!(
    /// Identifies a team (a paying customer account): `teams.id`.
    TeamId,
    "team id"
);
uuid_id!(
    /// Identifies a provisioned resource: `resources.id`.
    ResourceId,
    "resource id"
);

// `AuditEventId` is declared with the Postgres adapter (`postgres::AuditEventId`); its common
// traits live here with the other ids.
#[cfg(feature = "postgres")]
mod event_id {
    use std::fmt;
    use std::num::ParseIntError;
    use std::str::FromStr;

    use crate::postgres::AuditEventId;

    impl AuditEventId {
        /// The row id, `audit_events.id`.
        pub const fn get(self) -> i64 {
            self.0
        }
    }

    impl fmt::Display for AuditEventId {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(&self.0, f)
        }
    }

    impl FromStr for AuditEventId {
        type Err = ParseIntError;

        fn from_str(s: &str) -> Result<Self, Self::Err> {
            s.parse().map(Self)
        }
    }

    impl From<i64> for AuditEventId {
        fn from(id: i64) -> Self {
            Self(id)
        }
    }

    impl From<AuditEventId> for i64 {
        fn from(id: AuditEventId) -> Self {
            id.0
        }
    }

    impl serde::Serialize for AuditEventId {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_i64(self.0)
        }
    }

    impl<'de> serde::Deserialize<'de> for AuditEventId {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            i64::deserialize(deserializer).map(Self)
        }
    }
}

/// A string that is not a valid id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: expected a UUID such as 3f2504e0-4f89-11d3-9a0c-0305e82c3301")]
pub struct InvalidId {
    what: &'static str,
}

/// What kind of backend object a resource is. Closed, so it can label metrics.
///
/// Serialized as its wire name ([`ResourceType::as_str`]); deserializing an unknown name fails.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::VariantArray,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ResourceType {
    /// A database and role on the shared Postgres cluster.
    Postgres,
    /// A namespace on the shared Redis.
    Redis,
    /// A Kubernetes namespace of the customer's own.
    Namespace,
}

impl ResourceType {
    /// Every resource type.
    pub const ALL: &'static [ResourceType] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name stored in `resources.resource_type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceType::Postgres => "postgres",
            ResourceType::Redis => "redis",
            ResourceType::Namespace => "namespace",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a known [`ResourceType`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource type {0:?}: expected postgres, redis or namespace")]
pub struct UnknownResourceType(pub String);

impl FromStr for ResourceType {
    type Err = UnknownResourceType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownResourceType(s.chars().take(32).collect()))
    }
}

/// A plan tier such as `free` or `pro`: 1 to 32 characters of `[a-z0-9_-]`.
///
/// Tiers are data (each platform names its own); what a tier means for a backend is configured
/// where it is applied.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Tier(String);

/// A string that is not a valid [`Tier`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid tier {0:?}: use 1 to 32 characters of [a-z0-9_-], e.g. \"pro\"")]
pub struct InvalidTier(pub String);

impl Tier {
    /// Parses a tier name.
    pub fn parse(s: &str) -> Result<Self, InvalidTier> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidTier(s.chars().take(32).collect()))
        }
    }

    /// The tier's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tier {
    type Err = InvalidTier;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Tier {
    type Error = InvalidTier;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Tier> for String {
    fn from(tier: Tier) -> String {
        tier.0
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shortest accepted customer token.
pub const TOKEN_MIN_LEN: usize = 8;
/// Longest accepted customer token (so `instant-customer-<token>` fits a Kubernetes name).
pub const TOKEN_MAX_LEN: usize = 40;

/// A customer token: the secret from which backend names are derived.
///
/// 8 to 40 characters of `[a-z0-9]`, valid as is in a Kubernetes name and a Postgres
/// identifier. `Debug` and `Display` show only a masked form (see [`crate::mask`]); the token
/// itself is only reachable through [`Token::expose`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

/// A string that is not a valid [`Token`]. The value is not shown.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid customer token (value not shown): use {TOKEN_MIN_LEN} to {TOKEN_MAX_LEN} characters of [a-z0-9]"
)]
pub struct InvalidToken;

impl Token {
    /// Parses a token.
    pub fn parse(s: &str) -> Result<Self, InvalidToken> {
        let ok = (TOKEN_MIN_LEN..=TOKEN_MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidToken)
        }
    }

    /// The token itself. Never log it; use `Display` (masked) instead.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form ([`crate::mask`]): at most a third of it and never more than 4
    /// characters, then `…`.
    pub fn masked(&self) -> String {
        crate::event::mask(&self.0)
    }
}

impl FromStr for Token {
    type Err = InvalidToken;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.masked())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LIB-13: an id round-trips through `Display`/`FromStr`, serde (as the plain UUID, so a
    /// request body holding a `TeamId` derives `Deserialize`), and `From<Uuid>`.
    #[test]
    fn ids_round_trip_through_text_serde_and_uuid() {
        let uuid = Uuid::parse_str("3f2504e0-4f89-11d3-9a0c-0305e82c3301").unwrap();
        let team = TeamId::from(uuid);
        assert_eq!(Uuid::from(team), uuid);
        assert_eq!(team.to_string().parse::<TeamId>().unwrap(), team);
        let json = serde_json::to_string(&team).unwrap();
        assert_eq!(json, format!("\"{uuid}\""));
        assert_eq!(serde_json::from_str::<TeamId>(&json).unwrap(), team);
        let resource = ResourceId::from(uuid);
        assert_eq!(
            serde_json::from_str::<ResourceId>(&serde_json::to_string(&resource).unwrap()).unwrap(),
            resource
        );
        assert!(serde_json::from_str::<TeamId>("\"tok_abc\"").is_err());
    }

    /// LIB-13: a resource type serializes as its wire name and deserializes only a known one.
    #[test]
    fn resource_types_serialize_as_their_wire_names() {
        for &t in ResourceType::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<ResourceType>(&json).unwrap(), t);
        }
        assert!(serde_json::from_str::<ResourceType>("\"mysql\"").is_err());
    }

    /// LIB-13: an `AuditEventId` (the Postgres adapter's row id) shows, parses and serializes as
    /// its number.
    #[test]
    fn audit_event_ids_display_parse_and_serialize_as_numbers() {
        let id = crate::postgres::AuditEventId::from(42);
        assert_eq!(id.to_string(), "42");
        assert_eq!("42".parse::<crate::postgres::AuditEventId>().unwrap(), id);
        assert_eq!(i64::from(id), 42);
        assert_eq!(id.get(), 42);
        assert_eq!(serde_json::to_string(&id).unwrap(), "42");
        assert_eq!(
            serde_json::from_str::<crate::postgres::AuditEventId>("42").unwrap(),
            id
        );
        assert!("x".parse::<crate::postgres::AuditEventId>().is_err());
    }

    /// LIB-13: with feature `postgres`, ids bind and decode as Postgres `uuid` directly.
    #[tokio::test]
    async fn ids_bind_and_decode_as_postgres_uuids() {
        let db = keel_testkit::database().await;
        let team = TeamId::new_random();
        let back: TeamId = sqlx::query_scalar("SELECT $1::uuid")
            .bind(team)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(back, team);
        let resource = ResourceId::new_random();
        let text: String = sqlx::query_scalar("SELECT $1::text")
            .bind(resource)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(text, resource.to_string());
    }

    #[test]
    fn ids_parse_from_uuids_and_reject_anything_else() {
        let uuid = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
        assert_eq!(uuid.parse::<TeamId>().unwrap().to_string(), uuid);
        assert_eq!(uuid.parse::<ResourceId>().unwrap().to_string(), uuid);
        let err = "tok_abc".parse::<ResourceId>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid resource id: expected a UUID such as 3f2504e0-4f89-11d3-9a0c-0305e82c3301"
        );
    }

    #[test]
    fn resource_types_round_trip_through_their_wire_names() {
        for &t in ResourceType::ALL {
            assert_eq!(t.as_str().parse::<ResourceType>(), Ok(t));
        }
        assert!("mysql".parse::<ResourceType>().is_err());
    }

    #[test]
    fn tiers_are_validated_names() {
        assert_eq!(Tier::parse("pro").unwrap().as_str(), "pro");
        assert!(Tier::parse("team-2").is_ok());
        for bad in ["", "Pro", "a b", &"x".repeat(33)] {
            assert!(Tier::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_strict_and_never_displayed_whole() {
        let token = Token::parse("a1b2c3d4e5f6").unwrap();
        assert_eq!(token.expose(), "a1b2c3d4e5f6");
        for shown in [token.to_string(), format!("{token:?}")] {
            assert!(!shown.contains("a1b2c3d4e5f6"), "{shown}");
            assert!(shown.contains("a1b2…"), "{shown}");
        }
        for bad in [
            "short",
            "UPPERCASE1",
            "with_underscore",
            "dash-ed-token",
            &"a".repeat(41),
        ] {
            let err = Token::parse(bad).unwrap_err();
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }
}
