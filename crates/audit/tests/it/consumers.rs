//! Declared consumers that exist (FND-3, FND-4): every operator alert a kind names is a rule in
//! `deploy/`, every kind is written by production code or listed as planned, and every
//! customer notification without a dispatcher says so.

use std::path::{Path, PathBuf};

use keel_audit::{AuditKind, Consumer};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn alert_names(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// FND-3: an `OperatorAlert` consumer names a Prometheus alert that exists in the shipped rules
/// (and in the PrometheusRule the cluster loads), unless the kind itself is only planned.
#[test]
fn every_operator_alert_kind_has_a_rule() {
    let files = [
        "deploy/prometheus/rules.yaml",
        "deploy/monitoring/prometheusrule.yaml",
    ];
    for file in files {
        let alerts = alert_names(file);
        assert!(!alerts.is_empty(), "{file} has no alerts");
        for &kind in AuditKind::ALL {
            let Consumer::OperatorAlert { alert, .. } = kind.consumer() else {
                continue;
            };
            if kind.planned().is_some() {
                continue;
            }
            assert!(
                alerts.iter().any(|a| a == alert),
                "{kind} declares the operator alert {alert}, which {file} does not have"
            );
        }
    }
}

fn production_sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            production_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            // Inline test modules sit at the end of a file by this workspace's convention.
            let production = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
            out.push((path, production));
        }
    }
}

fn is_written_in(kind: AuditKind, sources: &[(PathBuf, String)]) -> bool {
    let token = format!("AuditKind::{kind:?}");
    sources.iter().any(|(path, text)| {
        !path.ends_with("crates/audit/src/kind.rs")
            && text.match_indices(&token).any(|(at, _)| {
                !text[at + token.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            })
    })
}

/// FND-3, FND-4: every kind is written somewhere outside tests (the `src` of a crate or
/// binary, test modules excluded), or is listed in `AuditKind::PLANNED` with what is missing;
/// a planned kind that production code now writes must leave the list.
#[test]
fn every_kind_is_produced_outside_tests_or_planned() {
    let root = workspace_root();
    let mut sources = Vec::new();
    for group in ["crates", "bins"] {
        for member in std::fs::read_dir(root.join(group)).unwrap().flatten() {
            let name = member.file_name();
            if name == "testkit" || name == "provision-compile-tests" {
                continue;
            }
            production_sources(&member.path().join("src"), &mut sources);
        }
    }
    assert!(
        sources.len() > 10,
        "found only {} source files",
        sources.len()
    );
    for &kind in AuditKind::ALL {
        let written = is_written_in(kind, &sources);
        match kind.planned() {
            None => assert!(
                written,
                "{kind} is never written outside tests: write it, or list it in \
                 AuditKind::PLANNED with what is missing"
            ),
            Some(why) => assert!(
                !written,
                "{kind} is listed as planned ({why}) but production code writes it now: remove \
                 it from AuditKind::PLANNED"
            ),
        }
    }
}

/// FND-3: a customer notification is delivered by the notification dispatcher
/// (`keel_audit::notify::DISPATCHED_KINDS`) or declared planned in
/// `AuditKind::PLANNED_CONSUMERS`, never both; the dispatcher delivers customer kinds only; and
/// the planned lists name only kinds whose consumer they describe.
#[test]
fn customer_notifications_are_dispatched_or_declared_planned() {
    for &kind in AuditKind::ALL {
        let planned = AuditKind::PLANNED_CONSUMERS.iter().any(|(k, _)| *k == kind);
        let dispatched = keel_audit::notify::DISPATCHED_KINDS.contains(&kind);
        if let Consumer::CustomerNotification { template } = kind.consumer() {
            assert!(
                planned != dispatched,
                "{kind} declares the customer notification {template}: the dispatcher must \
                 deliver it (notify::DISPATCHED_KINDS) or AuditKind::PLANNED_CONSUMERS must say \
                 what is missing, not both"
            );
        } else {
            assert!(!dispatched, "{kind} is not a customer notification");
        }
    }
    for (kind, why) in AuditKind::PLANNED_CONSUMERS
        .iter()
        .chain(AuditKind::PLANNED.iter())
    {
        assert!(why.len() > 20, "{kind}: say what is missing");
    }
}

/// FND-4: the kind meant for orphan reclaims is an operator ticket, never a customer
/// notification (a reclaimed orphan has no customer to tell).
#[test]
fn orphan_reclaims_have_an_operator_kind_of_their_own() {
    assert!(matches!(
        AuditKind::OrphanSweepReclaimed.consumer(),
        Consumer::OperatorAlert {
            alert: "KeelOrphanSweepReclaimed",
            ..
        }
    ));
    assert_ne!(
        AuditKind::OrphanSweepReclaimed.consumer(),
        AuditKind::ResourceDeprovisioned.consumer()
    );
}
