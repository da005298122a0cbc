//! What each tier means on the shared Postgres cluster: one definition, used both when a customer
//! database is provisioned and when a tier change is propagated, so the two can never disagree.

use std::collections::BTreeMap;

use crate::Tier;

/// Role settings a tier maps to on the shared Postgres cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleSettings {
    /// `CONNECTION LIMIT`.
    pub connection_limit: i32,
    /// `statement_timeout`, in milliseconds.
    pub statement_timeout_ms: u64,
}

/// Role settings per tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierRoleSettings(BTreeMap<Tier, RoleSettings>);

impl TierRoleSettings {
    /// `free` 5 connections / 30 s, `hobby` 10 / 60 s, `pro` 50 / 5 min, `team` 200 / 15 min.
    pub fn standard() -> Self {
        let entries = [
            ("free", 5, 30_000),
            ("hobby", 10, 60_000),
            ("pro", 50, 300_000),
            ("team", 200, 900_000),
        ];
        Self(
            entries
                .into_iter()
                .filter_map(|(tier, connection_limit, statement_timeout_ms)| {
                    Some((
                        Tier::parse(tier).ok()?,
                        RoleSettings {
                            connection_limit,
                            statement_timeout_ms,
                        },
                    ))
                })
                .collect(),
        )
    }

    /// Sets (or replaces) a tier's settings.
    pub fn with(mut self, tier: Tier, settings: RoleSettings) -> Self {
        self.0.insert(tier, settings);
        self
    }

    /// A tier's settings.
    pub fn get(&self, tier: &Tier) -> Option<RoleSettings> {
        self.0.get(tier).copied()
    }
}
