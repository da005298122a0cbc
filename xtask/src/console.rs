//! `cargo xtask console`: the demo's scenario on a throwaway Postgres, then the operator console
//! served on its data (`KEEL_CONSOLE_LISTEN`, default `127.0.0.1:8088`) with a fresh operator
//! key to sign in with, until Ctrl-C. The database is removed when it stops.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use keel_audit::Actor;
use keel_console::{Console, ConsoleConfig};
use keel_provision_http::keys::{self, Scope};
use sqlx::PgPool;

/// Serves the console on the demo's database until Ctrl-C or SIGTERM.
pub async fn serve_demo(pool: &PgPool) -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::var("KEEL_CONSOLE_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8088".to_owned())
        .parse()
        .context("KEEL_CONSOLE_LISTEN is an address such as 127.0.0.1:8088")?;
    let now: time::OffsetDateTime = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let (info, key) = keys::create(
        pool,
        Scope::Operator,
        "cargo xtask console",
        Actor::parse("operator:demo")?,
        now,
    )
    .await
    .context("could not create an operator key for the console")?;
    let console = Arc::new(Console::new(
        pool.clone(),
        ConsoleConfig {
            // Served over plain HTTP on the loopback interface.
            secure_cookies: false,
            ..ConsoleConfig::default()
        },
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen} (set KEEL_CONSOLE_LISTEN)"))?;
    println!("\n== The operator console on the demo's data");
    println!(
        "open http://{listen}/ and sign in with this operator key (id {}):",
        info.id
    );
    println!("{}", key.expose());
    println!("Ctrl-C stops the console and removes the throwaway database.");
    // The same server as the `keel-console` binary: deadlines on every request head and body.
    let shutdown = keel_service::shutdown::on_signal().context("could not watch for signals")?;
    keel_http_serve::serve(
        listener,
        keel_console::router(console),
        shutdown,
        keel_http_serve::Limits::default(),
    )
    .await
    .context("the console listener failed")?;
    Ok(())
}
