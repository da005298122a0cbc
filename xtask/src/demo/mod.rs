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
    run_then(false)
}

/// Runs the demo, then serves the operator console on its data until Ctrl-C (`cargo xtask
/// console`).
pub fn run_console() -> anyhow::Result<()> {
    run_then(true)
}

fn run_then(console: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(scenario(console))
}

/// Prints a section heading.
fn step(title: &str) {
    println!("\n== {title}");
}

async fn scenario(console: bool) -> anyhow::Result<()> {
    println!("Keel demo: reliability core for a multi-tenant resource platform");

    step("A throwaway Postgres");
    let server = tokio::task::spawn_blocking(PgServer::start_throwaway)
        .await?
        .context("could not start a throwaway Postgres")?;
    println!("started {}", server.describe());
    server.create_database("keel_demo", None).await?;
    // Two roles, as production runs it: the owner applies the migrations, the application role
    // the binaries serve as gets only what they use (it cannot touch the audit triggers).
    // The server asks every role for its password, so each gets a fresh one.
    let mut admin = server.connect_admin().await?;
    let owner_password = uuid::Uuid::new_v4().simple().to_string();
    let app_password = uuid::Uuid::new_v4().simple().to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE keel_owner LOGIN PASSWORD '{owner_password}'; \
         CREATE ROLE keel_app LOGIN PASSWORD '{app_password}'; \
         ALTER DATABASE keel_demo OWNER TO keel_owner"
    )))
    .execute(&mut admin)
    .await
    .context("could not create the owner and application roles")?;
    let owner = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            server
                .options_for("keel_demo")
                .username("keel_owner")
                .password(&owner_password),
        )
        .await
        .context("could not connect to the demo database as its owner")?;
    keel_schema::migrate(&owner)
        .await
        .context("could not apply the migrations")?;
    let app_role = keel_schema::roles::AppRole::parse("keel_app")?;
    keel_schema::roles::grant_app_role(&mut *owner.acquire().await?, &app_role)
        .await
        .context("could not grant the application role")?;
    owner.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(
            server
                .options_for("keel_demo")
                .username("keel_app")
                .password(&app_password),
        )
        .await
        .context("could not connect to the demo database")?;
    println!(
        "applied the migrations as keel_owner: schema version {} ({} tables: {})",
        keel_schema::latest_version(),
        keel_schema::CONTRACT_TABLES.len(),
        keel_schema::CONTRACT_TABLES.join(", ")
    );
    println!("the acts below run as keel_app, granted only what the binaries use");

    audit::audit_trail(&pool).await?;
    // The customer cluster's admin (CREATEROLE) is a third role, never the application role.
    let cluster = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(server.options_for("keel_demo"))
        .await
        .context("could not connect to the customer cluster as its admin")?;
    propagation::tier_elevations(&pool, &cluster).await?;
    provision::provisioning(&server, &pool).await?;
    orphan_sweep::orphan_sweep(&server, &pool).await?;
    rater::rating(&server, "keel_demo", &pool).await?;

    if console {
        crate::console::serve_demo(&pool).await?;
    } else {
        println!("\nBrowse this scenario's data in the operator console: cargo xtask console");
    }
    pool.close().await;
    cluster.close().await;
    println!(
        "\nDone. The throwaway Postgres stops and its files are removed as this process exits."
    );
    Ok(())
}
