//! The operations listener: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).
//!
//! `/metrics` speaks both exposition formats: OpenMetrics text to a client that asks for it
//! (Prometheus does, in its `Accept` header), and the Prometheus text format 0.0.4 otherwise
//! (`curl`, `promtool check metrics`, older scrapers). The two differ for counters: OpenMetrics
//! names the family `x` and its sample `x_total`, text 0.0.4 names both `x_total`, so tools that
//! look HELP up by series name find it. Every scrape also carries `keel_build_info` and the
//! `process_*` families (see [`crate::process`]), and, on a binary with a readiness check,
//! `keel_ready` (1 while `/readyz` would answer 200).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of the OpenMetrics text exposition format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the Prometheus text exposition format 0.0.4.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Flags for the operations listener.
#[derive(Clone, Debug, clap::Args)]
pub struct HttpArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "KEEL_LISTEN",
        default_value = "0.0.0.0:9090",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
}

/// The readiness check behind `/readyz`: the database answers within the timeout and its
/// schema is at the version this binary embeds (`keel_schema::latest_version`).
#[derive(Clone, Debug)]
pub struct Readiness {
    /// `None`: the binary depends on nothing (a disabled sweep), so it is always ready.
    pool: Option<PgPool>,
    expected_version: i64,
    timeout: Duration,
}

/// Why a binary is not ready. The text names no host, user or URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The database did not answer (refused, timed out, authentication failed).
    #[error("the database is not reachable")]
    DatabaseUnreachable,
    /// The database answered, but this role may not read the applied schema version: it was
    /// not granted by `migrate --app-role` (or the grant predates the readiness check).
    #[error(
        "this role cannot read the schema version (permission denied); run `migrate --app-role` \
         naming it"
    )]
    SchemaUnreadable,
    /// The database answered but has no applied migrations.
    #[error("the schema is not migrated (expected version {expected}); run `migrate`")]
    NotMigrated {
        /// The version this binary needs.
        expected: i64,
    },
    /// The schema is at another version than the one this binary embeds: behind it (run
    /// `migrate`) or ahead of it (a newer release migrated it: deploy that release).
    #[error("{}", wrong_version(*found, *expected))]
    WrongVersion {
        /// The latest applied migration.
        found: i64,
        /// The version this binary needs.
        expected: i64,
    },
}

/// What to do about a schema at `found` for a binary that expects `expected`.
fn wrong_version(found: i64, expected: i64) -> String {
    if found < expected {
        format!("the schema is at version {found}, this binary expects {expected}; run `migrate`")
    } else {
        format!(
            "the schema is at version {found}, newer than this binary's {expected}: a newer \
             release migrated it; deploy that release"
        )
    }
}

impl Readiness {
    /// Readiness over `pool`, expecting the schema this binary embeds, answering within 2 s.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool: Some(pool),
            expected_version: keel_schema::latest_version(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Readiness of a process configured to depend on nothing (a disabled orphan sweep builds no
    /// client and reads nothing): always ready, so a disabled Deployment still rolls out.
    pub fn without_dependencies() -> Self {
        Self {
            pool: None,
            expected_version: keel_schema::latest_version(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Expects another schema version (tests, or a binary that embeds its own).
    pub fn expecting_version(mut self, version: i64) -> Self {
        self.expected_version = version;
        self
    }

    /// Checks the database and the schema version once.
    pub async fn check(&self) -> Result<(), NotReady> {
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let query =
            sqlx::query_scalar::<_, Option<i64>>(keel_schema::APPLIED_VERSION_SQL).fetch_one(pool);
        let found = match tokio::time::timeout(self.timeout, query).await {
            Ok(Ok(found)) => found,
            // A database without the migrations table answers "undefined table" (42P01).
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42P01") => None,
            // insufficient_privilege: reachable, but the role was never granted the read.
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42501") => {
                return Err(NotReady::SchemaUnreadable);
            }
            Ok(Err(_)) | Err(_) => return Err(NotReady::DatabaseUnreachable),
        };
        let expected = self.expected_version;
        match found {
            None => Err(NotReady::NotMigrated { expected }),
            Some(found) if found == expected => Ok(()),
            Some(found) => Err(NotReady::WrongVersion { found, expected }),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// The families every binary exports beside its own: `keel_build_info{version,commit} 1` and
/// the `process_*` families.
fn service_registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut registry = Registry::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: crate::cli::COMMIT,
            })
            .set(1);
        registry.register(
            "keel_build_info",
            "The Keel version and commit this binary was built from (always 1)",
            build_info,
        );
        registry.register_collector(Box::new(crate::process::ProcessCollector::new()));
        registry
    })
}

#[derive(Clone)]
struct Ops {
    registry: Arc<Registry>,
    readiness: Option<Readiness>,
}

/// The router serving `/metrics` from `registry` and `/healthz`, for a binary without a
/// database to check; [`router_with_readiness`] adds `/readyz`.
///
/// The registry is shared read-only (`Arc`, no lock): metrics update themselves atomically.
pub fn router(registry: Arc<Registry>) -> Router {
    ops_router(Ops {
        registry,
        readiness: None,
    })
}

/// [`router`] plus `/readyz`: 200 `ready` while [`Readiness::check`] passes, else 503 with the
/// reason. `/healthz` stays a liveness probe that only says the process answers.
pub fn router_with_readiness(registry: Arc<Registry>, readiness: Readiness) -> Router {
    ops_router(Ops {
        registry,
        readiness: Some(readiness),
    })
}

fn ops_router(ops: Ops) -> Router {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }));
    let router = if ops.readiness.is_some() {
        router.route("/readyz", get(ready))
    } else {
        router
    };
    router.with_state(ops)
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    let outcome = match &ops.readiness {
        Some(readiness) => readiness.check().await,
        None => Ok(()),
    };
    match outcome {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => {
            tracing::warn!(reason = %why, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
        }
    }
}

/// Which exposition format a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    PrometheusText,
}

impl Format {
    /// Negotiates from an `Accept` header: OpenMetrics when the client ranks it at least as
    /// high as the text format (by `q`), the text format otherwise and when nothing is asked.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::PrometheusText;
        };
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::PrometheusText
        }
    }
}

/// Encodes `registry` and the shared families in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    encode_with(registry, None, format)
}

fn encode_with(
    registry: &Registry,
    extra: Option<&Registry>,
    format: Format,
) -> Result<String, std::fmt::Error> {
    use prometheus_client::encoding::text;
    let mut body = String::new();
    text::encode_registry(&mut body, registry)?;
    if let Some(extra) = extra {
        text::encode_registry(&mut body, extra)?;
    }
    text::encode_registry(&mut body, service_registry())?;
    text::encode_eof(&mut body)?;
    Ok(match format {
        Format::OpenMetrics => body,
        Format::PrometheusText => openmetrics_to_text(&body),
    })
}

/// Rewrites an OpenMetrics exposition as Prometheus text format 0.0.4: counter families are
/// named after their `_total` series, `info` becomes a gauge named `x_info`, `unknown` becomes
/// `untyped`, and `# UNIT`, `# EOF` and exemplars are dropped.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    use std::collections::HashMap;
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind.trim());
        }
    }
    let renamed = |name: &str| -> (String, &'static str) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), "counter"),
            Some("info") => (format!("{name}_info"), "gauge"),
            Some("gauge") => (name.to_owned(), "gauge"),
            Some("histogram") => (name.to_owned(), "histogram"),
            Some("summary") => (name.to_owned(), "summary"),
            _ => (name.to_owned(), "untyped"),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // Text 0.0.4 escapes only backslash and newline in HELP.
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {} {help}\n", renamed(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(name, _)| name);
            let (name, kind) = renamed(name);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else {
            // An exemplar follows the value after " # ".
            let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// `keel_ready`: 1 while the readiness check passes, 0 otherwise, checked on each scrape so
/// an alert can see what the kubelet sees.
async fn readiness_registry(readiness: &Readiness) -> Registry {
    let mut registry = Registry::default();
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(readiness.check().await.is_ok()));
    registry.register(
        "keel_ready",
        "1 while /readyz passes (database reachable, schema at the expected version), else 0",
        ready,
    );
    registry
}

async fn metrics(State(ops): State<Ops>, headers: HeaderMap) -> impl IntoResponse {
    // An Accept sent on several lines is one list (RFC 9110, 5.3); a line that is not text
    // asks for nothing.
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let format = Format::negotiate((!accept.is_empty()).then(|| accept.join(", ")).as_deref());
    let content_type = match format {
        Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        Format::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
    };
    let extra = match &ops.readiness {
        Some(readiness) => Some(readiness_registry(readiness).await),
        None => None,
    };
    match encode_with(&ops.registry, extra.as_ref(), format) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "could not encode metrics\n".to_owned(),
        ),
    }
}

/// Binds `addr`, returning the listener (so callers can learn the port when binding port 0).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_router(listener, router(registry), shutdown).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
pub async fn serve_with_readiness(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_router(
        listener,
        router_with_readiness(registry, readiness),
        shutdown,
    )
    .await
}

/// The operations listener running in a task of its own, with a stop signal of its own.
///
/// The first SIGTERM or SIGINT cancels the work loops' token; the listener is not tied to it,
/// so `/metrics`, `/healthz` and `/readyz` keep answering for the whole drain (FND-16) and a
/// scrape sees the drain's last counts. Stop it with [`OpsServer::stop`] once the loops are
/// done.
#[derive(Debug)]
pub struct OpsServer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    /// Serves `/metrics` and `/healthz` on `listener` until [`OpsServer::stop`].
    pub fn spawn(listener: TcpListener, registry: Arc<Registry>) -> Self {
        Self::spawn_router(listener, router(registry))
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until [`OpsServer::stop`].
    pub fn spawn_with_readiness(
        listener: TcpListener,
        registry: Arc<Registry>,
        readiness: Readiness,
    ) -> Self {
        Self::spawn_router(listener, router_with_readiness(registry, readiness))
    }

    fn spawn_router(listener: TcpListener, router: Router) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_router(listener, router, stop.clone()));
        Self { stop, task }
    }

    /// Stops the listener (after the work loops have drained) and waits until it has closed.
    pub async fn stop(self) -> std::io::Result<()> {
        self.stop.cancel();
        match self.task.await {
            Ok(outcome) => outcome,
            Err(e) => Err(std::io::Error::other(format!(
                "the operations listener task failed: {e}"
            ))),
        }
    }
}

async fn serve_router(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    keel_http_serve::serve(
        listener,
        router,
        shutdown,
        keel_http_serve::Limits::default(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn try_get_with(
        addr: SocketAddr,
        path: &str,
        accept: Option<&str>,
    ) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: keel\r\n{accept}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    async fn get_with(addr: SocketAddr, path: &str, accept: Option<&str>) -> String {
        try_get_with(addr, path, accept).await.unwrap()
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_with(addr, path, None).await
    }

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    fn sample_registry() -> Registry {
        let mut registry = Registry::default();
        let ticks = Counter::<u64>::default();
        registry.register("keel_test_ticks", "Ticks seen by the test", ticks.clone());
        ticks.inc_by(3);
        let seconds = Histogram::new([0.5, 1.0]);
        registry.register(
            "keel_test_seconds",
            "A \"quoted\" histogram",
            seconds.clone(),
        );
        seconds.observe(0.7);
        registry
    }

    /// FND-16: after the first signal cancels the work loops' token, the operations listener
    /// keeps answering `/metrics` and `/healthz` for the whole drain, showing what the drain
    /// counts; it closes only when stopped after the loops are done.
    #[tokio::test]
    async fn metrics_keep_serving_while_the_work_loops_drain() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::default();
        let drained = Counter::<u64>::default();
        registry.register("keel_test_drained", "Work drained", drained.clone());
        let ops = OpsServer::spawn(listener, Arc::new(registry));

        // A work loop: on the first signal it drains one item, then waits to be let go.
        let shutdown = CancellationToken::new();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (counted, count_seen) = tokio::sync::oneshot::channel::<()>();
        let work = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                drained.inc();
                let _ = counted.send(());
                let _ = released.await;
            }
        });
        shutdown.cancel(); // the first SIGTERM
        count_seen.await.unwrap();

        let during = get(addr, "/metrics").await;
        assert!(during.starts_with("HTTP/1.1 200"), "{during}");
        assert!(during.contains("keel_test_drained_total 1"), "{during}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));

        release.send(()).unwrap();
        work.await.unwrap();
        ops.stop().await.unwrap();
        assert_closed(addr, "keel_test_drained_total").await;
    }

    /// Nothing of the stopped server answers at `addr`: the connection is refused or, when a
    /// listener of a test running beside this one has been given the freed port since, what
    /// answers there does not show `marker` (a metric only the stopped server had).
    async fn assert_closed(addr: SocketAddr, marker: &str) {
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            try_get_with(addr, "/metrics", None),
        )
        .await;
        if let Ok(Ok(response)) = answer {
            assert!(
                !response.contains(marker),
                "the stopped server still answers: {response}"
            );
        }
    }

    #[tokio::test]
    async fn serves_both_formats_and_health_until_shutdown() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(sample_registry()),
            shutdown.clone(),
        ));

        let metrics = get_with(addr, "/metrics", Some(PROMETHEUS_ACCEPT)).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains(OPENMETRICS_CONTENT_TYPE), "{metrics}");
        assert!(
            metrics.contains("# HELP keel_test_ticks Ticks"),
            "{metrics}"
        );
        assert!(metrics.contains("keel_test_ticks_total 3"), "{metrics}");
        assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");

        let text = get(addr, "/metrics").await;
        assert!(text.contains(PROMETHEUS_TEXT_CONTENT_TYPE), "{text}");
        assert!(
            text.contains("# HELP keel_test_ticks_total Ticks"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE keel_test_ticks_total counter"),
            "{text}"
        );
        assert!(text.contains("keel_test_ticks_total 3"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");

        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the listener did not stop on shutdown")
            .unwrap()
            .unwrap();
    }

    /// OPS-5: every family in the text format has HELP and TYPE under the name its samples
    /// carry, so `promtool check metrics` finds help text for counters.
    #[test]
    fn text_format_names_every_family_after_its_samples() {
        let text = encode(&sample_registry(), Format::PrometheusText).unwrap();
        let mut helped = std::collections::HashSet::new();
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                typed.insert(name.to_owned(), kind.to_owned());
            } else {
                assert!(!line.starts_with('#'), "unexpected comment: {line}");
                let series = line.split(['{', ' ']).next().unwrap();
                let family = typed
                    .keys()
                    .find(|family| {
                        series == family.as_str()
                            || (typed[family.as_str()] == "histogram"
                                && ["_bucket", "_sum", "_count"]
                                    .iter()
                                    .any(|s| series == format!("{family}{s}")))
                    })
                    .unwrap_or_else(|| panic!("{series} has no TYPE line:\n{text}"));
                assert!(helped.contains(family), "{family} has no HELP:\n{text}");
            }
        }
        assert_eq!(typed["keel_test_ticks_total"], "counter");
        assert_eq!(typed["keel_test_seconds"], "histogram");
        assert_eq!(typed["keel_build_info"], "gauge");
        assert_eq!(typed["process_cpu_seconds_total"], "counter");
        assert!(
            text.contains("# HELP keel_test_seconds A \"quoted\" histogram"),
            "{text}"
        );
    }

    #[test]
    fn info_unknown_units_and_exemplars_are_rewritten_for_the_text_format() {
        let openmetrics = "# HELP up_since Start.\n# TYPE up_since gauge\n# UNIT up_since seconds\nup_since 5\n# HELP v Version.\n# TYPE v info\nv_info{version=\"1\"} 1\n# HELP odd Odd.\n# TYPE odd unknown\nodd 1\n# HELP c Count.\n# TYPE c counter\nc_total 2 # {trace_id=\"x\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP up_since Start.\n# TYPE up_since gauge\nup_since 5\n# HELP v_info Version.\n# TYPE v_info gauge\nv_info{version=\"1\"} 1\n# HELP odd Odd.\n# TYPE odd untyped\nodd 1\n# HELP c_total Count.\n# TYPE c_total counter\nc_total 2\n"
        );
    }

    #[test]
    fn negotiation_follows_the_accept_header() {
        for (accept, expected) in [
            (None, Format::PrometheusText),
            (Some("*/*"), Format::PrometheusText),
            (Some("text/plain"), Format::PrometheusText),
            (Some(PROMETHEUS_ACCEPT), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("application/openmetrics-text;q=0.2,text/plain;q=0.9"),
                Format::PrometheusText,
            ),
            (
                Some("application/openmetrics-text;q=0"),
                Format::PrometheusText,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
        }
    }

    /// A scrape whose Accept is sent on two lines is negotiated on both.
    #[tokio::test]
    async fn an_accept_header_on_two_lines_is_one_list() {
        let mut headers = HeaderMap::new();
        headers.append(header::ACCEPT, "text/plain;q=0.1".parse().unwrap());
        headers.append(
            header::ACCEPT,
            "application/openmetrics-text".parse().unwrap(),
        );
        let ops = Ops {
            registry: Arc::new(Registry::default()),
            readiness: None,
        };
        let response = metrics(State(ops), headers).await.into_response();
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE).unwrap(),
            OPENMETRICS_CONTENT_TYPE
        );
    }

    /// OPS-9: every scrape carries the build info and the process families.
    #[test]
    fn every_scrape_carries_build_info_and_process_metrics() {
        let text = encode(&Registry::default(), Format::OpenMetrics).unwrap();
        let build = format!(
            "keel_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            crate::cli::COMMIT
        );
        assert!(text.contains(&build), "{text}");
        for family in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(family)),
                "{family}missing:\n{text}"
            );
        }
    }

    /// Serves an empty registry with `readiness` on a free port: its address, the token that
    /// stops it, and the server task.
    async fn serving(
        readiness: Readiness,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_readiness(
            listener,
            Arc::new(Registry::default()),
            readiness,
            shutdown.clone(),
        ));
        (addr, shutdown, server)
    }

    /// A process configured to depend on nothing (the disabled orphan sweep) answers `/readyz`
    /// 200, so its Deployment rolls out instead of waiting forever on a probe it cannot pass.
    #[tokio::test]
    async fn a_process_without_dependencies_is_ready() {
        let ready = Readiness::without_dependencies();
        assert_eq!(ready.check().await, Ok(()));
        let (addr, shutdown, server) = serving(ready).await;
        let response = get(addr, "/readyz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    /// A binary serving as the least-privilege application role (`migrate --app-role`) is
    /// ready: the grant includes reading the applied schema version. A role without that grant
    /// is told so, not that the database is unreachable.
    #[tokio::test]
    async fn the_application_role_granted_by_migrate_is_ready() {
        let db = keel_testkit::role_split_database().await;
        assert_eq!(Readiness::new(db.app().clone()).check().await, Ok(()));
        let refused = sqlx::query("DELETE FROM _keel_migrations")
            .execute(db.app())
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("permission denied"),
            "{refused}"
        );
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "REVOKE SELECT ON _keel_migrations FROM \"{}\"",
            db.app_role().as_str()
        )))
        .execute(db.owner())
        .await
        .unwrap();
        assert_eq!(
            Readiness::new(db.app().clone()).check().await,
            Err(NotReady::SchemaUnreadable)
        );
    }

    /// OPS-6: `/readyz` is 200 on a migrated database, 503 naming the cause on a database at
    /// another schema version and on one that cannot be reached.
    #[tokio::test]
    async fn readyz_reflects_the_database_and_the_schema_version() {
        let db = keel_testkit::database().await;
        let ready = Readiness::new(db.pool().clone());
        assert_eq!(ready.check().await, Ok(()));

        let expected = keel_schema::latest_version() + 1;
        let behind = Readiness::new(db.pool().clone()).expecting_version(expected);
        let found = behind.check().await;
        assert_eq!(
            found.clone(),
            Err(NotReady::WrongVersion {
                found: keel_schema::latest_version(),
                expected
            })
        );
        assert!(
            found.unwrap_err().to_string().ends_with("run `migrate`"),
            "a schema behind the binary is migrated"
        );
        // A schema a newer release migrated: `migrate` cannot help (this binary does not know
        // the newer migrations), so the cause says which release to deploy.
        let older_binary =
            Readiness::new(db.pool().clone()).expecting_version(keel_schema::latest_version() - 1);
        let message = older_binary.check().await.unwrap_err().to_string();
        assert!(
            message.contains("newer than this binary") && !message.contains("run `migrate`"),
            "{message}"
        );

        let empty = keel_testkit::empty_database().await;
        assert_eq!(
            Readiness::new(empty.pool().clone()).check().await,
            Err(NotReady::NotMigrated {
                expected: keel_schema::latest_version()
            })
        );

        let gone = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy("postgres://keel:pw@127.0.0.1:1/none")
            .unwrap();
        assert_eq!(
            Readiness::new(gone).check().await,
            Err(NotReady::DatabaseUnreachable)
        );

        let (addr, shutdown, server) = serving(behind).await;
        let answer = get(addr, "/readyz").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("run `migrate`"), "{answer}");
        let scrape = get(addr, "/metrics").await;
        assert!(scrape.contains("\nkeel_ready 0\n"), "{scrape}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        server.await.unwrap().unwrap();

        let (addr, shutdown, server) = serving(ready).await;
        let answer = get(addr, "/readyz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let scrape = get(addr, "/metrics").await;
        assert!(scrape.contains("\nkeel_ready 1\n"), "{scrape}");
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
