//! What an applier reports, and the bounded buckets raw reasons fall into.

use std::fmt;

/// A skip that is genuinely success: there was nothing to do. The set is closed on purpose;
/// every other skip is unexpected and retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum LegitimateSkip {
    /// The backend already has the target.
    AlreadyAtTarget,
    /// The resource was deprovisioned by design; there is no backend to change.
    ResourceDeprovisioned,
    /// A newer propagation for the same resource supersedes this one.
    Superseded,
}

impl LegitimateSkip {
    /// Every legitimate skip.
    pub const ALL: &'static [LegitimateSkip] = <Self as strum::VariantArray>::VARIANTS;

    /// A stable name for logs and audit attributes.
    pub const fn as_str(self) -> &'static str {
        match self {
            LegitimateSkip::AlreadyAtTarget => "already_at_target",
            LegitimateSkip::ResourceDeprovisioned => "resource_deprovisioned",
            LegitimateSkip::Superseded => "superseded",
        }
    }
}

/// The bounded classification of raw skip and failure reasons (the `skip_reason` metric label).
///
/// A fixed label set, named after the backends Keel's own appliers drive: metric labels
/// must come from a closed set, so a custom applier's reasons that match none of these land in
/// [`ReasonBucket::Other`] (pick the bucket yourself with [`SkipReason::Unexpected`] when one
/// fits). The enum is `#[non_exhaustive]`: Keel may add buckets without breaking a consumer's
/// `match`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, strum::VariantArray)]
#[non_exhaustive]
pub enum ReasonBucket {
    /// The customer's postgres pod has no `postgres-admin` Secret.
    PostgresAdminSecretMissing,
    /// The customer's Redis has no auth Secret.
    RedisAuthSecretMissing,
    /// The customer's namespace does not exist.
    NamespaceNotFound,
    /// The customer's pod does not exist.
    PodNotFound,
    /// The backend could not be reached (refused, timed out, unreachable).
    ResourceNotReachable,
    /// The resource predates what the applier supports.
    LegacyResource,
    /// Anything else.
    Other,
}

impl ReasonBucket {
    /// Every bucket.
    pub const ALL: &'static [ReasonBucket] = <Self as strum::VariantArray>::VARIANTS;

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReasonBucket::PostgresAdminSecretMissing => "postgres_admin_secret_missing",
            ReasonBucket::RedisAuthSecretMissing => "redis_auth_secret_missing",
            ReasonBucket::NamespaceNotFound => "namespace_not_found",
            ReasonBucket::PodNotFound => "pod_not_found",
            ReasonBucket::ResourceNotReachable => "resource_not_reachable",
            ReasonBucket::LegacyResource => "legacy_resource",
            ReasonBucket::Other => "other",
        }
    }

    /// Buckets a raw reason (an applier's text, a backend's error message). Never fails: what
    /// matches nothing is [`ReasonBucket::Other`], so label cardinality stays bounded.
    pub fn classify(raw: &str) -> Self {
        let raw = raw.to_ascii_lowercase();
        let missing = [
            "not found",
            "notfound",
            "missing",
            "does not exist",
            "no such",
        ]
        .iter()
        .any(|m| raw.contains(m));
        if (raw.contains("postgres-admin") || raw.contains("postgres_admin")) && missing {
            ReasonBucket::PostgresAdminSecretMissing
        } else if (raw.contains("redis-auth") || raw.contains("redis_auth")) && missing {
            ReasonBucket::RedisAuthSecretMissing
        } else if raw.contains("namespace") && missing {
            ReasonBucket::NamespaceNotFound
        } else if raw.contains("pod") && missing {
            ReasonBucket::PodNotFound
        } else if [
            "refused",
            "timed out",
            "timeout",
            "unreachable",
            "no route",
            "reset by peer",
        ]
        .iter()
        .any(|m| raw.contains(m))
        {
            ReasonBucket::ResourceNotReachable
        } else if raw.contains("legacy") {
            ReasonBucket::LegacyResource
        } else {
            ReasonBucket::Other
        }
    }
}

impl fmt::Display for ReasonBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an applier skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipReason {
    /// Nothing to do: success.
    Legitimate(LegitimateSkip),
    /// A skip nobody declared legitimate: it retries and, if it persists, dead-letters.
    Unexpected {
        /// Its bounded bucket.
        bucket: ReasonBucket,
        /// What the applier said (kept for `last_error`; never a metric label).
        detail: String,
    },
}

impl SkipReason {
    /// An unexpected skip, bucketed from its detail.
    pub fn unexpected(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        SkipReason::Unexpected {
            bucket: ReasonBucket::classify(&detail),
            detail,
        }
    }

    /// Interprets a raw skip reason: legitimate only when it names one of the closed set of
    /// no-ops exactly (`already_at_target`, `resource_deprovisioned`, `superseded`); anything
    /// else is unexpected. There is no "close enough".
    pub fn from_raw(raw: &str) -> Self {
        LegitimateSkip::ALL
            .iter()
            .copied()
            .find(|skip| skip.as_str() == raw.trim())
            .map(SkipReason::Legitimate)
            .unwrap_or_else(|| SkipReason::unexpected(raw))
    }
}

/// What an applier did with one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyOutcome {
    /// The backend now has the target.
    Applied,
    /// The applier did not apply; see the reason.
    Skipped(SkipReason),
}

/// An applier's failure: retried on the schedule, dead-lettered when the budget is spent —
/// unless the attempt never reached the backend ([`ApplyError::not_attempted`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    /// Its bounded bucket.
    pub bucket: ReasonBucket,
    /// What went wrong (kept for `last_error`; never a metric label).
    pub message: String,
    /// Whether the attempt reached the backend. An attempt that never did (it waited for a
    /// connection or a concurrency slot the applier shares with other rows) is given back
    /// uncharged: one slow customer backend must not cost other rows their attempts.
    pub reached_backend: bool,
}

impl ApplyError {
    /// An error bucketed from its message.
    pub fn new(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            bucket: ReasonBucket::classify(&message),
            message,
            reached_backend: true,
        }
    }

    /// The applier could not even start on the backend (no free connection or slot): the row
    /// is released with its attempt given back, and retried shortly.
    pub fn not_attempted(message: impl Into<String>) -> Self {
        Self {
            reached_backend: false,
            ..Self::new(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_reasons_fall_into_bounded_buckets() {
        let cases = [
            (
                "secret postgres-admin not found in namespace",
                ReasonBucket::PostgresAdminSecretMissing,
            ),
            (
                "redis-auth secret missing",
                ReasonBucket::RedisAuthSecretMissing,
            ),
            (
                "namespace instant-customer-x not found",
                ReasonBucket::NamespaceNotFound,
            ),
            (
                "pod customer-pg-0 does not exist",
                ReasonBucket::PodNotFound,
            ),
            (
                "connection refused (os error 111)",
                ReasonBucket::ResourceNotReachable,
            ),
            ("operation timed out", ReasonBucket::ResourceNotReachable),
            (
                "legacy free-tier pod without labels",
                ReasonBucket::LegacyResource,
            ),
            ("something new and strange", ReasonBucket::Other),
            ("", ReasonBucket::Other),
        ];
        for (raw, bucket) in cases {
            assert_eq!(ReasonBucket::classify(raw), bucket, "{raw:?}");
        }
    }

    #[test]
    fn bucket_label_values_are_unique_lower_snake() {
        let mut seen = std::collections::BTreeSet::new();
        for bucket in ReasonBucket::ALL {
            let label = bucket.as_str();
            assert!(seen.insert(label), "{label}");
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
        }
        assert_eq!(seen.len(), 7, "the seed's seven buckets");
    }

    #[test]
    fn only_exact_legitimate_names_are_legitimate_skips() {
        for skip in LegitimateSkip::ALL {
            assert_eq!(
                SkipReason::from_raw(skip.as_str()),
                SkipReason::Legitimate(*skip)
            );
        }
        for raw in [
            "already at target tier?",
            "superseded-ish",
            "deprovisioning",
            "skipped",
        ] {
            assert!(
                matches!(SkipReason::from_raw(raw), SkipReason::Unexpected { .. }),
                "{raw:?} must not pass as legitimate"
            );
        }
    }
}
