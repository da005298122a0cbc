//! The fault matrix: a failure injected before and after each step of reserve → create →
//! finalize (and of the compensation's own steps) and of deprovision, against real Postgres.
//! After each: no `active` row without its backend object; no backend object without a row
//! naming it, other than an audited teardown failure or a row still `pending` for the
//! reconciler; exactly the audit rows that match what happened; and a truthful envelope. (The
//! SIGTERM variant is `shutdown_waits_for_in_flight_provisioning` in the API's tests.)

use keel_audit::{Actor, AuditKind, RequestId};
use keel_provision::fault::{BackendStep, StoreStep, When};
use keel_provision::{
    DeprovisionCause, DeprovisionReason, DeprovisionTarget, Deprovisioned, ErrorCode,
};

use super::{Harness, NOW, harness};

#[derive(Clone, Copy, Debug)]
enum Fault {
    Store(StoreStep, When, usize),
    Backend(BackendStep, When, usize),
}

impl Fault {
    fn arm(self, h: &Harness) {
        match self {
            Self::Store(step, when, times) => h.provisioner.store().fail_at(step, when, times),
            Self::Backend(step, when, times) => h.provisioner.backend().fail_at(step, when, times),
        }
    }
}

/// What a provisioning under `faults` must end with.
struct Expect {
    /// `None`: the resource is provisioned (201); otherwise the error code.
    code: Option<ErrorCode>,
    /// The row's status (`None`: no row).
    status: Option<&'static str>,
    /// Whether the database exists afterwards.
    object: bool,
    /// The audit kinds, in order.
    audit: &'static [AuditKind],
}

fn cases() -> Vec<(&'static str, Vec<Fault>, Expect)> {
    use AuditKind::{
        ProvisionCreateFailed as CreateFailed, ProvisionCreated as Created,
        ProvisionPersistenceFailed as PersistenceFailed, ProvisionTeardownFailed as TeardownFailed,
    };
    use BackendStep::{Create, Teardown};
    use StoreStep::{Abandon, Activate, Reserve};
    use When::{After, Before};
    let b = Fault::Backend;
    let s = Fault::Store;
    vec![
        (
            "reserve before",
            vec![s(Reserve, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: None,
                object: false,
                audit: &[],
            },
        ),
        (
            // The row committed, its reply was lost: the flow marks that id failed at once,
            // audited; nothing was created.
            "reserve after",
            vec![s(Reserve, After, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("failed"),
                object: false,
                audit: &[AuditKind::ProvisionReconciled],
            },
        ),
        (
            // ... and when that flip fails too, the pending row with no object is left for
            // the reconciler; nothing was created.
            "reserve after, abandon before",
            vec![s(Reserve, After, 1), s(Abandon, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("pending"),
                object: false,
                audit: &[],
            },
        ),
        (
            "create before",
            vec![b(Create, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("failed"),
                object: false,
                audit: &[CreateFailed],
            },
        ),
        (
            "create after",
            vec![b(Create, After, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("failed"),
                object: false,
                audit: &[CreateFailed],
            },
        ),
        (
            "finalize before",
            vec![s(Activate, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("failed"),
                object: false,
                audit: &[PersistenceFailed],
            },
        ),
        (
            "finalize after (ambiguous commit)",
            vec![s(Activate, After, 1)],
            Expect {
                code: None,
                status: Some("active"),
                object: true,
                audit: &[Created],
            },
        ),
        (
            "compensation flip before",
            vec![s(Activate, Before, 1), s(Abandon, Before, 2)],
            Expect {
                code: Some(ErrorCode::ProvisionIncomplete),
                status: Some("pending"),
                object: true,
                audit: &[],
            },
        ),
        (
            // The flip committed, its reply was lost: the retry finds the row failed.
            "compensation flip after",
            vec![s(Activate, Before, 1), s(Abandon, After, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionFailed),
                status: Some("failed"),
                object: false,
                audit: &[PersistenceFailed],
            },
        ),
        (
            "compensation teardown before",
            vec![s(Activate, Before, 1), b(Teardown, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionIncomplete),
                status: Some("failed"),
                object: true,
                audit: &[PersistenceFailed, TeardownFailed],
            },
        ),
        (
            // The teardown happened but was reported failed: recorded as a failure (the
            // platform cannot know better), and the object is in fact gone.
            "compensation teardown after",
            vec![s(Activate, Before, 1), b(Teardown, After, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionIncomplete),
                status: Some("failed"),
                object: false,
                audit: &[PersistenceFailed, TeardownFailed],
            },
        ),
        (
            "create fails and its teardown too",
            vec![b(Create, After, 1), b(Teardown, Before, 1)],
            Expect {
                code: Some(ErrorCode::ProvisionIncomplete),
                status: Some("failed"),
                object: true,
                audit: &[CreateFailed, TeardownFailed],
            },
        ),
    ]
}

#[tokio::test]
async fn every_provisioning_fault_before_or_after_each_step_leaves_a_consistent_truthful_state() {
    for (name, faults, expect) in cases() {
        let h = harness().await;
        for fault in &faults {
            fault.arm(&h);
        }
        let result = h.provisioner.provision(h.request(), NOW).await;
        match (&result, expect.code) {
            (Ok(_), None) => {}
            (Err(e), Some(code)) => {
                assert_eq!(e.code(), code, "{name}: {e}");
                let clean = code == ErrorCode::ProvisionFailed;
                assert_eq!(
                    code.agent_action(
                        &keel_provision::DocsBase::parse("https://d.test/e").unwrap()
                    )
                    .contains("nothing was left behind"),
                    clean,
                    "{name}: the action matches the outcome"
                );
            }
            (Ok(_), Some(code)) => panic!("{name}: provisioned, expected {code}"),
            (Err(e), None) => panic!("{name}: expected a resource, got {e}"),
        }
        let rows = h.rows().await;
        assert_eq!(
            rows.first().map(|r| r.status.as_str()),
            expect.status,
            "{name}"
        );
        if let Some(row) = rows.first() {
            assert_eq!(h.object_exists(&row.name).await, expect.object, "{name}");
        }
        assert_eq!(h.audit_kinds().await, expect.audit, "{name}");
        h.assert_invariants().await;
    }
}

fn cause() -> DeprovisionCause {
    DeprovisionCause {
        reason: DeprovisionReason::CustomerRequest,
        actor: Actor::parse("agent:matrix").unwrap(),
        request_id: Some(RequestId::parse("req-matrix").unwrap()),
    }
}

#[tokio::test]
async fn every_deprovision_fault_before_or_after_each_step_is_audited_and_finished_by_a_retry() {
    use BackendStep::{Protected, Teardown};
    use StoreStep::{Get, Retire};
    use When::{After, Before};
    let cases = [
        (Fault::Store(Get, Before, 1), false),
        (Fault::Store(Get, After, 1), false),
        (Fault::Backend(Protected, Before, 1), false),
        (Fault::Backend(Protected, After, 1), false),
        (Fault::Store(Retire, Before, 1), false),
        // Retired and audited, reply lost: nothing torn down yet.
        (Fault::Store(Retire, After, 1), true),
        (Fault::Backend(Teardown, Before, 1), true),
        (Fault::Backend(Teardown, After, 1), true),
    ];
    for (fault, audited_first) in cases {
        let h = harness().await;
        let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
        let target = DeprovisionTarget::Resource(provisioned.id());
        fault.arm(&h);
        let err = h
            .provisioner
            .deprovision(target.clone(), &cause(), NOW)
            .await
            .expect_err("the injected fault fails the deprovision");
        assert_eq!(
            err.code(),
            ErrorCode::BackendUnavailable,
            "{fault:?}: {err}"
        );
        let rows = h.rows().await;
        let deprovisioned = h
            .audit_kinds()
            .await
            .iter()
            .filter(|k| **k == AuditKind::ResourceDeprovisioned)
            .count();
        assert_eq!(deprovisioned, usize::from(audited_first), "{fault:?}");
        if !audited_first {
            assert_eq!(rows[0].status, "active", "{fault:?}: nothing touched");
            assert!(h.object_exists(&rows[0].name).await, "{fault:?}");
        } else {
            assert_eq!(rows[0].status, "deleted", "{fault:?}");
        }
        h.assert_invariants().await;
        // A retry finishes it, and audits it exactly once in all.
        let again = h
            .provisioner
            .deprovision(target, &cause(), NOW)
            .await
            .unwrap();
        let expected = if audited_first {
            Deprovisioned::AlreadyRetired
        } else {
            Deprovisioned::Retired
        };
        assert_eq!(again, expected, "{fault:?}");
        assert!(!h.object_exists(&rows[0].name).await, "{fault:?}");
        assert_eq!(
            h.audit_kinds().await,
            [
                AuditKind::ProvisionCreated,
                AuditKind::ResourceDeprovisioned
            ],
            "{fault:?}"
        );
        h.assert_invariants().await;
    }
}
