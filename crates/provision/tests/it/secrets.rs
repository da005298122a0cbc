//! Secrets are never written down (OPS-1, OPS-4, PROV-9): the whole flow runs against a server
//! that logs every statement at the most verbose level, with SCRAM password authentication,
//! while this process records its own log output at TRACE. No password reaches either log or
//! the platform database; no full token reaches this process's log. (The token is part of the
//! database and role names, so the server's own statement log names those objects, as its
//! catalogue does.)

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use keel_audit::{Actor, RequestId, ResourceType, TeamId, Tier};
use keel_provision::fault::{BackendStep, FaultyBackend, FaultyStore, StoreStep};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{
    DeprovisionCause, DeprovisionReason, DeprovisionTarget, ProvisionMetrics, ProvisionRequest,
    Provisioner,
};
use keel_testkit::{PgServer, ThrowawayOptions};
use prometheus_client::registry::Registry;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use super::NOW;

/// One server per test process with `log_statement=all`, `log_min_messages=debug5`,
/// `log_min_error_statement=debug5` and SCRAM authentication for every customer role.
pub(crate) fn logging_server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let settings = [
            ("log_statement", "all"),
            ("log_min_messages", "debug5"),
            ("log_min_error_statement", "debug5"),
            ("log_connections", "on"),
            ("password_encryption", "scram-sha-256"),
        ];
        PgServer::start_throwaway_with(&ThrowawayOptions {
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            password_auth: true,
        })
        .unwrap_or_else(|e| panic!("no logging PostgreSQL server: {e}"))
    })
}

/// Everything this process's tracing output writes, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn no_log_at_any_level_and_no_stored_row_contains_a_password_or_a_full_token() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // Process-wide (a thread-local default misses callsites whose interest another test thread
    // cached first); other tests' output lands in the capture too, which only widens the check.
    tracing::subscriber::set_global_default(subscriber)
        .expect("only this test installs a global subscriber");

    let server = logging_server();
    let db = keel_testkit::database_on(server).await;
    let team = TeamId::from_uuid(db.team("free").await);
    let provisioner = Provisioner::new(
        FaultyStore::new(PgResourceStore::new(db.pool().clone())),
        FaultyBackend::new(PgClusterBackend::new(server.admin_options(), None, 2)),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let request = || ProvisionRequest {
        team_id: team,
        resource_type: ResourceType::Postgres,
        tier: Tier::parse("free").unwrap(),
        request_id: RequestId::parse("req-secrets").unwrap(),
        actor: Actor::parse("api").unwrap(),
    };
    let mut passwords: Vec<String> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();

    // A success, used over SCRAM (the verifier matches the issued password).
    let live = provisioner.provision(request(), NOW).await.unwrap();
    let url = live.connection_url().expose().to_owned();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let password = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .and_then(|userinfo| userinfo.split_once(':'))
        .map(|(_, password)| password.to_owned())
        .unwrap();
    assert_eq!(password.len(), 64);
    let mut customer = PgConnection::connect_with(&options).await.unwrap();
    sqlx::query("SELECT 1")
        .execute(&mut customer)
        .await
        .unwrap();
    customer.close().await.unwrap();
    passwords.push(password.clone());
    tokens.push(live.token().expose().to_owned());
    let stored: String = sqlx::query_scalar("SELECT connection_url FROM resources WHERE id = $1")
        .bind(live.id().as_uuid())
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(!stored.contains(&password));
    let userinfo = stored
        .split("://")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    assert!(
        !userinfo.contains(':'),
        "the stored address carries no password"
    );

    // A finalize failure (compensated), a create failure after the real create, and a
    // compensation whose teardown fails: their tokens are secrets too.
    provisioner.store().fail(StoreStep::Activate, 1);
    let err = provisioner.provision(request(), NOW).await.unwrap_err();
    tokens.push(token_of(&db, err.resource_id().unwrap()).await);
    provisioner.backend().fail_after(BackendStep::Create, 1);
    let err = provisioner.provision(request(), NOW).await.unwrap_err();
    tokens.push(token_of(&db, err.resource_id().unwrap()).await);
    provisioner.store().fail(StoreStep::Activate, 1);
    provisioner.backend().fail(BackendStep::Teardown, 1);
    let err = provisioner.provision(request(), NOW).await.unwrap_err();
    let leaked = err.resource_id().unwrap();
    tokens.push(token_of(&db, leaked).await);

    // Deprovision twice (the second drop finds nothing: no notice may name it), then the
    // leaked one, then a stale reservation through the reconciler.
    let cause = DeprovisionCause {
        reason: DeprovisionReason::CustomerRequest,
        actor: Actor::parse("agent:test").unwrap(),
        request_id: None,
    };
    for target in [live.id(), live.id(), leaked] {
        provisioner
            .deprovision(DeprovisionTarget::Resource(target), &cause, NOW)
            .await
            .unwrap();
    }
    let stale = provisioner.reserve(request(), NOW).await.unwrap();
    tokens.push(token_of(&db, stale.id()).await);
    drop(stale);
    provisioner
        .reconcile_pending(std::time::Duration::ZERO, 10, NOW)
        .await
        .unwrap();

    let own = captured.text();
    assert!(
        own.contains("provisioned a resource") && own.contains("sqlx::query"),
        "the capture sees this flow's output, sqlx's statements included ({} bytes)",
        own.len()
    );
    // OPS-3, PROV-14: a create failure is logged at ERROR with its cause chain; successes and
    // deprovisions leave an INFO line.
    let create_failure = own
        .lines()
        .find(|l| l.contains("could not create a backend object"))
        .expect("the create-step failure is logged");
    assert!(create_failure.contains("ERROR"), "{create_failure}");
    assert!(
        create_failure.contains("injected fault at backend.create"),
        "the cause is kept: {create_failure}"
    );
    let log_path = server.log_path().unwrap();
    let server_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        server_log.contains("CREATE ROLE") && server_log.contains("SCRAM-SHA-256$"),
        "the server logged the statements (only with the verifier)"
    );
    assert_eq!(tokens.len(), 5);
    for password in &passwords {
        assert!(!own.contains(password.as_str()), "our log holds a password");
        assert!(
            !server_log.contains(password.as_str()),
            "the server log holds a password"
        );
    }
    for token in &tokens {
        assert!(!own.contains(token.as_str()), "our log holds a full token");
        // Not in the server's statements, bound parameters, notices or connection lines
        // either: names carry the token's digest, and rows are reserved and found without it.
        assert!(
            !server_log.contains(token.as_str()),
            "the server log holds a full token"
        );
    }
    assert!(
        server_log.contains("DROP DATABASE") && server_log.contains("cust_"),
        "the server logged the customer objects' statements (by digest)"
    );
    // OPS-4: at TRACE, sqlx did log the statements of the failed provisions' flips and of the
    // deprovisions (so the check above saw them), and no sqlx line - statement or notice - holds
    // a full token.
    let sqlx_lines: Vec<&str> = own.lines().filter(|l| l.contains("sqlx")).collect();
    for statement in ["status = 'failed'", "status = 'deleted'"] {
        assert!(
            sqlx_lines.iter().any(|l| l.contains(statement)),
            "sqlx logged the statement setting {statement}"
        );
    }
    for line in &sqlx_lines {
        for token in &tokens {
            assert!(!line.contains(token.as_str()), "sqlx logged a full token");
        }
    }
}

async fn token_of(db: &keel_testkit::TestDatabase, id: keel_audit::ResourceId) -> String {
    sqlx::query_scalar("SELECT token FROM resources WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_one(db.pool())
        .await
        .unwrap()
}
