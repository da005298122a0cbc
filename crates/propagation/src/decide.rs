//! The one decision: what an attempt's outcome does to its propagation.

use keel_audit::{Actor, AuditEvent, AuditKind};
use time::OffsetDateTime;

use crate::model::Propagation;
use crate::outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
use crate::policy::RetryPolicy;

/// Why a propagation is not done yet.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryCause {
    /// The applier skipped with a reason that is not a legitimate no-op.
    UnexpectedSkip {
        /// Bounded bucket.
        bucket: ReasonBucket,
        /// The applier's words.
        detail: String,
    },
    /// The applier failed.
    Error {
        /// Bounded bucket.
        bucket: ReasonBucket,
        /// The error message.
        message: String,
    },
    /// Claimed with its attempts spent: every attempt's worker vanished before finishing (its
    /// lease expired each time), or another writer set its count past the budget.
    Abandoned,
}

impl RetryCause {
    /// Text for `pending_propagations.last_error`.
    pub fn describe(&self) -> String {
        match self {
            RetryCause::UnexpectedSkip { bucket, detail } => {
                format!("unexpected skip ({bucket}): {detail}")
            }
            RetryCause::Error { bucket, message } => format!("error ({bucket}): {message}"),
            RetryCause::Abandoned => "abandoned: claimed with its attempts spent (the last \
                                      attempt's lease expired, or its count was set past the \
                                      budget)"
                .to_owned(),
        }
    }

    /// Bounded bucket, for metrics.
    pub fn bucket(&self) -> ReasonBucket {
        match self {
            RetryCause::UnexpectedSkip { bucket, .. } | RetryCause::Error { bucket, .. } => *bucket,
            RetryCause::Abandoned => ReasonBucket::Other,
        }
    }
}

/// What happens to a propagation after an attempt.
///
/// Only this crate builds a `Transition`: [`decide`], [`decide_attempt`] and [`on_claim`] are
/// the only sources, so whatever drives a [`PropagationStore`](crate::PropagationStore) — Keel's
/// runner or a service's own — can record `Applied` only for an outcome that the decision
/// function ruled a success, and never for an unexpected skip. Outside code reads a transition
/// (match with `..`, [`Transition::audit_kind`]) but cannot construct one; the variants are
/// `#[non_exhaustive]` for that reason:
///
/// ```compile_fail
/// let forged = keel_propagation::Transition::Applied { skipped: None };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// Done: stamp `applied_at` (and the resource's applied tier).
    #[non_exhaustive]
    Applied {
        /// Set when success was a legitimate no-op rather than a change.
        skipped: Option<LegitimateSkip>,
    },
    /// Not done: try again at `next_attempt_at`.
    #[non_exhaustive]
    Retry {
        /// Why.
        cause: RetryCause,
        /// When the next attempt may run.
        next_attempt_at: OffsetDateTime,
    },
    /// Out of attempts: dead-letter, for operators to look at and requeue.
    #[non_exhaustive]
    DeadLetter {
        /// Why the last attempt failed.
        cause: RetryCause,
    },
}

impl Transition {
    /// The audit kind this transition writes. Exhaustive: an unexpected skip can only ever
    /// produce `propagation.unexpected_skip` (while retrying) or `propagation.dead_lettered`,
    /// never `propagation.applied`.
    pub fn audit_kind(&self) -> AuditKind {
        match self {
            Transition::Applied { .. } => AuditKind::PropagationApplied,
            Transition::Retry {
                cause: RetryCause::UnexpectedSkip { .. },
                ..
            } => AuditKind::PropagationUnexpectedSkip,
            Transition::Retry {
                cause: RetryCause::Error { .. } | RetryCause::Abandoned,
                ..
            } => AuditKind::PropagationRetrying,
            Transition::DeadLetter { .. } => AuditKind::PropagationDeadLettered,
        }
    }

    /// Text for `last_error`, if the propagation is not done. Text that looks like a secret is
    /// withheld (only its bucket is kept), since `last_error` is stored and shown to operators.
    pub fn last_error(&self) -> Option<String> {
        match self {
            Transition::Applied { .. } => None,
            Transition::Retry { cause, .. } | Transition::DeadLetter { cause } => {
                let text = storable(&cause.describe());
                Some(if keel_audit::looks_secret(&text) {
                    format!("{}: [withheld: looked like a secret]", cause.bucket())
                } else {
                    text
                })
            }
        }
    }

    /// The audit event recording this transition of `propagation`.
    ///
    /// Free text that looks like a secret (a connection URL in an error message, say) is
    /// withheld from the attributes rather than recorded.
    pub fn audit_event(
        &self,
        propagation: &Propagation,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> AuditEvent {
        let mut attributes = keel_audit::Attributes::new();
        let mut add = |key: &str, value: String| {
            if attributes.insert(key, value).is_err() {
                // Free text that looks like a secret is withheld, never recorded.
                let _ = attributes.insert(key, "[withheld: looked like a secret]");
            }
        };
        add("propagation_id", propagation.id.to_string());
        add("propagation_kind", propagation.kind().as_str().to_owned());
        add(
            "resource_type",
            propagation.resource_type.as_str().to_owned(),
        );
        add("attempt", propagation.attempt.to_string());
        add(
            "target_tier",
            propagation.payload.target_tier().as_str().to_owned(),
        );
        match self {
            Transition::Applied { skipped } => {
                if let Some(skip) = skipped {
                    add("skip_reason", skip.as_str().to_owned());
                }
            }
            Transition::Retry {
                cause,
                next_attempt_at,
            } => {
                add("reason_bucket", cause.bucket().as_str().to_owned());
                add("detail", truncate(&cause.describe()));
                add("next_attempt_at", rfc3339_micros(*next_attempt_at));
            }
            Transition::DeadLetter { cause } => {
                add("reason_bucket", cause.bucket().as_str().to_owned());
                add("detail", truncate(&cause.describe()));
            }
        }
        AuditEvent::new(self.audit_kind(), actor.clone(), now)
            .team(propagation.team_id)
            .resource(propagation.resource_id)
            .with_attributes(attributes)
    }
}

/// A time as audit attributes carry it: RFC 3339 in UTC, at microsecond precision (that of
/// `occurred_at`), e.g. `2026-11-29T19:48:55.015059Z`.
pub(crate) fn rfc3339_micros(at: OffsetDateTime) -> String {
    let at = at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(at);
    let at = at
        .replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
        .unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

fn truncate(text: &str) -> String {
    storable(text)
}

/// Decides what attempt `attempt` (from 1) with `outcome` does, under `policy`, at `now`.
///
/// - applied, or a legitimate skip → [`Transition::Applied`];
/// - an unexpected skip or an error → [`Transition::Retry`] after the schedule's delay,
///   or [`Transition::DeadLetter`] when this was the last attempt.
pub fn decide(
    attempt: u32,
    outcome: &Result<ApplyOutcome, ApplyError>,
    policy: &RetryPolicy,
    now: OffsetDateTime,
) -> Transition {
    let cause = match outcome {
        Ok(ApplyOutcome::Applied) => return Transition::Applied { skipped: None },
        Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(skip))) => {
            return Transition::Applied {
                skipped: Some(*skip),
            };
        }
        Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { bucket, detail })) => {
            RetryCause::UnexpectedSkip {
                bucket: *bucket,
                detail: detail.clone(),
            }
        }
        Err(ApplyError {
            bucket, message, ..
        }) => RetryCause::Error {
            bucket: *bucket,
            message: message.clone(),
        },
    };
    retry_or_dead_letter(attempt, cause, policy.delay_after(attempt), policy, now)
}

/// What the claim alone settles, before any applier runs:
///
/// - no `resources` row at all (a wrong id, a hard delete by another service): an unexpected
///   skip, never success — Keel soft-deletes, so absence is not "deprovisioned";
/// - a resource owned by another team than the propagation names: an unexpected skip (its
///   audit rows and notifications would go to the wrong team);
/// - a resource deleted on purpose (`status = 'deleted'`): the legitimate skip
///   `resource_deprovisioned`, with no backend call.
pub fn precheck(propagation: &Propagation) -> Option<Result<ApplyOutcome, ApplyError>> {
    let unexpected = |detail: &str| {
        Some(Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
            bucket: ReasonBucket::Other,
            detail: detail.to_owned(),
        })))
    };
    let backend = &propagation.backend;
    match backend.status.as_deref() {
        None => unexpected("the resource has no resources row (wrong id or hard-deleted)"),
        Some(_) if backend.team_id != Some(propagation.team_id) => {
            unexpected("the resource belongs to another team than the propagation names")
        }
        Some("deleted") => Some(Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
            LegitimateSkip::ResourceDeprovisioned,
        )))),
        Some(_) => None,
    }
}

/// [`decide`] for one claimed propagation, with the policy's jitter applied to the retry delay
/// (seeded by the row, so it is deterministic and rows that failed together spread out), and
/// the outcome checked against what the claim knows of the resource:
///
/// - a legitimate skip that leaves the backend behind (`resource_deprovisioned`, `superseded`)
///   is success only for a resource that is really deleted; on any other resource it is an
///   unexpected skip, because the drift it leaves would otherwise never be corrected.
pub fn decide_attempt(
    propagation: &Propagation,
    outcome: &Result<ApplyOutcome, ApplyError>,
    policy: &RetryPolicy,
    now: OffsetDateTime,
) -> Transition {
    let deleted = propagation.backend.status.as_deref() == Some("deleted");
    let checked;
    let outcome = match outcome {
        Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
            skip @ (LegitimateSkip::ResourceDeprovisioned | LegitimateSkip::Superseded),
        ))) if !deleted => {
            checked = Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::Other,
                detail: format!(
                    "the applier reported {} but the resource is {}; its tier did not land",
                    skip.as_str(),
                    propagation.backend.status.as_deref().unwrap_or("missing")
                ),
            }));
            &checked
        }
        Ok(ApplyOutcome::Applied) | Ok(ApplyOutcome::Skipped(_)) | Err(_) => outcome,
    };
    let attempt = propagation.attempt;
    match decide(attempt, outcome, policy, now) {
        Transition::Retry { cause, .. } => retry_or_dead_letter(
            attempt,
            cause,
            policy.delay_for(attempt, propagation.id.0.unsigned_abs()),
            policy,
            now,
        ),
        other @ (Transition::Applied { .. } | Transition::DeadLetter { .. }) => other,
    }
}

fn retry_or_dead_letter(
    attempt: u32,
    cause: RetryCause,
    delay: time::Duration,
    policy: &RetryPolicy,
    now: OffsetDateTime,
) -> Transition {
    if attempt >= policy.max_attempts() {
        Transition::DeadLetter { cause }
    } else {
        Transition::Retry {
            cause,
            next_attempt_at: now + delay,
        }
    }
}

/// Longest text kept in `last_error` (and an audit row's `detail`).
pub const MAX_ERROR_CHARS: usize = 512;

/// Text safe to store: NUL and other control characters (which PostgreSQL `text` or `jsonb`
/// refuse, or which garble an operator's terminal) become spaces, and it is cut to
/// [`MAX_ERROR_CHARS`] characters. A backend's error can then never make a completion
/// unstorable.
pub fn storable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_CHARS)
        .collect();
    if text.chars().count() > MAX_ERROR_CHARS {
        out.push('…');
    }
    out
}

/// What to do with a freshly claimed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimDecision {
    /// Run the applier.
    Apply,
    /// Don't: the budget was spent by attempts whose workers vanished. Record this transition.
    Settle(Transition),
}

/// Checks a claimed attempt against the budget before applying. Attempts are counted at claim
/// time, so a row whose worker keeps dying is dead-lettered instead of looping forever.
pub fn on_claim(attempt: u32, policy: &RetryPolicy) -> ClaimDecision {
    if attempt > policy.max_attempts() {
        ClaimDecision::Settle(Transition::DeadLetter {
            cause: RetryCause::Abandoned,
        })
    } else {
        ClaimDecision::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

    fn unexpected(bucket: ReasonBucket) -> Result<ApplyOutcome, ApplyError> {
        Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
            bucket,
            detail: format!("skipped: {bucket}"),
        }))
    }

    #[test]
    fn every_legitimate_skip_marks_applied() {
        for &skip in LegitimateSkip::ALL {
            let outcome = Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(skip)));
            let transition = decide(1, &outcome, &RetryPolicy::standard(), NOW);
            assert_eq!(
                transition,
                Transition::Applied {
                    skipped: Some(skip)
                }
            );
            assert_eq!(transition.audit_kind(), AuditKind::PropagationApplied);
        }
    }

    #[test]
    fn every_unexpected_skip_bucket_retries_and_never_marks_applied() {
        let policy = RetryPolicy::standard();
        for &bucket in ReasonBucket::ALL {
            for attempt in 1..policy.max_attempts() {
                let transition = decide(attempt, &unexpected(bucket), &policy, NOW);
                assert_eq!(
                    transition.audit_kind(),
                    AuditKind::PropagationUnexpectedSkip,
                    "{bucket}"
                );
                let Transition::Retry {
                    next_attempt_at,
                    cause,
                } = &transition
                else {
                    panic!("{bucket} at attempt {attempt} did not retry: {transition:?}");
                };
                assert_eq!(*next_attempt_at, NOW + policy.delay_after(attempt));
                assert_eq!(cause.bucket(), bucket);
            }
        }
    }

    #[test]
    fn unexpected_skip_at_the_last_attempt_dead_letters_through_the_ordinary_path() {
        let policy = RetryPolicy::standard();
        for &bucket in ReasonBucket::ALL {
            let transition = decide(10, &unexpected(bucket), &policy, NOW);
            assert!(
                matches!(transition, Transition::DeadLetter { .. }),
                "{transition:?}"
            );
            assert_eq!(transition.audit_kind(), AuditKind::PropagationDeadLettered);
        }
    }

    #[test]
    fn errors_retry_with_propagation_retrying_then_dead_letter() {
        let policy = RetryPolicy::standard();
        let failed = Err(ApplyError::new("connection refused"));
        let transition = decide(3, &failed, &policy, NOW);
        assert_eq!(transition.audit_kind(), AuditKind::PropagationRetrying);
        assert_eq!(
            transition,
            Transition::Retry {
                cause: RetryCause::Error {
                    bucket: ReasonBucket::ResourceNotReachable,
                    message: "connection refused".into()
                },
                next_attempt_at: NOW + Duration::minutes(15),
            }
        );
        assert_eq!(
            decide(10, &failed, &policy, NOW).audit_kind(),
            AuditKind::PropagationDeadLettered
        );
    }

    #[test]
    fn applied_marks_applied_at_every_attempt() {
        for attempt in 1..=10 {
            let transition = decide(
                attempt,
                &Ok(ApplyOutcome::Applied),
                &RetryPolicy::standard(),
                NOW,
            );
            assert_eq!(transition, Transition::Applied { skipped: None });
        }
    }

    #[test]
    fn a_claim_past_the_budget_dead_letters_without_applying() {
        let policy = RetryPolicy::standard();
        assert_eq!(on_claim(10, &policy), ClaimDecision::Apply);
        let ClaimDecision::Settle(transition) = on_claim(11, &policy) else {
            panic!("an attempt past the budget was applied");
        };
        assert_eq!(transition.audit_kind(), AuditKind::PropagationDeadLettered);
    }

    /// PROP-17(a): whatever a backend says, `last_error` and the audit detail are storable
    /// (no NUL or control characters) and bounded.
    #[test]
    fn last_error_is_storable_and_capped() {
        let garbage = format!("backend said: \u{0}\u{1}\n{}", "x".repeat(10_000));
        let transition = decide(
            1,
            &Err(ApplyError::new(garbage)),
            &RetryPolicy::standard(),
            NOW,
        );
        let stored = transition.last_error().unwrap();
        assert!(!stored.chars().any(char::is_control), "{stored:?}");
        assert!(stored.chars().count() <= MAX_ERROR_CHARS + 1);
        assert!(
            stored.starts_with("error (other): backend said:"),
            "{stored:?}"
        );
        let event =
            transition.audit_event(&crate::model::sample_propagation(), &Actor::system(), NOW);
        let detail = event.attributes().get("detail").unwrap();
        assert!(!detail.chars().any(char::is_control));
        assert!(detail.chars().count() <= MAX_ERROR_CHARS + 1);
    }

    #[test]
    fn audit_events_withhold_secret_looking_details() {
        use crate::model::PropagationId;
        let mut propagation = crate::model::sample_propagation();
        propagation.id = PropagationId(7);
        propagation.attempt = 2;
        let failed = Err(ApplyError::new(
            "could not connect to postgres://admin:s3cr3t@db/x",
        ));
        let event = decide(2, &failed, &RetryPolicy::standard(), NOW).audit_event(
            &propagation,
            &Actor::system(),
            NOW,
        );
        assert_eq!(event.kind(), AuditKind::PropagationRetrying);
        assert_eq!(
            event.attributes().get("detail"),
            Some("[withheld: looked like a secret]")
        );
        assert_eq!(event.attributes().get("attempt"), Some("2"));
        assert_eq!(event.attributes().get("reason_bucket"), Some("other"));
        let transition = decide(2, &failed, &RetryPolicy::standard(), NOW);
        assert_eq!(
            transition.last_error().as_deref(),
            Some("other: [withheld: looked like a secret]")
        );
    }

    /// LIB-15: every time-valued audit attribute parses as RFC 3339 (UTC, microseconds), like
    /// `occurred_at`, whatever offset and precision the clock handed in.
    #[test]
    fn time_valued_audit_attributes_are_rfc3339() {
        use time::format_description::well_known::Rfc3339;
        let at = datetime!(2026-11-29 21:48:55.015059535 +02:00);
        let failed = Err(ApplyError::new("backend unavailable"));
        let transition = decide(1, &failed, &RetryPolicy::standard(), at);
        let event =
            transition.audit_event(&crate::model::sample_propagation(), &Actor::system(), at);
        let written = event.attributes().get("next_attempt_at").unwrap();
        let parsed =
            OffsetDateTime::parse(written, &Rfc3339).unwrap_or_else(|e| panic!("{written}: {e}"));
        let Transition::Retry {
            next_attempt_at, ..
        } = transition
        else {
            panic!("expected a retry, got {transition:?}");
        };
        assert_eq!(
            parsed,
            next_attempt_at
                .replace_nanosecond(next_attempt_at.nanosecond() / 1_000 * 1_000)
                .unwrap()
        );
        assert!(written.ends_with('Z'), "{written}");
        assert_eq!(rfc3339_micros(at), "2026-11-29T19:48:55.015059Z");
    }
}
