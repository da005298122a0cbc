//! `cargo xtask demo`: Keel's scenario end to end on a throwaway local Postgres.
//!
//! Each concern adds its act in a module of its own.

mod audit;
mod orphan_sweep;
mod propagation;
mod provision;
mod rater;

use anyhow::Context;
use keel_testkit::PgServer;
use sqlx::postgres::PgPoolOptions;

/// Runs the demo, printing a readable account.
pub fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(scenario())
}

/// Prints a section heading.
fn step(title: &str) {
    println!("\n== {title}");
}

async fn scenario() -> anyhow::Result<()> {
    println!("Keel demo: reliability core for a multi-tenant resource platform");

    step("A throwaway Postgres");
    let server = tokio::task::spawn_blocking(PgServer::start_throwaway)
        .await?
        .context("could not start a throwaway Postgres")?;
    println!("started {}", server.describe());
    server.create_database("keel_demo", None).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(server.options_for("keel_demo"))
        .await
        .context("could not connect to the demo database")?;
    keel_schema::migrate(&pool)
        .await
        .context("could not apply the migrations")?;
    println!(
        "applied the migrations: schema version {} ({} tables: {})",
        keel_schema::latest_version(),
        keel_schema::CONTRACT_TABLES.len(),
        keel_schema::CONTRACT_TABLES.join(", ")
    );

    audit::audit_trail(&pool).await?;
    propagation::tier_elevations(&pool).await?;
    provision::provisioning(&server, &pool).await?;
    orphan_sweep::orphan_sweep(&server, &pool).await?;
    rater::rating(&server, "keel_demo", &pool).await?;

    pool.close().await;
    println!(
        "\nDone. The throwaway Postgres stops and its files are removed as this process exits."
    );
    Ok(())
}
