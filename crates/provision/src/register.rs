//! Registering rows Keel did not create: a team, and a resource whose backend object exists
//! already (made before Keel, or by another tool), so the propagation runner, the orphan sweep
//! and the rater see them. Each call runs on the caller's connection: pass an open transaction
//! to commit the registration with the caller's own audit row (`keel_audit::postgres::insert`)
//! and state change.
//!
//! The `teams` row is `(id, tier)`. A `resources` row is `active` only with its backend id and
//! connection address (`resources_active_is_addressable`); the token is unique, and its digest
//! (`token_digest`, which names the backend objects and which the sweep reads) is computed by the
//! database.
//!
//! **The one statement that carries a token.** Elsewhere the store draws each token itself, so no
//! statement or bound parameter sends one; a resource made outside Keel has a token Keel did not
//! draw, so [`register_existing`] binds it (once, as a parameter, never in the statement text).
//! A server that logs bound parameters logs it: register on a connection whose statement logging
//! is off, or accept that exposure for the resources registered.

use keel_audit::{ResourceId, ResourceType, TeamId, Tier, Token};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::model::BackendObject;

/// A resource whose backend object already exists, to register as `active`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExistingResource {
    /// The resource id to give it.
    pub id: ResourceId,
    /// The owning team (registered already).
    pub team_id: TeamId,
    /// What it is.
    pub resource_type: ResourceType,
    /// The tier its backend object is at now.
    pub tier: Tier,
    /// The customer token its backend names derive from.
    pub token: Token,
    /// The backend object: its provider id, and how the customer connects (only the address,
    /// without the password, is stored).
    pub object: BackendObject,
}

impl ExistingResource {
    /// A resource of `team_id` at `tier`, named by `token`, addressed as `object`, with a fresh id.
    pub fn new(
        team_id: TeamId,
        resource_type: ResourceType,
        tier: Tier,
        token: Token,
        object: BackendObject,
    ) -> Self {
        Self {
            id: ResourceId::new_random(),
            team_id,
            resource_type,
            tier,
            token,
            object,
        }
    }

    /// Gives it the id `id` instead of a fresh one.
    #[must_use]
    pub fn with_id(mut self, id: ResourceId) -> Self {
        self.id = id;
        self
    }
}

/// Why a registration was refused or failed. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// A team with this id exists already.
    #[error("team {0} exists already")]
    TeamExists(TeamId),
    /// The resource's team is not registered; register it first.
    #[error("team {0} is not registered; register the team first")]
    TeamNotFound(TeamId),
    /// A resource with this id or this token exists already (the token is not shown).
    #[error("resource {0}, or another resource with its token, exists already")]
    ResourceExists(ResourceId),
    /// The database failed. The source downcasts to `sqlx::Error` (sqlx 0.9).
    #[error("the database failed to {operation}")]
    Database {
        /// What was being attempted.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

fn code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code().map(|c| c.into_owned()))
}

/// Registers team `team` at `tier`, on `conn` (the caller's transaction, or any connection).
pub async fn register_team(
    conn: &mut PgConnection,
    team: TeamId,
    tier: &Tier,
    now: OffsetDateTime,
) -> Result<(), RegisterError> {
    sqlx::query("INSERT INTO teams (id, tier, created_at, updated_at) VALUES ($1, $2, $3, $3)")
        .bind(team.as_uuid())
        .bind(tier.as_str())
        .bind(now)
        .execute(conn)
        .await
        .map(drop)
        .map_err(|e| match code(&e).as_deref() {
            Some("23505") => RegisterError::TeamExists(team),
            _ => RegisterError::Database {
                operation: "register a team",
                source: e,
            },
        })
}

/// Registers `resource` as `active`, on `conn` (the caller's transaction, or any connection).
/// Its backend object is not touched: Keel takes it as it is.
pub async fn register_existing(
    conn: &mut PgConnection,
    resource: &ExistingResource,
    now: OffsetDateTime,
) -> Result<(), RegisterError> {
    let inserted = sqlx::query(
        "INSERT INTO resources \
           (id, token, team_id, resource_type, tier, status, provider_resource_id, \
            connection_url, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $8)",
    )
    .bind(resource.id.as_uuid())
    .bind(resource.token.expose())
    .bind(resource.team_id.as_uuid())
    .bind(resource.resource_type.as_str())
    .bind(resource.tier.as_str())
    .bind(&resource.object.provider_id)
    // The address only: a password is stored nowhere.
    .bind(resource.object.connection_url.address())
    .bind(now)
    .execute(conn)
    .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(e) => Err(match code(&e).as_deref() {
            Some("23503") => RegisterError::TeamNotFound(resource.team_id),
            // The database's message would quote the token: it is not kept.
            Some("23505") => RegisterError::ResourceExists(resource.id),
            _ => RegisterError::Database {
                operation: "register a resource",
                source: e,
            },
        }),
    }
}
