//! The orphan-sweep act: orphan databases left on the local Postgres show up as masked
//! candidates in audit-only mode, each with what would block its reclaim; with both gates on,
//! this installation's confirmed orphan is reclaimed through the chokepoint (with its audit row
//! naming it by fingerprint), while a protected one and another installation's one are not.

use anyhow::{Context, ensure};
use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{AuditKind, ResourceType, Tier};
use keel_orphan_sweep::postgres::PgDatabaseInventory;
use keel_orphan_sweep::postgres::PgLiveTokens;
use keel_orphan_sweep::{
    Action, FingerprintKey, MemoryState, SweepConfig, SweepMetrics, Sweeper, TickReport,
};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore, installation_id};
use keel_provision::{
    Backend as _, BackendName, InstallationId, ProvisionMetrics, Provisioner, new_token,
};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::step;

fn print(report: &TickReport) -> Vec<Action> {
    match report {
        TickReport::Swept {
            period,
            inventory,
            armed,
            candidates,
        } => {
            println!(
                "period {period}: inventory {inventory} customer databases; reclaim arm armed: {armed}"
            );
            for c in candidates {
                println!(
                    "  candidate {:<18} kind={:<17} fp={} seen={} would_reclaim={:<5} blocked_by={:<20} → {:?}",
                    c.name_masked,
                    c.kind,
                    c.fingerprint.as_deref().unwrap_or("-"),
                    c.seen_ticks,
                    c.would_reclaim,
                    c.blocked_by.map_or("-", |b| b.as_str()),
                    c.action
                );
            }
            candidates.iter().map(|c| c.action).collect()
        }
        TickReport::Disabled | TickReport::Skipped { .. } | TickReport::Failed { .. } => {
            println!("tick: {report:?}");
            Vec::new()
        }
    }
}

/// A database for a new token whose resource row (in the platform database behind `pool`) is
/// already deleted: an orphan this installation owns.
async fn owned_orphan(pool: &PgPool, backend: &PgClusterBackend) -> anyhow::Result<BackendName> {
    let token = new_token();
    let team: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
    )
    .fetch_one(pool)
    .await?;
    let name = BackendName::for_resource(ResourceType::Postgres, &token);
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, deleted_at) \
         VALUES (gen_random_uuid(), $1, $2, 'postgres', 'pro', 'deleted', now())",
    )
    .bind(token.expose())
    .bind(team)
    .execute(pool)
    .await?;
    backend.create(&name, &Tier::parse("pro")?).await?;
    Ok(name)
}

/// Runs the orphan-sweep act on `pool`, sweeping the customer databases on `server`.
pub async fn orphan_sweep(server: &PgServer, pool: &PgPool) -> anyhow::Result<()> {
    step("Orphan sweep: orphan databases on the shared cluster, audit-only by default");
    let ours = installation_id(pool).await?;
    let backend = PgClusterBackend::new(server.admin_options(), None, 2).with_installation(ours);
    let orphan = owned_orphan(pool, &backend).await?;
    let protected = owned_orphan(pool, &backend).await?;
    // Another installation (say staging) on the same cluster: its database carries its own
    // stamp, and this platform database has no row for it.
    let staging = InstallationId::from_uuid(uuid::Uuid::from_u128(0x0053_5441_4749_4e47));
    let foreign = BackendName::for_resource(ResourceType::Postgres, &new_token());
    PgClusterBackend::new(server.admin_options(), None, 1)
        .with_installation(staging)
        .create(&foreign, &Tier::parse("pro")?)
        .await?;
    sqlx::query(
        "INSERT INTO reclaim_protections (token_digest, reason, protected_by) \
         VALUES ($1, 'kept for an investigation', 'operator:demo')",
    )
    .bind(protected.digest().as_str())
    .execute(pool)
    .await?;
    println!(
        "installation {ours}: orphans {orphan} and {protected} (protected by the platform); \
         {foreign} belongs to installation {staging}"
    );
    // The state keeps hourly periods in memory here; the binary keeps them in the platform
    // database. Two hours on: past the one-hour grace window.
    let hour = time::Duration::hours(1);
    let later = OffsetDateTime::now_utc() + 2 * hour;
    let key = FingerprintKey::new(*b"demo-fingerprint-key")?;
    let inventory = || PgDatabaseInventory::new(backend.admin_pool().clone());
    let mut audit_only = Sweeper::new(
        inventory(),
        PgLiveTokens::new(pool.clone()),
        None::<Provisioner<PgResourceStore, PgClusterBackend>>,
        MemoryState::new(),
        SweepConfig {
            enabled: true,
            ..SweepConfig::default()
        },
        SweepMetrics::register(&mut Registry::default()),
        key.clone(),
    );
    let actions = print(&audit_only.tick(later).await);
    ensure!(
        actions.len() >= 3 && actions.iter().all(|a| *a == Action::Reported),
        "audit-only must report them and touch none"
    );
    for name in [&orphan, &protected, &foreign] {
        ensure!(backend.exists(name).await?);
    }
    println!("audit-only: nothing dropped");

    step(
        "Orphan sweep: both gates on; burned in over 3 hourly periods, reclaimed through the chokepoint",
    );
    let chokepoint = Provisioner::new(
        PgResourceStore::new(pool.clone()),
        PgClusterBackend::new(server.admin_options(), None, 2),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let mut armed = Sweeper::new(
        inventory(),
        PgLiveTokens::new(pool.clone()),
        Some(chokepoint),
        MemoryState::new(),
        SweepConfig {
            enabled: true,
            destructive: true,
            max_fraction: 1.0,
            ..SweepConfig::default()
        },
        SweepMetrics::register(&mut Registry::default()),
        key,
    );
    let mut last = Vec::new();
    for n in 0..3 {
        last = print(&armed.tick(later + hour * n).await);
    }
    ensure!(
        last.contains(&Action::Reclaimed),
        "the third period must reclaim the orphan"
    );
    let left = [
        backend.exists(&orphan).await?,
        backend.exists(&protected).await?,
        backend.exists(&foreign).await?,
    ];
    println!(
        "orphan still there: {}; protected still there: {}; other installation's still there: {}",
        left[0], left[1], left[2]
    );
    ensure!(left == [false, true, true]);
    let mut conn = pool.acquire().await?;
    let rows = fetch(
        &mut conn,
        &AuditFilter {
            kind: Some(AuditKind::OrphanSweepReclaimed),
            ..AuditFilter::default()
        },
    )
    .await?;
    let row = rows
        .iter()
        .find(|s| {
            s.event.attributes().get("token_fingerprint")
                == Some(orphan.digest().fingerprint().as_str())
        })
        .context("no orphan_sweep.reclaimed row for the reclaim")?;
    let attrs: Vec<String> = row
        .event
        .attributes()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "audit orphan_sweep.reclaimed actor={} {}",
        row.event.actor(),
        attrs.join(" ")
    );
    Ok(())
}
