//! `keel-console`: the operator's web console (the [`keel_console`] router) on `--listen`, with
//! `/metrics`, `/healthz` and `/readyz` on a separate operations listener (`--ops-listen`).
//!
//! Operators sign in with an operator API key (`keel-provision-api keys create --operator`).
//! Serve it over TLS (or behind a TLS-terminating proxy) and pass `--secure-cookies`; keep the
//! listener off the public internet. This binary only parses config, connects and serves.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use keel_console::{Console, ConsoleConfig};
use keel_service::cli::{DatabaseArgs, LogArgs};
use keel_service::http::Readiness;
use prometheus_client::registry::Registry;

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The operator's web console: dead letters, orphan review, rater runs and the audit trail.
#[derive(Parser)]
#[command(name = "keel-console", version, after_help = keel_service::cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the console, /metrics and /healthz until SIGTERM.
    Serve(ServeArgs),
    /// Apply the embedded database migrations and exit.
    Migrate(keel_service::MigrateArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address for the console's pages (every page needs a signed-in operator).
    #[arg(
        long,
        env = "KEEL_CONSOLE_LISTEN",
        default_value = "127.0.0.1:8088",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// The address for /metrics, /healthz and /readyz, never the console's listener.
    #[arg(
        long,
        env = "KEEL_CONSOLE_OPS_LISTEN",
        default_value = "127.0.0.1:9090",
        value_name = "ADDR"
    )]
    ops_listen: SocketAddr,
    /// Mark the session cookie `Secure`: set it whenever browsers reach the console over TLS
    /// (directly or through a TLS-terminating proxy).
    #[arg(long, env = "KEEL_CONSOLE_SECURE_COOKIES")]
    secure_cookies: bool,
    /// Hours a session lasts after sign-in.
    #[arg(
        long,
        env = "KEEL_CONSOLE_SESSION_HOURS",
        default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..=168),
        value_name = "HOURS"
    )]
    session_hours: u16,
    /// Rows per audit-trail page.
    #[arg(
        long,
        env = "KEEL_CONSOLE_PAGE_SIZE",
        default_value_t = 50,
        value_parser = clap::value_parser!(u32).range(1..=1000),
        value_name = "N"
    )]
    page_size: u32,
    /// Connections to the platform database.
    #[arg(
        long,
        env = "KEEL_CONSOLE_MAX_CONNECTIONS",
        default_value_t = 8,
        value_name = "N"
    )]
    max_connections: u32,
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    keel_service::run(&cli.log, async move {
        match cli.command {
            Command::Migrate(db) => keel_service::migrate(&db).await,
            Command::Serve(args) => serve(args).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let pool = keel_service::connect(&args.db, "keel-console", args.max_connections).await?;
    let console = Arc::new(Console::new(
        pool.clone(),
        ConsoleConfig {
            secure_cookies: args.secure_cookies,
            session_ttl: time::Duration::hours(i64::from(args.session_hours)),
            page_size: args.page_size,
        },
    ));
    let shutdown =
        keel_service::shutdown::on_signal().context("could not install signal handlers")?;
    let listener = keel_service::http::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    let ops_listener = keel_service::http::bind(args.ops_listen)
        .await
        .with_context(|| format!("could not listen on {}", args.ops_listen))?;
    tracing::info!(listen = %args.listen, ops_listen = %args.ops_listen, secure_cookies = args.secure_cookies, "serving the console");
    let registry = Arc::new(Registry::default());
    let ops = tokio::spawn(keel_service::http::serve_with_readiness(
        ops_listener,
        registry,
        Readiness::new(pool.clone()),
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    keel_http_serve::serve(
        listener,
        keel_console::router(console),
        stop,
        keel_http_serve::Limits::default(),
    )
    .await
    .context("the console listener failed")?;
    shutdown.cancel();
    ops.await
        .context("the operations listener panicked")?
        .context("the operations listener failed")?;
    pool.close().await;
    tracing::info!("console stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use keel_testkit::http::{free_address, get};

    /// /metrics, /healthz and /readyz answer on the operations listener only; the console's
    /// listener sends an anonymous visitor to the sign-in page.
    #[tokio::test]
    async fn ops_routes_live_on_the_ops_listener_and_pages_need_a_session() {
        let db = keel_testkit::database().await;
        let (public, ops) = (free_address(), free_address());
        let cli = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-console".to_owned(),
            "serve".to_owned(),
            "--database-url".to_owned(),
            db.url(),
            "--listen".to_owned(),
            public.to_string(),
            "--ops-listen".to_owned(),
            ops.to_string(),
        ])
        .unwrap();
        let super::Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let server = tokio::spawn(super::serve(args));
        let scrape = get(ops, "/metrics").await;
        assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
        assert!(scrape.contains("keel_ready 1"), "{scrape}");
        assert!(get(ops, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(ops, "/readyz").await.starts_with("HTTP/1.1 200"));
        let page = get(public, "/").await;
        assert!(page.starts_with("HTTP/1.1 303"), "{page}");
        assert!(page.contains("location: /sign-in"), "{page}");
        let form = get(public, "/sign-in").await;
        assert!(
            form.contains("SameSite=Strict") && !form.contains("Secure"),
            "{form}"
        );
        server.abort();
    }

    /// A bad flag is a usage error (exit 64), never a runtime failure.
    #[test]
    fn a_bad_page_size_is_a_usage_error() {
        let exit = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-console",
            "serve",
            "--database-url",
            "postgres://u@h/db",
            "--page-size",
            "0",
        ])
        .err()
        .expect("--page-size 0 was accepted");
        assert_eq!(exit.code, keel_service::EXIT_USAGE, "{}", exit.message);
    }
}
