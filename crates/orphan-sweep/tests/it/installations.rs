//! Two installations (two platform databases) sharing one Postgres cluster, both sweeps armed
//! with permissive caps, over many ticks: neither reclaims the other's objects (live, pending or
//! orphaned), each reclaims exactly its own orphans, and each audit table holds exactly one
//! `orphan_sweep.reclaimed` row per destroyed object, naming it by fingerprint.

use std::collections::HashSet;

use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{AuditKind, ResourceType, TeamId};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens, PgSweepState};
use keel_orphan_sweep::{Action, FingerprintKey, SweepMetrics, Sweeper, TickReport};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore, installation_id};
use keel_provision::{BackendName, ProvisionMetrics, Provisioner};
use keel_testkit::TestDatabase;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use super::{PgProvisioner, Scoped, dead, next_period, quick, request};

pub(crate) struct Installation {
    db: TestDatabase,
    provisioner: PgProvisioner,
    live: BackendName,
    pending: BackendName,
    orphans: Vec<BackendName>,
}

async fn installation() -> Installation {
    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let id = installation_id(db.pool()).await.unwrap();
    let provisioner = Provisioner::new(
        PgResourceStore::new(db.pool().clone()),
        PgClusterBackend::new(db.server().admin_options(), None, 4).with_installation(id),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let now = OffsetDateTime::now_utc();
    let live = provisioner.provision(request(team), now).await.unwrap();
    let live = BackendName::for_resource(ResourceType::Postgres, live.token());
    // Pending: reserved and created, never finalized (a provisioning still running).
    let reservation = provisioner.reserve(request(team), now).await.unwrap();
    let pending = reservation.backend_name().clone();
    let created = provisioner.create(reservation, now).await.unwrap();
    drop(created);
    let mut orphans = Vec::new();
    for _ in 0..3 {
        orphans.push(dead(&provisioner, db.pool(), team).await);
    }
    Installation {
        db,
        provisioner,
        live,
        pending,
        orphans,
    }
}

impl Installation {
    fn names(&self) -> Vec<&BackendName> {
        let mut names = vec![&self.live, &self.pending];
        names.extend(&self.orphans);
        names
    }

    async fn exists(&self, name: &BackendName) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name.expose())
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }
}

fn sweeper<'a>(
    i: &'a Installation,
    everything: &HashSet<String>,
) -> Sweeper<Scoped, PgLiveTokens, &'a PgProvisioner, PgSweepState> {
    Sweeper::new(
        Scoped {
            inner: PgDatabaseInventory::new(i.provisioner.backend().admin_pool().clone()),
            names: everything.clone(),
        },
        PgLiveTokens::new(i.db.pool().clone()),
        Some(&i.provisioner),
        PgSweepState::new(i.db.pool().clone(), "it"),
        quick(true, true),
        SweepMetrics::register(&mut Registry::default()),
        FingerprintKey::new(*b"integration-test-key").unwrap(),
    )
}

#[tokio::test]
async fn two_installations_on_one_cluster_never_reclaim_each_others_objects() {
    let prod = installation().await;
    let staging = installation().await;
    assert_ne!(
        installation_id(prod.db.pool()).await.unwrap(),
        installation_id(staging.db.pool()).await.unwrap()
    );
    let everything: HashSet<String> = prod
        .names()
        .into_iter()
        .chain(staging.names())
        .map(|name| name.expose().to_owned())
        .collect();
    let mut sweeps = [sweeper(&prod, &everything), sweeper(&staging, &everything)];
    next_period().await;
    for _ in 0..5 {
        for (i, sweep) in sweeps.iter_mut().enumerate() {
            let report = sweep.tick(OffsetDateTime::now_utc()).await;
            let TickReport::Swept { candidates, .. } = &report else {
                panic!("installation {i}: {report:?}");
            };
            let theirs = if i == 0 { &staging } else { &prod };
            for candidate in candidates {
                let foreign = theirs
                    .names()
                    .iter()
                    .any(|name| name.masked() == candidate.name_masked);
                if foreign {
                    assert!(!candidate.would_reclaim, "{candidate:?}");
                    assert_ne!(candidate.action, Action::Reclaimed);
                }
            }
        }
        next_period().await;
    }
    for (mine, theirs) in [(&prod, &staging), (&staging, &prod)] {
        for orphan in &mine.orphans {
            assert!(!mine.exists(orphan).await, "its own orphan is reclaimed");
        }
        for name in theirs.names() {
            if !theirs.orphans.contains(name) {
                assert!(
                    mine.exists(name).await,
                    "the other's live or pending object is kept"
                );
            }
        }
        assert!(mine.exists(&mine.live).await && mine.exists(&mine.pending).await);
        let mut conn = mine.db.pool().acquire().await.unwrap();
        let rows = fetch(
            &mut conn,
            &AuditFilter {
                kind: Some(AuditKind::OrphanSweepReclaimed),
                ..AuditFilter::default()
            },
        )
        .await
        .unwrap();
        let mut fingerprints: Vec<String> = rows
            .iter()
            .map(|row| {
                row.event
                    .attributes()
                    .get("token_fingerprint")
                    .unwrap()
                    .to_owned()
            })
            .collect();
        fingerprints.sort();
        let mut expected: Vec<String> = mine
            .orphans
            .iter()
            .map(|name| name.digest().fingerprint())
            .collect();
        expected.sort();
        assert_eq!(
            fingerprints, expected,
            "exactly one row per destroyed object"
        );
    }
}
