//! The orphan reclaim through the deprovision chokepoint, against real Postgres: installation
//! identity and ownership re-checked on a fresh read, refusable checks before any audit row,
//! and each object audited once per outcome, named by its token fingerprint.

use keel_audit::{Actor, AuditKind, RequestId, ResourceType};
use keel_provision::fault::{BackendStep, FaultyBackend, FaultyStore};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore, installation_id};
use keel_provision::{
    Backend as _, BackendName, DeprovisionCause, DeprovisionError, DeprovisionReason,
    DeprovisionTarget, Deprovisioned, INSTALLATION_LABEL, InstallationId, ProvisionMetrics,
    Provisioner, ReclaimRefusal,
};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use super::{Harness, NOW, harness};

fn reclaim() -> DeprovisionCause {
    DeprovisionCause {
        reason: DeprovisionReason::Orphan,
        actor: Actor::parse("keel-orphan-sweep").unwrap(),
        request_id: Some(RequestId::parse("req-sweep").unwrap()),
    }
}

/// A provisioned database whose row is then deleted: an orphan this installation owns.
async fn dead_orphan(h: &Harness) -> (BackendName, keel_audit::ResourceId) {
    let dead = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let name = BackendName::for_resource(ResourceType::Postgres, dead.token());
    sqlx::query("UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(dead.id().as_uuid())
        .execute(h.db.pool())
        .await
        .unwrap();
    (name, dead.id())
}

/// Asks the chokepoint `times` times to reclaim `name` and asserts each answer is the refusal
/// `expected`.
async fn refused_each_time(
    h: &Harness,
    name: &BackendName,
    times: usize,
    expected: ReclaimRefusal,
) {
    for _ in 0..times {
        let err = h
            .provisioner
            .deprovision(DeprovisionTarget::Orphan(name.clone()), &reclaim(), NOW)
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeprovisionError::Refused(refusal) if refusal == expected),
            "{err}"
        );
    }
}

async fn set_comment(h: &Harness, name: &BackendName, json: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "COMMENT ON DATABASE \"{}\" IS '{json}'",
        name.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
}

async fn orphan_rows(h: &Harness, kind: AuditKind) -> usize {
    h.audit().await.iter().filter(|e| e.kind() == kind).count()
}

/// SWEEP-1: an object stamped by another installation is refused by the chokepoint itself,
/// even when this installation has a row for its token; nothing is deprovisioned.
#[tokio::test]
async fn an_object_of_another_installation_is_never_reclaimed() {
    let h = harness().await;
    let (name, _) = dead_orphan(&h).await;
    let theirs = InstallationId::from_uuid(uuid::Uuid::from_u128(0x0057_4741_4749_4e47));
    set_comment(
        &h,
        &name,
        &format!(
            "{{\"labels\":{{\"app.kubernetes.io/managed-by\":\"keel\",\"{INSTALLATION_LABEL}\":\"{theirs}\"}}}}"
        ),
    )
    .await;
    refused_each_time(&h, &name, 3, ReclaimRefusal::ForeignInstallation).await;
    assert!(h.object_exists(&name).await);
    assert_eq!(orphan_rows(&h, AuditKind::OrphanSweepReclaimed).await, 0);
    assert_eq!(
        orphan_rows(&h, AuditKind::ResourceReclaimRefused).await,
        1,
        "a refusal is audited once per object and reason"
    );
}

/// SWEEP-1: a database this installation has no row for (another installation's, or made by
/// hand) is never reclaimed, whatever its labels say.
#[tokio::test]
async fn an_object_without_an_owning_row_is_never_reclaimed() {
    let h = harness().await;
    let stranger = BackendName::for_resource(ResourceType::Postgres, &keel_provision::new_token());
    h.provisioner
        .backend()
        .inner()
        .create(&stranger, &keel_audit::Tier::parse("pro").unwrap())
        .await
        .unwrap();
    refused_each_time(&h, &stranger, 1, ReclaimRefusal::Unowned).await;
    assert!(h.object_exists(&stranger).await);
    assert_eq!(orphan_rows(&h, AuditKind::OrphanSweepReclaimed).await, 0);
}

/// SWEEP-2: a teardown the backend would refuse (a database not owned by its customer role) is
/// refused before any audit row: no `resource.deprovisioned`, one `resource.reclaim_refused`
/// however often it is asked, and no deprovision counted.
#[tokio::test]
async fn a_refused_teardown_writes_no_deprovisioned_row() {
    let h = harness().await;
    let (name, _) = dead_orphan(&h).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" OWNER TO CURRENT_USER",
        name.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
    refused_each_time(&h, &name, 8, ReclaimRefusal::NotPlatformMade).await;
    assert!(h.object_exists(&name).await);
    assert_eq!(orphan_rows(&h, AuditKind::OrphanSweepReclaimed).await, 0);
    assert_eq!(orphan_rows(&h, AuditKind::ResourceReclaimRefused).await, 1);
}

fn deprovisions(registry: &Registry) -> u64 {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|line| {
            line.starts_with("instant_provision_deprovisions_total{")
                && line.contains("reason=\"orphan\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// SWEEP-2: the deprovision metric counts completed teardowns; a teardown that fails is
/// recorded once as `resource.reclaim_failed` and the deprovision row is not written twice when
/// the reclaim is retried.
#[tokio::test]
async fn the_deprovision_metric_counts_completed_teardowns() {
    let h = harness().await;
    let mut registry = Registry::default();
    let provisioner = Provisioner::new(
        FaultyStore::new(PgResourceStore::new(h.db.pool().clone())),
        FaultyBackend::new(PgClusterBackend::new(
            h.db.server().admin_options(),
            None,
            2,
        )),
        ProvisionMetrics::register(&mut registry),
    );
    let (name, id) = dead_orphan(&h).await;
    provisioner.backend().fail(BackendStep::Teardown, 2);
    for _ in 0..2 {
        let err = provisioner
            .deprovision(DeprovisionTarget::Orphan(name.clone()), &reclaim(), NOW)
            .await
            .unwrap_err();
        assert!(matches!(err, DeprovisionError::Teardown(_)), "{err}");
        assert_eq!(deprovisions(&registry), 0, "nothing was torn down yet");
    }
    assert!(h.object_exists(&name).await);
    assert_eq!(orphan_rows(&h, AuditKind::ResourceReclaimFailed).await, 1);
    let done = provisioner
        .deprovision(DeprovisionTarget::Orphan(name.clone()), &reclaim(), NOW)
        .await
        .unwrap();
    assert_eq!(done, Deprovisioned::OrphanReclaimed);
    assert!(!h.object_exists(&name).await);
    assert_eq!(deprovisions(&registry), 1);
    // SWEEP-8: exactly one deprovision row, naming the object by its token fingerprint and
    // linked to the terminal row's team and resource.
    let rows: Vec<_> = h
        .audit()
        .await
        .into_iter()
        .filter(|e| e.kind() == AuditKind::OrphanSweepReclaimed)
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].attributes().get("token_fingerprint"),
        Some(name.digest().fingerprint().as_str())
    );
    assert_eq!(rows[0].resource_id(), Some(id));
    assert_eq!(rows[0].team_id(), Some(h.team));
}

/// SWEEP-9: the chokepoint re-reads protection (the platform's table, and the object's own mark
/// whatever its spelling) immediately before the teardown, not only in the sweep.
#[tokio::test]
async fn the_chokepoint_rechecks_protection_and_ownership_before_teardown() {
    let h = harness().await;
    let (by_platform, _) = dead_orphan(&h).await;
    sqlx::query(
        "INSERT INTO reclaim_protections (token_digest, reason, protected_by) VALUES ($1, 'legal hold', 'operator:ana')",
    )
    .bind(by_platform.digest().as_str())
    .execute(h.db.pool())
    .await
    .unwrap();
    let (by_mark, _) = dead_orphan(&h).await;
    set_comment(
        &h,
        &by_mark,
        "{\"labels\":{\"app.kubernetes.io/managed-by\":\"keel\"},\"annotations\":{\"keel.dev/protect\":\"yes\"}}",
    )
    .await;
    for name in [&by_platform, &by_mark] {
        refused_each_time(&h, name, 1, ReclaimRefusal::Protected).await;
        assert!(h.object_exists(name).await);
    }
    assert_eq!(orphan_rows(&h, AuditKind::OrphanSweepReclaimed).await, 0);
}

/// SWEEP-13: a terminal status never turns live again, so a token the chokepoint found dead
/// stays dead until its teardown.
#[tokio::test]
async fn a_dead_token_never_turns_live_again() {
    let h = harness().await;
    let (_, id) = dead_orphan(&h).await;
    for status in ["active", "pending", "suspended", "failed"] {
        let err = sqlx::query("UPDATE resources SET status = $2 WHERE id = $1")
            .bind(id.as_uuid())
            .bind(status)
            .execute(h.db.pool())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never changes status"), "{err}");
    }
}

/// Installation identity: one id per platform database, stamped on every database the backend
/// creates.
#[tokio::test]
async fn provisioning_stamps_the_installation_on_every_database() {
    let h = harness().await;
    let ours = installation_id(h.db.pool()).await.unwrap();
    assert_eq!(
        installation_id(h.db.pool()).await.unwrap(),
        ours,
        "created once"
    );
    let backend =
        PgClusterBackend::new(h.db.server().admin_options(), None, 2).with_installation(ours);
    let name = BackendName::for_resource(ResourceType::Postgres, &keel_provision::new_token());
    backend
        .create(&name, &keel_audit::Tier::parse("pro").unwrap())
        .await
        .unwrap();
    let comment: String = sqlx::query_scalar(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
    )
    .bind(name.expose())
    .fetch_one(h.db.pool())
    .await
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&comment).unwrap();
    assert_eq!(
        doc["labels"][INSTALLATION_LABEL].as_str(),
        Some(ours.to_string().as_str())
    );
    let err = sqlx::query("UPDATE keel_installation SET id = gen_random_uuid()")
        .execute(h.db.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("written once"), "{err}");
}

/// An object made again under a reclaimed object's name (an operator's restore, a re-applied
/// manifest) is another object: its reclaim is audited again, never taken for a retry of the
/// first one and torn down without a row. Each row names its incarnation (`object_id`).
#[tokio::test]
async fn an_object_made_again_under_a_reclaimed_name_is_audited_again() {
    let h = harness().await;
    let (name, _) = dead_orphan(&h).await;
    let reclaim_once = async || {
        let done = h
            .provisioner
            .deprovision(DeprovisionTarget::Orphan(name.clone()), &reclaim(), NOW)
            .await
            .unwrap();
        assert_eq!(done, Deprovisioned::OrphanReclaimed);
        assert!(!h.object_exists(&name).await);
    };
    reclaim_once().await;
    h.provisioner
        .backend()
        .inner()
        .create(&name, &keel_audit::Tier::parse("pro").unwrap())
        .await
        .unwrap();
    reclaim_once().await;
    let incarnations: Vec<Option<String>> = h
        .audit()
        .await
        .into_iter()
        .filter(|e| e.kind() == AuditKind::OrphanSweepReclaimed)
        .map(|e| e.attributes().get("object_id").map(str::to_owned))
        .collect();
    assert_eq!(incarnations.len(), 2, "{incarnations:?}");
    assert!(incarnations.iter().all(Option::is_some), "{incarnations:?}");
    assert_ne!(incarnations[0], incarnations[1]);
}
