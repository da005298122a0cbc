//! The provisioning act: a real database provisioned and reached with the URL returned; a
//! provisioning whose finalize fails answering 503 with its agent action and leaving no database
//! behind; a deprovision through the audited chokepoint. Then the same over HTTP, as an agent
//! sees it: the API router served with a team's API key, an `Idempotency-Key` retry replayed,
//! credentials rotated, the resource listed and deleted.

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
    over_http(server, pool).await
}

/// One answer: status, head and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).context("the body is not JSON")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// One HTTP/1.1 request on a connection of its own.
async fn call(
    addr: std::net::SocketAddr,
    key: Option<&str>,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> anyhow::Result<Answer> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let authorization = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n{authorization}\
         {headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP answer")?;
    let status = head.get(9..12).context("no status")?.parse()?;
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// The API over HTTP, with a team key, as an agent uses it.
async fn over_http(server: &PgServer, pool: &PgPool) -> anyhow::Result<()> {
    use keel_provision_http::keys::{self, Scope};

    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(team.as_uuid())
        .execute(pool)
        .await?;
    step("Over HTTP: an API key for the team (shown once, stored as a hash)");
    let (info, key) = keys::create(
        pool,
        Scope::Team(team),
        "demo agent",
        Actor::parse("operator:demo")?,
        OffsetDateTime::now_utc(),
    )
    .await?;
    let key = key.expose().to_owned();
    println!(
        "keel-provision-api keys create --team {team} → key {} (id {})",
        mask(&key),
        info.id
    );
    let provisioner = Provisioner::new(
        PgResourceStore::new(pool.clone()),
        keel_provision_http::backends::Backends {
            postgres: Some(PgClusterBackend::new(server.admin_options(), None, 4)),
            namespaces: None,
        },
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let state = std::sync::Arc::new(keel_provision_http::AppState::new(
        provisioner,
        pool.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(keel_provision_http::serve(
        listener,
        keel_provision_http::router(std::sync::Arc::clone(&state)),
        state.tracker.clone(),
        stop.clone(),
        std::time::Duration::from_secs(30),
    ));
    let body = format!(r#"{{"team_id":"{team}","resource_type":"postgres","tier":"pro"}}"#);
    let json = "Content-Type: application/json\r\n";
    let idempotent = format!("{json}Idempotency-Key: demo-create-1\r\n");

    let anonymous = call(addr, None, "POST", "/v1/resources", json, &body).await?;
    println!(
        "POST without a key → {} {}",
        anonymous.status,
        anonymous.json()?["error"]
    );
    ensure!(anonymous.status == 401);

    step("Over HTTP: POST with an Idempotency-Key, then the agent's retry of it");
    let created = call(
        addr,
        Some(&key),
        "POST",
        "/v1/resources",
        &idempotent,
        &body,
    )
    .await?;
    ensure!(created.status == 201, "{}", created.body);
    let id = created.json()?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "201 Location: {} (connection URL shown once)",
        created.header("location").unwrap_or_default()
    );
    let retried = call(
        addr,
        Some(&key),
        "POST",
        "/v1/resources",
        &idempotent,
        &body,
    )
    .await?;
    let replayed = retried.json()?;
    println!(
        "retry → {} for the same resource {} (Idempotent-Replayed: {}; password shown: {})",
        retried.status,
        replayed["id"],
        retried.header("idempotent-replayed").unwrap_or("no"),
        replayed.get("connection_url").is_some()
    );
    ensure!(retried.status == 201 && replayed["id"] == id.as_str());
    let other = body.replace("\"pro\"", "\"free\"");
    let reused = call(
        addr,
        Some(&key),
        "POST",
        "/v1/resources",
        &idempotent,
        &other,
    )
    .await?;
    println!(
        "same key, another body → {} {}",
        reused.status,
        reused.json()?["error"]
    );
    ensure!(reused.status == 422);

    step("Over HTTP: rotate the credentials (the retry had none), connect, list, delete");
    let rotated = call(
        addr,
        Some(&key),
        "POST",
        &format!("/v1/resources/{id}/rotate-credentials"),
        "",
        "",
    )
    .await?;
    ensure!(rotated.status == 200, "{}", rotated.body);
    let url = rotated.json()?["connection_url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let options: PgConnectOptions = url.parse()?;
    PgConnection::connect_with(&options)
        .await
        .context("could not connect with the rotated credentials")?
        .close()
        .await?;
    println!("connected with the rotated credentials ({})", mask(&url));
    let listed = call(addr, Some(&key), "GET", "/v1/resources", "", "").await?;
    let count = listed.json()?["resources"].as_array().map_or(0, Vec::len);
    println!("GET /v1/resources → {} resource(s) of the team", count);
    ensure!(count == 1);
    let deleted = call(
        addr,
        Some(&key),
        "DELETE",
        &format!("/v1/resources/{id}"),
        "",
        "",
    )
    .await?;
    println!("DELETE → {} {}", deleted.status, deleted.json()?["outcome"]);
    ensure!(deleted.status == 200);
    stop.cancel();
    served.await??;
    let actors: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, actor FROM audit_events WHERE team_id = $1 ORDER BY id")
            .bind(team.as_uuid())
            .fetch_all(pool)
            .await?;
    for (kind, actor) in &actors {
        println!("audit {kind:<28} actor={actor}");
    }
    ensure!(
        actors
            .iter()
            .skip(1)
            .all(|(_, actor)| *actor == format!("key:{}", info.id)),
        "every API action is audited as the key"
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
