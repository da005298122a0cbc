//! The values a provisioning flow passes around: what was asked for, which backend object it
//! names, what the backend answered, and what the store holds.

use std::fmt;

use keel_audit::{Actor, RequestId, ResourceId, ResourceType, TeamId, Tier, Token};
use time::OffsetDateTime;

use crate::names::{DatabaseName, ForeignName, NamespaceName, TokenDigest};
use crate::secret::ConnectionUrl;

/// A request to provision one resource, parsed at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionRequest {
    /// The team that will own (and pay for) the resource.
    pub team_id: TeamId,
    /// What to provision.
    pub resource_type: ResourceType,
    /// The plan tier to provision it at.
    pub tier: Tier,
    /// The request id, carried into audit rows and error envelopes.
    pub request_id: RequestId,
    /// Who asked.
    pub actor: Actor,
}

/// A fresh customer token: 32 characters of `[0-9a-f]` from the operating system's random source.
pub fn new_token() -> Token {
    let raw = uuid::Uuid::new_v4().simple().to_string();
    Token::parse(&raw).expect("a v4 UUID in simple form is 32 lowercase hex digits, a valid token")
}

/// The backend object a resource is, named deterministically from its token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackendName {
    /// A database and its owning role on the shared Postgres cluster (`cust_<digest>`, or a
    /// legacy `cust_<token>`).
    Database(DatabaseName),
    /// A Kubernetes namespace (`instant-customer-<token>`), for a `namespace` or a `redis`
    /// resource (the resource type is recorded on the namespace as a label).
    Namespace {
        /// The namespace.
        name: NamespaceName,
        /// `Namespace` or `Redis`.
        resource_type: ResourceType,
    },
}

impl BackendName {
    /// The backend name of a resource of `resource_type` with `token`.
    pub fn for_resource(resource_type: ResourceType, token: &Token) -> Self {
        match resource_type {
            ResourceType::Postgres => Self::Database(DatabaseName::for_token(token)),
            ResourceType::Redis | ResourceType::Namespace => Self::Namespace {
                name: NamespaceName::for_token(token),
                resource_type,
            },
        }
    }

    /// Parses the backend name stored as a resource's provider id; refuses anything outside the
    /// platform's prefixes.
    pub fn parse_provider_id(
        resource_type: ResourceType,
        provider_id: &str,
    ) -> Result<Self, ForeignName> {
        match resource_type {
            ResourceType::Postgres => DatabaseName::parse(provider_id).map(Self::Database),
            ResourceType::Redis | ResourceType::Namespace => {
                NamespaceName::parse(provider_id).map(|name| Self::Namespace {
                    name,
                    resource_type,
                })
            }
        }
    }

    /// The resource type the object backs.
    pub fn resource_type(&self) -> ResourceType {
        match self {
            Self::Database(_) => ResourceType::Postgres,
            Self::Namespace { resource_type, .. } => *resource_type,
        }
    }

    /// The backend name of a stored resource: [`BackendName::for_resource`], except a database
    /// created before digest names, whose row's provider id is exactly its legacy name
    /// `cust_<token>` (never any other name a row may hold, so a tampered row cannot aim a
    /// teardown elsewhere).
    pub fn for_stored(
        resource_type: ResourceType,
        token: &Token,
        provider_id: Option<&str>,
    ) -> Self {
        match resource_type {
            ResourceType::Postgres => {
                let legacy = DatabaseName::legacy_for_token(token);
                if provider_id == Some(legacy.expose()) {
                    Self::Database(legacy)
                } else {
                    Self::Database(DatabaseName::for_token(token))
                }
            }
            ResourceType::Redis | ResourceType::Namespace => {
                Self::for_resource(resource_type, token)
            }
        }
    }

    /// The digest of the token the name derives from: how the `resources` row owning the object
    /// is found (`resources.token_digest`) without writing the token into a query.
    pub fn digest(&self) -> TokenDigest {
        match self {
            Self::Database(name) => name.digest().clone(),
            Self::Namespace { name, .. } => TokenDigest::of(name.token()),
        }
    }

    /// The name itself (the resource's `provider_resource_id`). A namespace's or a legacy
    /// database's name contains the token: never log it.
    pub fn expose(&self) -> &str {
        match self {
            Self::Database(name) => name.expose(),
            Self::Namespace { name, .. } => name.expose(),
        }
    }

    /// `text` with any token this name carries masked (a namespace's, a legacy database's).
    pub fn mask_in(&self, text: &str) -> String {
        match self {
            Self::Database(name) => name.mask_in(text),
            Self::Namespace { name, .. } => {
                let token = name.token();
                text.replace(token.expose(), &token.masked())
            }
        }
    }

    /// The name with its token masked, for logs and audit rows.
    pub fn masked(&self) -> String {
        match self {
            Self::Database(name) => name.masked(),
            Self::Namespace { name, .. } => name.masked(),
        }
    }

    /// [`BackendName::masked`], taking the name (a digest-named database's name is handed over
    /// without a copy).
    pub fn into_masked(self) -> String {
        match self {
            Self::Database(name) => name.into_masked(),
            Self::Namespace { name, .. } => name.masked(),
        }
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// What a backend answers once the object exists: how the platform addresses it. Its `Debug`
/// shows neither the provider id (it carries the token) nor the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendObject {
    /// The provider's id for the object (the backend name for Keel's backends).
    pub provider_id: String,
    /// How the customer connects. Shown once, in the 201.
    pub connection_url: ConnectionUrl,
}

impl fmt::Debug for BackendObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendObject")
            .field("provider_id", &keel_audit::mask(&self.provider_id))
            .field("connection_url", &self.connection_url)
            .finish()
    }
}

/// A resource row's lifecycle status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum ResourceStatus {
    /// Reserved; the backend object may or may not exist yet.
    Pending,
    /// Addressable: the backend object exists and the row holds its id and connection URL.
    Active,
    /// Paused by the platform; still owned.
    Paused,
    /// Suspended (for example for non-payment); still owned.
    Suspended,
    /// Deprovisioned through the chokepoint (terminal, soft-deleted).
    Deleted,
    /// Provisioning failed and was compensated (terminal, soft-deleted).
    Failed,
}

impl ResourceStatus {
    /// Every status.
    pub const ALL: &'static [ResourceStatus] = <Self as strum::VariantArray>::VARIANTS;

    /// The value stored in `resources.status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Suspended => "suspended",
            Self::Deleted => "deleted",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|status| status.as_str() == s)
    }

    /// Whether the resource still owns its backend object (pending, active, paused, suspended).
    pub const fn is_live(self) -> bool {
        match self {
            Self::Pending | Self::Active | Self::Paused | Self::Suspended => true,
            Self::Deleted | Self::Failed => false,
        }
    }
}

/// A resource as the store holds it, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRecord {
    /// The resource id.
    pub id: ResourceId,
    /// Its token (displays masked).
    pub token: Token,
    /// The owning team.
    pub team_id: TeamId,
    /// What it is.
    pub resource_type: ResourceType,
    /// Its tier.
    pub tier: Tier,
    /// Its status.
    pub status: ResourceStatus,
    /// The backend's id for the object, once finalized.
    pub provider_resource_id: Option<String>,
    /// When it was reserved.
    pub created_at: OffsetDateTime,
    /// When its row last changed.
    pub updated_at: OffsetDateTime,
    /// When it was soft-deleted.
    pub deleted_at: Option<OffsetDateTime>,
}

impl ResourceRecord {
    /// The backend object this resource names (derived from its token; the provider id only
    /// tells a legacy database name, see [`BackendName::for_stored`]).
    pub fn backend_name(&self) -> BackendName {
        BackendName::for_stored(
            self.resource_type,
            &self.token,
            self.provider_resource_id.as_deref(),
        )
    }
}

/// Why a live resource is being deprovisioned. Closed: it labels metrics and audit rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum DeprovisionReason {
    /// The customer (or their agent) asked for it.
    CustomerRequest,
    /// Its time-to-live ran out.
    Expired,
    /// An operator removed it by hand.
    Operator,
    /// The orphan sweep reclaimed a backend object no live resource owns.
    Orphan,
}

impl DeprovisionReason {
    /// Every reason.
    pub const ALL: &'static [DeprovisionReason] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CustomerRequest => "customer_request",
            Self::Expired => "expired",
            Self::Operator => "operator",
            Self::Orphan => "orphan",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|reason| reason.as_str() == s)
    }
}

impl fmt::Display for DeprovisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_follow_the_resource_type_and_round_trip_through_the_provider_id() {
        let token = new_token();
        for &resource_type in ResourceType::ALL {
            let name = BackendName::for_resource(resource_type, &token);
            assert_eq!(name.resource_type(), resource_type);
            assert_eq!(name.digest(), TokenDigest::of(&token));
            assert!(!name.to_string().contains(token.expose()));
            let parsed = BackendName::parse_provider_id(resource_type, name.expose()).unwrap();
            assert_eq!(parsed, name);
        }
        assert!(BackendName::parse_provider_id(ResourceType::Postgres, "postgres").is_err());
        // A database created before digest names keeps its legacy name; no other provider id
        // can redirect a stored resource's name.
        let legacy = format!("cust_{}", token.expose());
        let stored = BackendName::for_stored(ResourceType::Postgres, &token, Some(&legacy));
        assert_eq!(stored.expose(), legacy);
        assert_eq!(stored.digest(), TokenDigest::of(&token));
        for other in [None, Some("cust_someoneelse1"), Some("postgres")] {
            assert_eq!(
                BackendName::for_stored(ResourceType::Postgres, &token, other),
                BackendName::for_resource(ResourceType::Postgres, &token)
            );
        }
        assert!(BackendName::parse_provider_id(ResourceType::Redis, "kube-system").is_err());
    }

    #[test]
    fn fresh_tokens_are_valid_and_distinct() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 32);
    }

    #[test]
    fn statuses_and_reasons_round_trip_and_only_four_statuses_are_live() {
        for &status in ResourceStatus::ALL {
            assert_eq!(ResourceStatus::parse(status.as_str()), Some(status));
        }
        let live: Vec<_> = ResourceStatus::ALL
            .iter()
            .filter(|s| s.is_live())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(live, ["pending", "active", "paused", "suspended"]);
        for &reason in DeprovisionReason::ALL {
            assert_eq!(DeprovisionReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(DeprovisionReason::parse("drop_it"), None);
    }
}
