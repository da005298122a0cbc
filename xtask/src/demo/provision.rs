//! The provisioning act: a real database provisioned and reached with the URL returned; a
//! provisioning whose finalize fails answering 503 with its agent action and leaving no database
//! behind; a deprovision through the audited chokepoint.

use anyhow::{Context, ensure};
use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier, mask};
use keel_provision::fault::{FaultyStore, StoreStep};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{
    Backend as _, DeprovisionCause, DeprovisionReason, DeprovisionTarget, DocsBase, ErrorEnvelope,
    ProvisionMetrics, ProvisionRequest, Provisioner,
};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use time::OffsetDateTime;

use super::step;

/// Runs the provisioning act on `pool`, creating customer databases on `server`.
pub async fn provisioning(server: &PgServer, pool: &PgPool) -> anyhow::Result<()> {
    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(team.as_uuid())
        .execute(pool)
        .await?;
    let provisioner = Provisioner::new(
        FaultyStore::new(PgResourceStore::new(pool.clone())),
        PgClusterBackend::new(server.admin_options(), None, 4),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let request = |id: &str| -> anyhow::Result<ProvisionRequest> {
        Ok(ProvisionRequest {
            team_id: team,
            resource_type: ResourceType::Postgres,
            tier: Tier::parse("pro")?,
            request_id: RequestId::parse(id)?,
            actor: Actor::parse("agent:demo")?,
        })
    };

    step("Provision: reserve → create → finalize, then connect with the URL returned");
    let provisioned = provisioner
        .provision(request("req-demo-1")?, OffsetDateTime::now_utc())
        .await
        .context("provisioning failed")?;
    let url = provisioned.connection_url().expose().to_owned();
    let options: PgConnectOptions = url.parse().context("the returned URL does not parse")?;
    let mut customer = PgConnection::connect_with(&options)
        .await
        .context("could not connect with the returned URL")?;
    let (user, database): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_database()::text")
            .fetch_one(&mut customer)
            .await?;
    customer.close().await?;
    println!(
        "201 for resource {}: connected as {} to {} with the URL returned (shown once; here masked: {})",
        provisioned.id(),
        mask(&user),
        mask(&database),
        mask(&url)
    );
    let (status, stored): (String, String) =
        sqlx::query_as("SELECT status, connection_url FROM resources WHERE id = $1")
            .bind(provisioned.id().as_uuid())
            .fetch_one(pool)
            .await?;
    let password = options_password(&url);
    let stored_password = stored.contains(password);
    println!("row: status {status}, address stored, password stored: {stored_password}");
    ensure!(
        status == "active" && !stored_password,
        "the row must be active and addressable, without the password"
    );

    step("Provision: finalize fails → teardown, soft delete, provision.persistence_failed, 503");
    provisioner.store().fail(StoreStep::Activate, 1);
    let err = provisioner
        .provision(request("req-demo-2")?, OffsetDateTime::now_utc())
        .await
        .err()
        .context("the injected finalize failure must fail the provisioning")?;
    let docs = DocsBase::parse("https://keel.dev/docs/errors")?;
    let envelope = ErrorEnvelope::new(err.code(), err.to_string(), "req-demo-2", &docs);
    println!(
        "HTTP {} with Retry-After: {}",
        envelope.status,
        envelope.retry_after_header().unwrap_or_default()
    );
    println!("{}", serde_json::to_string_pretty(&envelope)?);
    let (failed_id, token, status): (uuid::Uuid, String, String) = sqlx::query_as(
        "SELECT id, token, status FROM resources WHERE status <> 'active' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await?;
    let name = keel_provision::BackendName::for_resource(
        ResourceType::Postgres,
        &keel_audit::Token::parse(&token)?,
    );
    let left_behind = provisioner.backend().exists(&name).await?;
    println!("row {failed_id}: status {status}; database {name} left behind: {left_behind}");
    ensure!(envelope.status == 503 && !left_behind && status == "failed");

    step(
        "Provision: finalize commits but its reply is lost → the resource is live, nothing torn down",
    );
    provisioner.store().fail_after(StoreStep::Activate, 1);
    let ambiguous = provisioner
        .provision(request("req-demo-4")?, OffsetDateTime::now_utc())
        .await
        .context("a committed finalize is the truth: the resource must be provisioned")?;
    let ambiguous_name =
        keel_provision::BackendName::for_resource(ResourceType::Postgres, ambiguous.token());
    let exists = provisioner.backend().exists(&ambiguous_name).await?;
    println!(
        "201 for resource {}: database {ambiguous_name} exists: {exists}",
        ambiguous.id()
    );
    ensure!(exists, "an active resource's database is never torn down");

    step("Deprovision through the chokepoint: audited first, then torn down, soft-deleted");
    let cause = DeprovisionCause {
        reason: DeprovisionReason::CustomerRequest,
        actor: Actor::parse("agent:demo")?,
        request_id: Some(RequestId::parse("req-demo-3")?),
    };
    let done = provisioner
        .deprovision(
            DeprovisionTarget::Resource(provisioned.id()),
            &cause,
            OffsetDateTime::now_utc(),
        )
        .await?;
    let live_name =
        keel_provision::BackendName::for_resource(ResourceType::Postgres, provisioned.token());
    let still_there = provisioner.backend().exists(&live_name).await?;
    println!("{done:?}: database {live_name} still there: {still_there}");
    ensure!(!still_there);
    let mut conn = pool.acquire().await?;
    for stored in fetch(
        &mut conn,
        &AuditFilter {
            team_id: Some(team),
            ..AuditFilter::default()
        },
    )
    .await?
    {
        let event = stored.event;
        let attrs: Vec<String> = event
            .attributes()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "audit {:<28} actor={} {}",
            event.kind().as_str(),
            event.actor(),
            attrs.join(" ")
        );
    }
    let kinds: Vec<AuditKind> = fetch(
        &mut conn,
        &AuditFilter {
            team_id: Some(team),
            ..AuditFilter::default()
        },
    )
    .await?
    .into_iter()
    .map(|stored| stored.event.kind())
    .collect();
    ensure!(
        kinds
            == [
                AuditKind::ProvisionCreated,
                AuditKind::ProvisionPersistenceFailed,
                AuditKind::ProvisionCreated,
                AuditKind::ResourceDeprovisioned
            ],
        "unexpected audit trail {kinds:?}"
    );
    Ok(())
}

/// The password part of a `scheme://user:password@host/…` URL.
fn options_password(url: &str) -> &str {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map_or("", |(_, password)| password)
}
