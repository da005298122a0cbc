//! Identifiers shared by every Keel crate.
//!
//! Each id is its own type so that, say, a team id cannot be passed where a resource id is
//! expected. They are parsed at the edge with [`FromStr`](std::str::FromStr).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

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

/// A string that is not a valid id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: expected a UUID such as 3f2504e0-4f89-11d3-9a0c-0305e82c3301")]
pub struct InvalidId {
    what: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
