//! The audit act: state changes and their audit rows commit together, a failed change leaves no
//! audit row behind, the trail is append-only and refuses secrets.

use anyhow::{Context, ensure};
use keel_audit::postgres::{AuditFilter, fetch, insert};
use keel_audit::{Actor, AuditEvent, AuditKind, Consumer, ResourceId, TeamId};
use sqlx::PgPool;
use time::OffsetDateTime;

use super::step;

async fn count_audit(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(pool)
        .await?)
}

/// Runs the audit act.
pub async fn audit_trail(pool: &PgPool) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let operator = Actor::parse("operator:demo")?;
    let team = TeamId::new_random();
    let resource = ResourceId::new_random();
    let token = "demo7f3a9c2e";

    step("Audit: a state change and its audit row commit together");
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'hobby')")
        .bind(team.as_uuid())
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE teams SET tier = 'pro', updated_at = now() WHERE id = $1")
        .bind(team.as_uuid())
        .execute(&mut *tx)
        .await?;
    insert(
        &mut tx,
        &AuditEvent::new(AuditKind::TeamTierChanged, operator.clone(), now)
            .team(team)
            .attr("from_tier", "hobby")?
            .attr("to_tier", "pro")?,
    )
    .await?;
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'postgres', 'pro', 'active', $4, $5)",
    )
    .bind(resource.as_uuid())
    .bind(token)
    .bind(team.as_uuid())
    .bind(format!("db_{token}"))
    .bind("postgres://demo:demo-password@127.0.0.1/demo")
    .execute(&mut *tx)
    .await?;
    insert(
        &mut tx,
        &AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), now)
            .team(team)
            .resource(resource)
            .attr("resource_type", "postgres")?
            .attr_masked("token_masked", token)?,
    )
    .await?;
    tx.commit().await?;
    println!(
        "team upgraded hobby -> pro and a postgres resource created: 2 audit rows committed with them"
    );

    step("Audit: a failed state change leaves no audit row behind");
    let before = count_audit(pool).await?;
    let mut tx = pool.begin().await?;
    insert(
        &mut tx,
        &AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), now).team(team),
    )
    .await?;
    let refused = sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status) \
         VALUES ($1, 'demounaddressable', $2, 'postgres', 'pro', 'active')",
    )
    .bind(ResourceId::new_random().as_uuid())
    .bind(team.as_uuid())
    .execute(&mut *tx)
    .await;
    let err = refused
        .err()
        .context("an active resource without a connection URL was accepted")?;
    drop(tx);
    let after = count_audit(pool).await?;
    ensure!(
        before == after,
        "an audit row outlived its failed state change"
    );
    println!("an 'active' resource without a connection URL was refused by the database:");
    println!("  {}", first_line(&err.to_string()));
    println!(
        "the provision.created row written in the same transaction rolled back with it ({before} rows before, {after} after)"
    );

    step("Audit: the trail is append-only, and the application role cannot switch that off");
    for sql in [
        "UPDATE audit_events SET actor = 'someone-else'",
        "DELETE FROM audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        "DROP TABLE audit_events",
    ] {
        let err = sqlx::query(sql)
            .execute(pool)
            .await
            .err()
            .context("audit_events accepted a change")?;
        println!("{sql}\n  refused: {}", first_line(&err.to_string()));
    }

    step("Audit: secrets never reach an audit row");
    let refused = AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), now)
        .attr("note", "postgres://demo:demo-password@127.0.0.1/demo")
        .err()
        .context("a connection URL was accepted as an audit attribute")?;
    println!("attribute holding a connection URL refused: {refused}");

    step("Audit: the trail, read back, with each kind's declared consumer");
    let mut conn = pool.acquire().await?;
    for stored in fetch(
        &mut conn,
        &AuditFilter {
            team_id: Some(team),
            ..Default::default()
        },
    )
    .await?
    {
        let event = &stored.event;
        let attributes: Vec<String> = event
            .attributes()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "#{:<3} {:<28} actor={:<14} {}\n      consumer: {}",
            stored.id.0,
            event.kind().as_str(),
            event.actor().as_str(),
            attributes.join(" "),
            describe(event.kind().consumer())
        );
    }
    Ok(())
}

/// The first line of a (database) error message.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// One line describing a kind's consumer.
pub fn describe(consumer: Consumer) -> String {
    match consumer {
        Consumer::CustomerNotification { template } => {
            format!("customer notification (template {template})")
        }
        Consumer::OperatorAlert { alert, severity } => {
            format!("operator alert {alert} ({severity:?})")
        }
        Consumer::PropagationWiring { propagation_kind } => {
            format!("propagation wiring (enqueues {propagation_kind})")
        }
        Consumer::IntentionallyNone { reason } => format!("intentionally none: {reason}"),
    }
}
