//! Audit kinds and the consumer each one declares.

use std::fmt;
use std::str::FromStr;

use strum::VariantArray;

/// What happened, as a closed set with stable wire names (`<domain>.<event>`, lower snake case).
///
/// The wire name ([`AuditKind::as_str`]) is what lands in `audit_events.kind`; operators and other
/// services query it, so a name never changes once released.
///
/// # Adding a kind
///
/// Every kind must declare who consumes it ([`AuditKind::consumer`]). That declaration is an
/// exhaustive `match` with no wildcard arm, so **adding a variant without deciding its consumer
/// does not compile**. This replaces a test that greps for unconsumed kinds: an event kind that
/// nobody reads is exactly the silent failure this crate exists to prevent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, VariantArray)]
pub enum AuditKind {
    /// A team's tier changed; the propagation machinery must carry it to every resource.
    TeamTierChanged,
    /// A propagation reached its target (for example a tier regrade landed).
    PropagationApplied,
    /// A propagation attempt failed with an error and is scheduled to retry.
    PropagationRetrying,
    /// An applier skipped with a reason that is not a legitimate no-op; the row retries.
    PropagationUnexpectedSkip,
    /// A propagation exhausted its attempts and was dead-lettered.
    PropagationDeadLettered,
    /// An operator re-armed a dead-lettered propagation.
    PropagationRequeued,
    /// An operator enqueued a propagation by hand (validated against the resource and team).
    PropagationEnqueued,
    /// A resource was provisioned and is addressable.
    ProvisionCreated,
    /// The backend object was created but the resource row could not be finalized; the backend
    /// object was torn down (or its teardown failure recorded) and the caller got a 503.
    ProvisionPersistenceFailed,
    /// Creating the backend object failed (for example the cluster was unreachable); the
    /// reservation was compensated. Not a persistence failure: nothing was created after the
    /// row was written, so it does not page.
    ProvisionCreateFailed,
    /// A compensating teardown (after a failed create or finalize, or by the reconciler) failed:
    /// the backend object may be left behind under its deterministic name.
    ProvisionTeardownFailed,
    /// The reconciler compensated a reservation left `pending` longer than its age limit (a
    /// provisioning cut short by a crash or a shutdown deadline).
    ProvisionReconciled,
    /// A live resource's backend object was torn down through the deprovision chokepoint.
    ResourceDeprovisioned,
    /// The orphan sweep reclaimed an orphaned backend object through the deprovision chokepoint.
    OrphanSweepReclaimed,
    /// A billing charge could not be delivered to the billing provider.
    BillingChargeUndeliverable,
    /// A routine rater run lowered or removed previously rated (billed) usage: events vanished,
    /// or an hour lost its price. Recorded with old -> new values.
    RaterReconcileDeleted,
    /// An explicit rater backfill lowered or removed previously rated usage: the convergence the
    /// operator asked for, recorded with old -> new values.
    RaterBackfillReconciled,
    /// The deprovision chokepoint refused to reclaim an orphaned backend object (another
    /// installation's, not provably this installation's, or protected); nothing was destroyed.
    /// Recorded once per object and reason.
    ResourceReclaimRefused,
    /// The deprovision chokepoint audited an orphan's reclaim but its teardown failed; the object
    /// may still exist. Recorded once per object.
    ResourceReclaimFailed,
    /// An API key of the provisioning API was created (its id and scope; never the key).
    ApiKeyCreated,
    /// An API key of the provisioning API was revoked.
    ApiKeyRevoked,
    /// A resource's credentials were rotated: a new password was issued and the old one stopped
    /// working.
    ResourceCredentialsRotated,
    /// The notification dispatcher delivered a customer notification (the receiver answered
    /// 2xx); names the notification's event id and the audit row it carries.
    NotificationDelivered,
    /// A notification delivery attempt failed (an HTTP status or an unreachable receiver); it
    /// retries after a backoff.
    NotificationRetrying,
    /// A notification used its last delivery attempt and was dead-lettered: the customer was
    /// not told until an operator requeues it.
    NotificationDeadLettered,
    /// An operator requeued a dead-lettered notification.
    NotificationRequeued,
    /// An operator signed in to the operator console with an operator API key (its id, never
    /// the key).
    ConsoleSignedIn,
    /// An operator signed out of the operator console.
    ConsoleSignedOut,
    /// An operator protected a token's backend objects from reclamation
    /// (`reclaim_protections`, by token digest), from the console or the orphan-sweep CLI.
    ReclaimProtected,
    /// An operator removed a token's reclaim protection: the sweep's usual gates decide again.
    ReclaimUnprotected,
    /// A month of the audit trail was exported to a file for retention (`keel-audit retention
    /// export`): its partition, row count and the file's SHA-256.
    AuditPartitionExported,
    /// A month's export was verified against its partition and the seal chain.
    AuditPartitionVerified,
    /// A month's verified partition was detached from the audit trail.
    AuditPartitionDetached,
}

/// How urgently an operator alert needs a human.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertSeverity {
    /// Wake someone up: money, data or a customer's service is at stake now.
    Page,
    /// Look at it during working hours.
    Ticket,
}

/// Who reads an audit kind, declared per kind by [`AuditKind::consumer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Consumer {
    /// The customer-notification forwarder sends the customer a message from this template.
    CustomerNotification {
        /// Name of the notification template.
        template: &'static str,
    },
    /// Operators are alerted on this kind.
    OperatorAlert {
        /// Name of the Prometheus alert (in `deploy/prometheus/rules.yaml`) that fires when
        /// this kind is written; a test fails when the rule is missing.
        alert: &'static str,
        /// How urgent the alert is.
        severity: AlertSeverity,
    },
    /// The propagation machinery reacts to this kind.
    PropagationWiring {
        /// The propagation kind that this event causes to be enqueued.
        propagation_kind: &'static str,
    },
    /// Deliberately nobody consumes this kind; the audit trail itself is the purpose.
    IntentionallyNone {
        /// Why no consumer is needed.
        reason: &'static str,
    },
}

impl AuditKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [AuditKind] = Self::VARIANTS;

    /// Kinds declared ahead of the code that writes them, each with what is missing. A test
    /// fails when any other kind is not written by production code, and when a kind listed here
    /// is written (remove it from the list then). Their declared consumers do not exist yet
    /// either: nothing reads a kind nothing writes.
    pub const PLANNED: &'static [(AuditKind, &'static str)] = &[(
        AuditKind::BillingChargeUndeliverable,
        "Keel has no billing-delivery code yet; the kind is reserved for it",
    )];

    /// Kinds that are written, but whose declared consumer is not built yet, each with what is
    /// missing. A test fails when a `CustomerNotification` kind is neither here nor delivered by
    /// the notification dispatcher (`keel_audit::notify::DISPATCHED_KINDS`), so a declaration is
    /// never mistaken for a delivery. Empty: the dispatcher delivers every customer kind.
    pub const PLANNED_CONSUMERS: &'static [(AuditKind, &'static str)] = &[];

    /// Why this kind is only planned (see [`AuditKind::PLANNED`]), or `None` when production
    /// code writes it.
    pub fn planned(self) -> Option<&'static str> {
        Self::PLANNED
            .iter()
            .find(|(kind, _)| *kind == self)
            .map(|(_, why)| *why)
    }

    /// The stable wire name stored in `audit_events.kind`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditKind::TeamTierChanged => "team.tier_changed",
            AuditKind::PropagationApplied => "propagation.applied",
            AuditKind::PropagationRetrying => "propagation.retrying",
            AuditKind::PropagationUnexpectedSkip => "propagation.unexpected_skip",
            AuditKind::PropagationDeadLettered => "propagation.dead_lettered",
            AuditKind::PropagationRequeued => "propagation.requeued",
            AuditKind::PropagationEnqueued => "propagation.enqueued",
            AuditKind::ProvisionCreated => "provision.created",
            AuditKind::ProvisionPersistenceFailed => "provision.persistence_failed",
            AuditKind::ProvisionCreateFailed => "provision.create_failed",
            AuditKind::ProvisionTeardownFailed => "provision.teardown_failed",
            AuditKind::ProvisionReconciled => "provision.reconciled",
            AuditKind::ResourceDeprovisioned => "resource.deprovisioned",
            AuditKind::OrphanSweepReclaimed => "orphan_sweep.reclaimed",
            AuditKind::BillingChargeUndeliverable => "billing.charge_undeliverable",
            AuditKind::RaterReconcileDeleted => "rater.reconcile_deleted",
            AuditKind::RaterBackfillReconciled => "rater.backfill_reconciled",
            AuditKind::ResourceReclaimRefused => "resource.reclaim_refused",
            AuditKind::ResourceReclaimFailed => "resource.reclaim_failed",
            AuditKind::ApiKeyCreated => "api_key.created",
            AuditKind::ApiKeyRevoked => "api_key.revoked",
            AuditKind::ResourceCredentialsRotated => "resource.credentials_rotated",
            AuditKind::NotificationDelivered => "notification.delivered",
            AuditKind::NotificationRetrying => "notification.retrying",
            AuditKind::NotificationDeadLettered => "notification.dead_lettered",
            AuditKind::NotificationRequeued => "notification.requeued",
            AuditKind::ConsoleSignedIn => "console.signed_in",
            AuditKind::ConsoleSignedOut => "console.signed_out",
            AuditKind::ReclaimProtected => "resource.reclaim_protected",
            AuditKind::ReclaimUnprotected => "resource.reclaim_unprotected",
            AuditKind::AuditPartitionExported => "audit.partition_exported",
            AuditKind::AuditPartitionVerified => "audit.partition_verified",
            AuditKind::AuditPartitionDetached => "audit.partition_detached",
        }
    }

    /// The consumer this kind declares.
    ///
    /// This `match` is exhaustive and has no wildcard arm on purpose: a new kind must decide here
    /// who reads it, or the crate does not compile.
    pub const fn consumer(self) -> Consumer {
        match self {
            AuditKind::TeamTierChanged => Consumer::PropagationWiring {
                propagation_kind: "tier_elevation",
            },
            AuditKind::PropagationApplied => Consumer::CustomerNotification {
                template: "tier_change_applied",
            },
            AuditKind::PropagationRetrying => Consumer::IntentionallyNone {
                reason: "routine retry on the backoff schedule; the terminal case is \
                         propagation.dead_lettered, which pages",
            },
            AuditKind::PropagationUnexpectedSkip => Consumer::OperatorAlert {
                alert: "KeelPropagationUnexpectedSkips",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::PropagationDeadLettered => Consumer::OperatorAlert {
                alert: "KeelPropagationDeadLettered",
                severity: AlertSeverity::Page,
            },
            AuditKind::PropagationRequeued => Consumer::IntentionallyNone {
                reason: "an operator's own action; the trail records who re-armed which row",
            },
            AuditKind::PropagationEnqueued => Consumer::IntentionallyNone {
                reason: "an operator's own action; the trail records who enqueued which row, \
                         and the row's own transitions write the audit rows that are consumed",
            },
            AuditKind::ProvisionCreated => Consumer::CustomerNotification {
                template: "resource_ready",
            },
            AuditKind::ProvisionPersistenceFailed => Consumer::OperatorAlert {
                alert: "KeelProvisionPersistenceFailed",
                severity: AlertSeverity::Page,
            },
            AuditKind::ProvisionCreateFailed => Consumer::OperatorAlert {
                alert: "KeelProvisionPersistenceFailed",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::ProvisionTeardownFailed => Consumer::OperatorAlert {
                alert: "KeelProvisionTeardownFailed",
                severity: AlertSeverity::Page,
            },
            AuditKind::ProvisionReconciled => Consumer::OperatorAlert {
                alert: "KeelProvisionUncompensated",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::ResourceDeprovisioned => Consumer::CustomerNotification {
                template: "resource_deleted",
            },
            AuditKind::OrphanSweepReclaimed => Consumer::OperatorAlert {
                alert: "KeelOrphanSweepReclaimed",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::BillingChargeUndeliverable => Consumer::OperatorAlert {
                alert: "KeelBillingChargeUndeliverable",
                severity: AlertSeverity::Page,
            },
            AuditKind::RaterReconcileDeleted => Consumer::OperatorAlert {
                alert: "KeelRaterAttention",
                severity: AlertSeverity::Page,
            },
            AuditKind::RaterBackfillReconciled => Consumer::IntentionallyNone {
                reason: "an operator asked for the backfill; the row is its trail of old -> new values",
            },
            AuditKind::ResourceReclaimRefused => Consumer::OperatorAlert {
                alert: "KeelOrphanSweepFailing",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::ResourceReclaimFailed => Consumer::OperatorAlert {
                alert: "KeelProvisionTeardownFailed",
                severity: AlertSeverity::Page,
            },
            AuditKind::ApiKeyCreated => Consumer::CustomerNotification {
                template: "api_key_created",
            },
            AuditKind::ApiKeyRevoked => Consumer::CustomerNotification {
                template: "api_key_revoked",
            },
            AuditKind::ResourceCredentialsRotated => Consumer::CustomerNotification {
                template: "credentials_rotated",
            },
            AuditKind::NotificationDelivered => Consumer::IntentionallyNone {
                reason: "the delivery record itself: the trail shows which customer notification \
                         reached the webhook, under which event id",
            },
            AuditKind::NotificationRetrying => Consumer::IntentionallyNone {
                reason: "routine retry on the backoff schedule; the terminal case is \
                         notification.dead_lettered, which alerts",
            },
            AuditKind::NotificationDeadLettered => Consumer::OperatorAlert {
                alert: "KeelNotificationDeadLettered",
                severity: AlertSeverity::Ticket,
            },
            AuditKind::NotificationRequeued => Consumer::IntentionallyNone {
                reason: "an operator's own action; the trail records who requeued which \
                         notification",
            },
            AuditKind::ConsoleSignedIn => Consumer::IntentionallyNone {
                reason: "an operator's own session; the trail records which operator key \
                         opened the console and when",
            },
            AuditKind::ConsoleSignedOut => Consumer::IntentionallyNone {
                reason: "an operator's own session; the trail records when it was closed",
            },
            AuditKind::ReclaimProtected => Consumer::IntentionallyNone {
                reason: "an operator's own action; the trail records who protected which token \
                         digest and why, and the sweep reads the protection itself",
            },
            AuditKind::ReclaimUnprotected => Consumer::IntentionallyNone {
                reason: "an operator's own action; the sweep still reclaims only behind its \
                         destructive gate and burn-in, and every reclaim alerts on its own",
            },
            AuditKind::AuditPartitionExported => Consumer::IntentionallyNone {
                reason: "an operator's retention step; the trail records who exported which \
                         month and the file's digest, which the later steps check",
            },
            AuditKind::AuditPartitionVerified => Consumer::IntentionallyNone {
                reason: "an operator's retention step; detaching requires it, and the trail \
                         records it",
            },
            AuditKind::AuditPartitionDetached => Consumer::IntentionallyNone {
                reason: "an operator's retention step; verify accepts the month's absence \
                         from its retired links, and the trail records who detached it",
            },
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A wire name that is not a known [`AuditKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit kind {0:?}: expected one of the `<domain>.<event>` names in AuditKind::ALL")]
pub struct UnknownAuditKind(pub String);

impl FromStr for AuditKind {
    type Err = UnknownAuditKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AuditKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownAuditKind(s.chars().take(64).collect()))
    }
}

impl serde::Serialize for AuditKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_wire_name() {
        for &kind in AuditKind::ALL {
            assert_eq!(kind.as_str().parse::<AuditKind>(), Ok(kind), "{kind:?}");
        }
    }

    #[test]
    fn wire_names_are_unique_lower_snake_domain_dot_event() {
        let mut seen = std::collections::BTreeSet::new();
        for &kind in AuditKind::ALL {
            let name = kind.as_str();
            assert!(seen.insert(name), "duplicate wire name {name}");
            let (domain, event) = name.split_once('.').expect("domain.event");
            for part in [domain, event] {
                assert!(!part.is_empty(), "{name}");
                assert!(
                    part.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "{name} is not lower snake case"
                );
            }
        }
    }

    #[test]
    fn every_kind_declares_a_consumer_with_its_details_filled_in() {
        for &kind in AuditKind::ALL {
            match kind.consumer() {
                Consumer::CustomerNotification { template } => assert!(!template.is_empty()),
                Consumer::OperatorAlert { alert, .. } => assert!(!alert.is_empty()),
                Consumer::PropagationWiring { propagation_kind } => {
                    assert!(!propagation_kind.is_empty())
                }
                Consumer::IntentionallyNone { reason } => {
                    assert!(reason.len() > 20, "{kind}: give a real reason")
                }
            }
        }
    }

    #[test]
    fn operator_facing_failures_alert_and_never_email_the_customer() {
        // The seeds are explicit: these are internal alerts, not customer notifications.
        for kind in [
            AuditKind::ProvisionPersistenceFailed,
            AuditKind::PropagationDeadLettered,
            AuditKind::BillingChargeUndeliverable,
            AuditKind::PropagationUnexpectedSkip,
        ] {
            assert!(
                matches!(kind.consumer(), Consumer::OperatorAlert { .. }),
                "{kind} must be an operator alert"
            );
        }
    }

    #[test]
    fn the_issue_listed_kinds_exist_under_their_contract_names() {
        for name in [
            "propagation.applied",
            "propagation.retrying",
            "propagation.unexpected_skip",
            "propagation.dead_lettered",
            "propagation.requeued",
            "provision.created",
            "provision.persistence_failed",
            "resource.deprovisioned",
            "orphan_sweep.reclaimed",
            "billing.charge_undeliverable",
            "rater.reconcile_deleted",
        ] {
            assert!(name.parse::<AuditKind>().is_ok(), "{name} missing");
        }
    }

    /// RATER-L3: one kind declared Page for every deletion, backfills included.
    #[test]
    fn a_backfill_reconciliation_never_pages_and_a_routine_loss_does() {
        assert!(matches!(
            AuditKind::RaterReconcileDeleted.consumer(),
            Consumer::OperatorAlert {
                severity: AlertSeverity::Page,
                ..
            }
        ));
        assert!(!matches!(
            AuditKind::RaterBackfillReconciled.consumer(),
            Consumer::OperatorAlert {
                severity: AlertSeverity::Page,
                ..
            }
        ));
        assert_eq!(
            "rater.backfill_reconciled".parse::<AuditKind>().ok(),
            Some(AuditKind::RaterBackfillReconciled)
        );
    }

    #[test]
    fn unknown_names_are_rejected_not_guessed() {
        for bad in [
            "",
            "propagation",
            "propagation.Applied",
            "propagation.applied ",
            "x.y",
        ] {
            assert!(bad.parse::<AuditKind>().is_err(), "{bad:?}");
        }
    }
}
