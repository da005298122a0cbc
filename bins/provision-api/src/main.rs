//! `keel-provision-api`: provisions customer resources atomically. No 201 for a resource the
//! platform cannot address; every error tells the caller (often an AI agent) what to do next;
//! deletes go through the one audited deprovision chokepoint.
//!
//! `serve` answers the routes of [`keel_provision_http::router`] (every `/v1` route behind an
//! API key), with `/metrics`, `/healthz` and `/readyz` on a separate operations listener
//! (`--ops-listen`, default `127.0.0.1:9090`). Postgres resources are databases on a shared
//! cluster (`--cluster-database-url`, default: the platform database's server); `namespace` and
//! `redis` resources are Kubernetes namespaces when `--kube-namespaces` is set.
//!
//! `keys create|list|revoke` manages the API keys (audited as `api_key.created` and
//! `api_key.revoked`). This binary only parses config, builds the adapters and serves.

mod reconcile;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use keel_provision::postgres::{
    PgClusterBackend, PgResourceStore, PublicAddress, SslMode, isolate_platform_database,
};
use keel_provision::{DocsBase, ProvisionMetrics, Provisioner};
use keel_service::cli::{DatabaseArgs, DatabaseUrl, LogArgs};
use keel_service::http::Readiness;
use prometheus_client::registry::Registry;

use keel_provision_http::backends::Backends;
use keel_provision_http::bounded::BoundedStore;
use keel_provision_http::keys::{self, KeyId, Scope};
use keel_provision_http::{AppState, Limits, RateLimiter};

/// The process's allocator: jemalloc, which keeps freed memory for reuse across the work
/// loop's ticks and batches instead of returning and re-faulting it (`BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Provisions customer resources atomically: no 201 for a resource the platform cannot address.
#[derive(Parser)]
#[command(name = "keel-provision-api", version, after_help = keel_service::cli::EXIT_CODES_HELP)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the provisioning API, /metrics and /healthz until SIGTERM.
    Serve(Box<ServeArgs>),
    /// Apply the embedded database migrations and exit.
    Migrate(keel_service::MigrateArgs),
    /// Create, list or revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it once (only its hash is stored).
    Create(KeyCreateArgs),
    /// List the keys (ids, scopes, labels; never a secret).
    List(DatabaseArgs),
    /// Revoke a key by its id: it answers 401 from then on.
    Revoke(KeyRevokeArgs),
}

#[derive(Args)]
struct KeyCreateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The team the key acts for (a team key).
    #[arg(
        long,
        value_name = "UUID",
        conflicts_with = "operator",
        required_unless_present = "operator"
    )]
    team: Option<keel_audit::TeamId>,
    /// An operator key: every team, and the operator and expired delete reasons.
    #[arg(long)]
    operator: bool,
    /// Who holds the key and what for (shown in `keys list`): at most 200 characters, no
    /// control character.
    #[arg(long, default_value = "", value_name = "TEXT", value_parser = parse_label)]
    label: String,
    /// The audit actor of the creation (e.g. operator:alice).
    #[arg(long, default_value = "operator:cli", value_parser = parse_actor, value_name = "ACTOR")]
    actor: keel_audit::Actor,
}

#[derive(Args)]
struct KeyRevokeArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The key's id (the 12 hex digits after `keel_`).
    #[arg(value_parser = parse_key_id, value_name = "KEY_ID")]
    id: KeyId,
    /// The audit actor of the revocation (e.g. operator:alice).
    #[arg(long, default_value = "operator:cli", value_parser = parse_actor, value_name = "ACTOR")]
    actor: keel_audit::Actor,
}

/// The actor of a key's creation or revocation: an operator's act, `operator:NAME` (never the
/// API, the system or an API key's own `key:ID`).
fn parse_actor(s: &str) -> Result<keel_audit::Actor, String> {
    keel_audit::Actor::operator(s).map_err(|e| e.to_string())
}

fn parse_key_id(s: &str) -> Result<KeyId, String> {
    KeyId::parse(s).ok_or_else(|| "a key id is the 12 lowercase hex digits after keel_".to_owned())
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address for the API (every /v1 route needs an API key).
    #[arg(
        long,
        env = "KEEL_PROVISION_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// The address for /metrics, /healthz and /readyz, never the public API listener.
    #[arg(
        long,
        env = "KEEL_PROVISION_OPS_LISTEN",
        default_value = "127.0.0.1:9090",
        value_name = "ADDR"
    )]
    ops_listen: SocketAddr,
    /// Requests one API key may make per minute on one instance (429 past it).
    #[arg(
        long,
        env = "KEEL_PROVISION_RATE_LIMIT_PER_MINUTE",
        default_value_t = 600,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "N"
    )]
    rate_limit_per_minute: u32,
    /// Live resources one team may hold (403 quota_exceeded past it).
    #[arg(
        long,
        env = "KEEL_PROVISION_TEAM_QUOTA",
        default_value_t = 100,
        value_name = "N"
    )]
    team_quota: u32,
    /// Hours an Idempotency-Key's outcome is kept.
    #[arg(
        long,
        env = "KEEL_PROVISION_IDEMPOTENCY_RETENTION_HOURS",
        default_value_t = 24,
        value_parser = clap::value_parser!(u64).range(1..),
        value_name = "HOURS"
    )]
    idempotency_retention_hours: u64,
    /// Admin URL of the shared Postgres cluster customer databases are created on (a role with
    /// CREATEROLE and CREATEDB). Default: the platform database's server. Never logged.
    #[arg(
        long,
        env = "KEEL_CLUSTER_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    cluster_database_url: Option<DatabaseUrl>,
    /// Host customers connect to (default: the cluster URL's host).
    #[arg(long, env = "KEEL_PROVISION_PUBLIC_HOST", value_name = "HOST")]
    public_host: Option<String>,
    /// Port customers connect to (default: the cluster URL's port).
    #[arg(long, env = "KEEL_PROVISION_PUBLIC_PORT", value_name = "PORT")]
    public_port: Option<u16>,
    /// The `sslmode` written into issued connection URLs (disable, prefer, require, verify-ca,
    /// verify-full).
    #[arg(
        long,
        env = "KEEL_PROVISION_SSLMODE",
        default_value = "require",
        value_parser = parse_sslmode,
        value_name = "MODE"
    )]
    sslmode: SslMode,
    /// Seconds after which a `pending` reservation is settled by the reconciler (it must exceed
    /// the longest provisioning).
    #[arg(
        long,
        env = "KEEL_PROVISION_RECONCILE_PENDING_AFTER_SECS",
        default_value_t = 900,
        value_name = "SECONDS"
    )]
    reconcile_pending_after_secs: u64,
    /// Seconds between reconciler ticks (one replica at a time runs a tick).
    #[arg(
        long,
        env = "KEEL_PROVISION_RECONCILE_INTERVAL_SECS",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    reconcile_interval_secs: u64,
    /// Seconds before a request is answered: a GET or DELETE still waiting answers 503
    /// backend_unavailable; a POST whose provisioning still runs answers 503 provision_pending
    /// with the reserved resource's id (the provisioning goes on).
    #[arg(
        long,
        env = "KEEL_PROVISION_REQUEST_DEADLINE_SECS",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    request_deadline_secs: u64,
    /// Seconds any one call to the platform database may take before it is given up as failed.
    #[arg(
        long,
        env = "KEEL_PROVISION_STORE_DEADLINE_SECS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    store_deadline_secs: u64,
    /// Provisionings in flight at once on this instance; past it a POST answers 503
    /// too_many_provisions before anything is reserved.
    #[arg(
        long,
        env = "KEEL_PROVISION_MAX_IN_FLIGHT",
        default_value_t = 32,
        value_parser = clap::value_parser!(u32).range(1..),
        value_name = "N"
    )]
    max_in_flight: u32,
    /// Seconds to wait on SIGTERM for provisionings in flight.
    #[arg(
        long,
        env = "KEEL_PROVISION_SHUTDOWN_DRAIN_SECS",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    shutdown_drain_secs: u64,
    /// Also provision `namespace` and `redis` resources as Kubernetes namespaces (in-cluster
    /// config or KUBECONFIG).
    #[arg(long, env = "KEEL_PROVISION_KUBE_NAMESPACES")]
    kube_namespaces: bool,
    /// Base of the Kubernetes API URL handed out for namespaces.
    #[arg(
        long,
        env = "KEEL_PROVISION_KUBE_CONNECTION_BASE",
        default_value = "https://kubernetes.default.svc",
        value_name = "URL"
    )]
    kube_connection_base: String,
    /// Base of the error documentation linked from agent actions (https, at most 60 characters).
    #[arg(
        long,
        env = "KEEL_PROVISION_DOCS_BASE",
        default_value = "https://keel.dev/docs/errors",
        value_name = "URL",
        value_parser = parse_docs_base
    )]
    docs_base: DocsBase,
    /// The tiers this platform sells.
    #[arg(
        long,
        env = "KEEL_PROVISION_TIERS",
        value_delimiter = ',',
        default_value = "free,hobby,pro,team",
        value_name = "TIER,…"
    )]
    tiers: Vec<String>,
    /// Connections to the platform database (2 to 10,000): a POST holds one under its team's
    /// quota lock while its reservation takes another, and at most half of them are held so.
    #[arg(
        long,
        env = "KEEL_PROVISION_MAX_CONNECTIONS",
        default_value_t = 16,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(2..=10_000)
    )]
    max_connections: u32,
}

fn parse_label(s: &str) -> Result<String, String> {
    keys::check_label(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_sslmode(s: &str) -> Result<SslMode, String> {
    SslMode::parse(s).ok_or_else(|| {
        let modes: Vec<&str> = SslMode::ALL.iter().map(|m| m.as_str()).collect();
        format!("expected one of {}", modes.join(", "))
    })
}

fn main() -> ExitCode {
    let cli: Cli = keel_service::cli::parse();
    keel_service::run(&cli.log, async move {
        match cli.command {
            Command::Migrate(db) => keel_service::migrate(&db).await,
            Command::Serve(args) => serve(*args).await,
            Command::Keys(command) => manage_keys(command).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let docs = args.docs_base.clone();
    let pool = keel_service::connect(&args.db, "keel-provision-api", args.max_connections).await?;
    // This installation's id, stamped on every object created (keel.dev/installation).
    let installation = keel_provision::postgres::installation_id(&pool)
        .await
        .context("could not read this installation's id (run `migrate`)")?;
    let cluster = args
        .cluster_database_url
        .as_ref()
        .unwrap_or(&args.db.database_url)
        .connect_options()?;
    let public = match (args.public_host, args.public_port) {
        (None, None) => None,
        (host, port) => Some(PublicAddress {
            host: host.unwrap_or_else(|| cluster.get_host().to_owned()),
            port: port.unwrap_or_else(|| cluster.get_port()),
        }),
    };
    let namespaces = if args.kube_namespaces {
        let client = kube::Client::try_default()
            .await
            .context("could not configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
        Some(
            keel_provision::kube::KubeNamespaceBackend::new(client, args.kube_connection_base)
                .with_installation(installation),
        )
    } else {
        None
    };
    // Every tier sold must have its role settings (the one table shared with propagation), or
    // every POST at that tier would fail.
    let tier_settings = keel_audit::TierRoleSettings::standard();
    for tier in &args.tiers {
        let known = keel_audit::Tier::parse(tier)
            .ok()
            .and_then(|t| tier_settings.get(&t));
        anyhow::ensure!(
            known.is_some(),
            "--tiers names {tier:?}, which has no role settings (connection limit, statement_timeout); \
             sell only tiers defined in keel_audit::TierRoleSettings"
        );
    }
    let cluster_backend = PgClusterBackend::new(cluster, public, 8)
        .with_installation(installation)
        .with_sslmode(args.sslmode)
        .with_tier_settings(tier_settings);
    // Say at start-up, not at the first POST, what the cluster admin lacks.
    cluster_backend
        .check_privileges()
        .await
        .context("the cluster admin role cannot provision")?;
    // Customer roles live on a cluster that, by default, hosts the platform database too.
    isolate_platform_database(&pool)
        .await
        .context("the platform database is reachable by every role on its server")?;
    let backends = Backends {
        postgres: Some(cluster_backend),
        namespaces,
    };
    let mut registry = Registry::default();
    let metrics = ProvisionMetrics::register(&mut registry);
    let tracker = tokio_util::task::TaskTracker::new();
    let state = Arc::new(AppState {
        provisioner: Provisioner::new(
            BoundedStore::new(
                PgResourceStore::new(pool.clone()),
                Duration::from_secs(args.store_deadline_secs.max(1)),
            ),
            backends,
            metrics,
        ),
        docs,
        tiers: args.tiers.into_iter().collect::<BTreeSet<_>>(),
        tracker: tracker.clone(),
        deadline: Duration::from_secs(args.request_deadline_secs.max(1)),
        admission: Arc::new(tokio::sync::Semaphore::new(args.max_in_flight as usize)),
        lock_holders: keel_provision_http::lock_holders_for(&pool),
        pool: pool.clone(),
        limits: Limits {
            requests_per_minute: args.rate_limit_per_minute,
            team_quota: args.team_quota,
            idempotency_retention: Duration::from_secs(args.idempotency_retention_hours * 3600),
        },
        rate: RateLimiter::new(),
    });
    let shutdown =
        keel_service::shutdown::on_signal().context("could not install signal handlers")?;
    let listener = keel_service::http::bind(args.listen)
        .await
        .with_context(|| format!("could not listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, ops_listen = ?args.ops_listen, "serving the provisioning API");
    let reconciler = {
        let state = Arc::clone(&state);
        let pool = pool.clone();
        let stop = shutdown.clone();
        let config = reconcile::ReconcileConfig {
            older_than: Duration::from_secs(args.reconcile_pending_after_secs),
            interval: Duration::from_secs(args.reconcile_interval_secs.max(1)),
        };
        // Supervised: if it dies, stale `pending` rows are never settled again, so the API
        // drains and exits 1 to be restarted rather than serving on without it.
        keel_service::supervise::spawn("stale-pending reconciler", shutdown.clone(), async move {
            reconcile::run(pool, &state.provisioner, &state.lock_holders, config, stop).await;
            Ok(())
        })
    };
    let registry = Arc::new(registry);
    let readiness = Readiness::new(pool.clone());
    let ops_listener = keel_service::http::bind(args.ops_listen)
        .await
        .with_context(|| format!("could not listen on {}", args.ops_listen))?;
    // Its own stop: /metrics keeps answering while the API drains its requests (FND-16).
    let ops =
        keel_service::http::OpsServer::spawn_with_readiness(ops_listener, registry, readiness);
    keel_provision_http::serve(
        listener,
        keel_provision_http::router(Arc::clone(&state)),
        tracker,
        shutdown.clone(),
        Duration::from_secs(args.shutdown_drain_secs),
    )
    .await
    .context("the API listener failed")?;
    shutdown.cancel();
    // A tick in progress finishes (it holds the single-flight lock), then the reconciler returns.
    let reconciler = reconciler.join().await;
    ops.stop().await.context("the operations listener failed")?;
    pool.close().await;
    tracing::info!("provisioning API stopped");
    reconciler?;
    Ok(ExitCode::SUCCESS)
}

/// `keys create|list|revoke`.
async fn manage_keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    let now = time::OffsetDateTime::now_utc();
    match command {
        KeysCommand::Create(args) => {
            let pool = keel_service::connect(&args.db, "keel-provision-api keys", 2).await?;
            let scope = match args.team {
                Some(team) => Scope::Team(team),
                None => Scope::Operator,
            };
            let (info, key) = keys::create(&pool, scope, &args.label, args.actor, now)
                .await
                .context("could not create the API key")?;
            // The one time the key is shown: on stdout, for the operator to hand over.
            println!("{}", key.expose());
            eprintln!(
                "created {} key {} (shown once above; only its hash is stored)",
                info.scope.as_str(),
                info.id
            );
        }
        KeysCommand::List(db) => {
            let pool = keel_service::connect(&db, "keel-provision-api keys", 2).await?;
            for info in keys::list(&pool)
                .await
                .context("could not list the API keys")?
            {
                let team = match info.scope {
                    Scope::Team(team) => team.to_string(),
                    Scope::Operator => "-".to_owned(),
                };
                let format = time::format_description::well_known::Rfc3339;
                let revoked = info
                    .revoked_at
                    .and_then(|at| at.format(&format).ok())
                    .unwrap_or_else(|| "-".to_owned());
                println!(
                    "{}\t{}\t{}\t{}\trevoked:{}\t{}",
                    info.id,
                    info.scope.as_str(),
                    team,
                    info.created_at.format(&format).unwrap_or_default(),
                    revoked,
                    keel_service::text::printable(&info.label)
                );
            }
        }
        KeysCommand::Revoke(args) => {
            let pool = keel_service::connect(&args.db, "keel-provision-api keys", 2).await?;
            let revoked = keys::revoke(&pool, &args.id, args.actor, now)
                .await
                .context("could not revoke the API key")?;
            if revoked {
                eprintln!("revoked key {}", args.id);
            } else {
                eprintln!("key {} was already revoked", args.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--docs-base` is checked while parsing, so a bad value is a usage error (exit 64).
fn parse_docs_base(s: &str) -> Result<DocsBase, String> {
    DocsBase::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use keel_testkit::http::{free_address, get};

    /// OPS-14: a bad `--docs-base` is a usage error (exit 64 with `error:`), not a runtime
    /// failure (exit 1).
    #[test]
    fn a_bad_docs_base_is_a_usage_error() {
        let exit = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-provision-api",
            "serve",
            "--database-url",
            "postgres://u@h/db",
            "--docs-base",
            "http://x",
        ])
        .err()
        .expect("--docs-base http://x was accepted");
        assert_eq!(exit.code, keel_service::EXIT_USAGE, "{}", exit.message);
        assert!(exit.message.starts_with("error: "), "{}", exit.message);
        assert!(exit.message.contains("--docs-base"), "{}", exit.message);
    }

    /// OPS-10: with --ops-listen, /metrics, /healthz and /readyz are served there and not on
    /// the public API listener.
    #[tokio::test]
    async fn ops_listen_keeps_metrics_off_the_public_listener() {
        let db = keel_testkit::database().await;
        let (public, ops) = (free_address(), free_address());
        let cli = keel_service::cli::try_parse_from::<Cli, _, _>([
            "keel-provision-api".to_owned(),
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
        let server = tokio::spawn(super::serve(*args));

        let scrape = get(ops, "/metrics").await;
        assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
        assert!(
            scrape.contains("instant_provision_outcomes_total"),
            "{scrape}"
        );
        assert!(scrape.contains("keel_ready 1"), "{scrape}");
        assert!(get(ops, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(ops, "/healthz").await.starts_with("HTTP/1.1 200"));
        for path in ["/metrics", "/readyz", "/healthz"] {
            let answer = get(public, path).await;
            assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        }
        let api = get(public, "/v1/resources/00000000-0000-0000-0000-000000000000").await;
        assert!(
            api.starts_with("HTTP/1.1 401") && api.contains("unauthorized"),
            "the API answers, behind a key: {api}"
        );
        server.abort();
    }

    /// OPS-14: no subcommand is a usage error whose first line says so.
    #[test]
    fn no_subcommand_is_an_error_line_then_the_help() {
        let exit = keel_service::cli::try_parse_from::<Cli, _, _>(["keel-provision-api"])
            .err()
            .expect("no subcommand was accepted");
        assert_eq!(exit.code, keel_service::EXIT_USAGE, "{}", exit.message);
        assert!(exit.message.starts_with("error: "), "{}", exit.message);
    }
}
