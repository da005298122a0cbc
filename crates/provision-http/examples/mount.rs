//! The provisioning API mounted in another axum service: under a prefix of its own, beside the
//! service's own routes, with its own state. `Location` headers follow the prefix.
//!
//! `DATABASE_URL=postgres://… cargo run -p keel-provision-http --example mount` (a database
//! migrated with `keel-provision-api migrate`; customer databases are created on its server),
//! then `curl -H "Authorization: Bearer $KEY" http://127.0.0.1:8081/provisioning/v1/resources`
//! with a key from `keel-provision-api keys create --team <uuid>`.

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{ProvisionMetrics, Provisioner};
use keel_provision_http::AppState;
use keel_provision_http::backends::Backends;
use prometheus_client::registry::Registry;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.clone())
        .await?;
    let mut registry = Registry::default();
    let provisioner = Provisioner::new(
        PgResourceStore::new(pool.clone()),
        Backends {
            postgres: Some(PgClusterBackend::new(options, None, 4)),
            namespaces: None,
        },
        ProvisionMetrics::register(&mut registry),
    );
    let mut state = AppState::new(provisioner, pool);
    state.limits.team_quota = 10;
    let state = Arc::new(state);

    let app = Router::new()
        .route("/", get(|| async { "the platform's own routes" }))
        .nest(
            "/provisioning",
            keel_provision_http::router(Arc::clone(&state)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
    println!("serving on http://127.0.0.1:8081 (the API under /provisioning)");
    // `serve` also waits, on shutdown, for provisionings still in flight.
    keel_provision_http::serve(
        listener,
        app,
        state.tracker.clone(),
        tokio_util::sync::CancellationToken::new(),
        std::time::Duration::from_secs(30),
    )
    .await?;
    Ok(())
}
