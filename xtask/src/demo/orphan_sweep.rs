//! The orphan-sweep act: orphan databases left on the local Postgres show up as masked
//! candidates in audit-only mode; with both gates on, one is reclaimed through the chokepoint
//! (with its audit row) and a protected one is not.

use anyhow::{Context, ensure};
use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{AuditKind, ResourceType, Tier};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens};
use keel_orphan_sweep::{Action, FingerprintKey, SweepConfig, SweepMetrics, Sweeper, TickReport};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{Backend as _, BackendName, ProvisionMetrics, Provisioner, new_token};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::step;

fn print(report: &TickReport) -> Vec<Action> {
    match report {
        TickReport::Swept {
            inventory,
            armed,
            candidates,
        } => {
            println!("inventory: {inventory} customer databases; reclaim arm armed: {armed}");
            for c in candidates {
                println!(
                    "  candidate {:<18} kind={:<17} fp={} protected={:<5} seen={} → {:?}",
                    c.name_masked,
                    c.kind,
                    c.fingerprint.as_deref().unwrap_or("-"),
                    c.protected,
                    c.seen_ticks,
                    c.action
                );
            }
            candidates.iter().map(|c| c.action).collect()
        }
        TickReport::Disabled | TickReport::Failed { .. } => {
            println!("tick: {report:?}");
            Vec::new()
        }
    }
}

/// Runs the orphan-sweep act on `pool`, sweeping the customer databases on `server`.
pub async fn orphan_sweep(server: &PgServer, pool: &PgPool) -> anyhow::Result<()> {
    step("Orphan sweep: orphan databases on the shared cluster, audit-only by default");
    let backend = PgClusterBackend::new(server.admin_options(), None, 2);
    let tier = Tier::parse("pro")?;
    let orphan = BackendName::for_resource(ResourceType::Postgres, &new_token());
    let protected = BackendName::for_resource(ResourceType::Postgres, &new_token());
    for name in [&orphan, &protected] {
        backend.create(name, &tier).await?;
    }
    let comment = format!(
        "{{\"labels\":{{\"app.kubernetes.io/managed-by\":\"keel\"}},\"annotations\":{{\"keel.dev/created-at\":\"{}\",\"keel.dev/protect\":\"true\"}}}}",
        OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "COMMENT ON DATABASE \"{}\" IS '{comment}'",
        protected.expose()
    )))
    .execute(backend.admin_pool())
    .await?;
    println!(
        "left behind with no resource row: {orphan} and {protected} (annotated keel.dev/protect=true)"
    );
    // Two hours on: past the one-hour grace window.
    let later = OffsetDateTime::now_utc() + time::Duration::hours(2);
    let key = FingerprintKey::new(*b"demo-fingerprint-key")?;
    let inventory = || PgDatabaseInventory::new(backend.admin_pool().clone());
    let mut audit_only = Sweeper::new(
        inventory(),
        PgLiveTokens::new(pool.clone()),
        None::<Provisioner<PgResourceStore, PgClusterBackend>>,
        SweepConfig {
            enabled: true,
            ..SweepConfig::default()
        },
        SweepMetrics::register(&mut Registry::default()),
        key.clone(),
    );
    let actions = print(&audit_only.tick(later).await);
    ensure!(
        actions.len() == 2 && actions.iter().all(|a| *a == Action::Reported),
        "audit-only must report both and touch neither"
    );
    ensure!(backend.exists(&orphan).await? && backend.exists(&protected).await?);
    println!("audit-only: nothing dropped");

    step("Orphan sweep: both gates on; confirmed over 3 ticks, reclaimed through the chokepoint");
    let chokepoint = Provisioner::new(
        PgResourceStore::new(pool.clone()),
        PgClusterBackend::new(server.admin_options(), None, 2),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let mut armed = Sweeper::new(
        inventory(),
        PgLiveTokens::new(pool.clone()),
        Some(chokepoint),
        SweepConfig {
            enabled: true,
            destructive: true,
            // Two databases: 10% rounds up to one reclaim per tick.
            ..SweepConfig::default()
        },
        SweepMetrics::register(&mut Registry::default()),
        key,
    );
    let mut last = Vec::new();
    for _ in 0..3 {
        last = print(&armed.tick(later).await);
    }
    ensure!(
        last.contains(&Action::Reclaimed),
        "the third tick must reclaim the orphan"
    );
    let (orphan_left, protected_left) = (
        backend.exists(&orphan).await?,
        backend.exists(&protected).await?,
    );
    println!("orphan still there: {orphan_left}; protected still there: {protected_left}");
    ensure!(!orphan_left && protected_left);
    let mut conn = pool.acquire().await?;
    let rows = fetch(
        &mut conn,
        &AuditFilter {
            kind: Some(AuditKind::ResourceDeprovisioned),
            ..AuditFilter::default()
        },
    )
    .await?;
    let row = rows
        .iter()
        .find(|s| s.event.attributes().get("reason") == Some("orphan"))
        .context("no resource.deprovisioned row for the reclaim")?;
    let attrs: Vec<String> = row
        .event
        .attributes()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "audit resource.deprovisioned actor={} {}",
        row.event.actor(),
        attrs.join(" ")
    );
    Ok(())
}
