//! The HTTP API: `POST /v1/resources`, `GET /v1/resources/{id}`, `DELETE /v1/resources/{id}`,
//! plus `/metrics` and `/healthz` on the same listener.
//!
//! Every error is an [`ErrorEnvelope`] with its agent action; a 503 carries `Retry-After`. The
//! 201 is built only from a [`keel_provision::Provisioned`] (through [`ProvisionedBody`]), and is
//! the one response that shows the connection URL.

use std::collections::BTreeSet;
use std::str::FromStr as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_audit::{Actor, RequestId, ResourceId, ResourceType, TeamId, Tier};
use keel_provision::{
    Backend, DeprovisionCause, DeprovisionReason, DeprovisionTarget, Deprovisioned, DocsBase,
    ErrorCode, ErrorEnvelope, ProvisionRequest, Provisioned, ProvisionedBody, Provisioner,
    ResourceStore,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What the handlers share.
pub struct AppState<S, B> {
    /// The provisioner.
    pub provisioner: Provisioner<S, B>,
    /// The error docs base for agent actions.
    pub docs: DocsBase,
    /// The tiers this platform sells.
    pub tiers: BTreeSet<String>,
}

/// The API router merged with an operations router (`/metrics`, `/healthz`, `/readyz`).
pub fn router_with_ops<S, B>(state: Arc<AppState<S, B>>, ops: Router) -> Router
where
    S: ResourceStore + 'static,
    B: Backend + 'static,
{
    Router::new()
        .route("/v1/resources", post(create::<S, B>))
        .route(
            "/v1/resources/{id}",
            get(read::<S, B>).delete(delete::<S, B>),
        )
        .with_state(state)
        .merge(ops)
}

/// The request id from `X-Request-Id` when it is a valid one, else a fresh one.
fn request_id(headers: &HeaderMap) -> RequestId {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| RequestId::parse(v).ok())
        .unwrap_or_else(|| {
            RequestId::parse(&format!("req-{}", uuid::Uuid::new_v4().simple()))
                .expect("req- and 32 hex digits is a valid request id")
        })
}

fn actor(headers: &HeaderMap) -> Actor {
    headers
        .get("x-keel-actor")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Actor::parse(v).ok())
        .unwrap_or_else(|| Actor::parse("api").expect("`api` is a valid actor"))
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn error_response(
    code: ErrorCode,
    message: impl Into<String>,
    request_id: &RequestId,
    docs: &DocsBase,
) -> Response {
    let envelope = ErrorEnvelope::new(code, message, request_id.as_str(), docs);
    let status = StatusCode::from_u16(envelope.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &envelope);
    if let Some(retry_after) = envelope
        .retry_after_header()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

/// The only place a 201 is built, and it takes a [`Provisioned`].
fn created(provisioned: Provisioned) -> Response {
    json_response(StatusCode::CREATED, &ProvisionedBody::from(provisioned))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    team_id: String,
    resource_type: String,
    tier: String,
}

async fn create<S: ResourceStore + 'static, B: Backend + 'static>(
    State(state): State<Arc<AppState<S, B>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let body: CreateBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        // The parser's message can quote the input, so only its position is shown.
        Err(e) => {
            return fail(
                ErrorCode::InvalidRequest,
                &format!(
                    "the body is not a JSON object {{team_id, resource_type, tier}} ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            );
        }
    };
    let Ok(team_id) = TeamId::from_str(&body.team_id) else {
        return fail(ErrorCode::InvalidRequest, "team_id must be a UUID");
    };
    let Ok(resource_type) = ResourceType::from_str(&body.resource_type) else {
        return fail(
            ErrorCode::UnknownResourceType,
            "resource_type must be postgres, redis or namespace",
        );
    };
    let tier = match Tier::parse(&body.tier) {
        Ok(tier) if state.tiers.contains(tier.as_str()) => tier,
        Ok(_) | Err(_) => {
            let known: Vec<&str> = state.tiers.iter().map(String::as_str).collect();
            return fail(
                ErrorCode::UnknownTier,
                &format!("tier must be one of {}", known.join(", ")),
            );
        }
    };
    let request = ProvisionRequest {
        team_id,
        resource_type,
        tier,
        request_id: request_id.clone(),
        actor: actor(&headers),
    };
    // Its own task: a client that disconnects mid-flow must not cut provisioning short between
    // create and finalize (dropping the handler's future would leave the object unfinalized).
    let flow = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            state
                .provisioner
                .provision(request, OffsetDateTime::now_utc())
                .await
        })
    };
    match flow.await {
        Ok(Ok(provisioned)) => created(provisioned),
        Ok(Err(e)) => fail(e.code(), &e.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "the provisioning task failed");
            fail(ErrorCode::Internal, "the provisioning task failed")
        }
    }
}

fn parse_id(id: &str) -> Option<ResourceId> {
    ResourceId::from_str(id).ok()
}

#[derive(serde::Serialize)]
struct ResourceView {
    ok: bool,
    id: String,
    team_id: String,
    resource_type: &'static str,
    tier: String,
    status: &'static str,
    created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted_at: Option<String>,
}

async fn read<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let Some(id) = parse_id(&id) else {
        return fail(ErrorCode::InvalidRequest, "the resource id must be a UUID");
    };
    match state.provisioner.store().get(id).await {
        Ok(Some(record)) => json_response(
            StatusCode::OK,
            &ResourceView {
                ok: true,
                id: record.id.to_string(),
                team_id: record.team_id.to_string(),
                resource_type: record.resource_type.as_str(),
                tier: record.tier.as_str().to_owned(),
                status: record.status.as_str(),
                created_at: record.created_at.format(&Rfc3339).unwrap_or_default(),
                deleted_at: record.deleted_at.and_then(|at| at.format(&Rfc3339).ok()),
            },
        ),
        Ok(None) => fail(ErrorCode::ResourceNotFound, "no resource has this id"),
        Err(e) => {
            tracing::error!(error = %e, "could not read a resource");
            fail(ErrorCode::DbError, "could not read the resource")
        }
    }
}

/// The `reason` parameter of a query string (its values are plain words: no decoding needed).
fn reason_param(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("reason="))
}

#[derive(serde::Serialize)]
struct DeletedView {
    ok: bool,
    id: String,
    status: &'static str,
    outcome: &'static str,
}

async fn delete<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let Some(id) = parse_id(&id) else {
        return fail(ErrorCode::InvalidRequest, "the resource id must be a UUID");
    };
    let reason = match reason_param(query.as_deref()) {
        None => DeprovisionReason::CustomerRequest,
        Some(reason) => match DeprovisionReason::parse(reason) {
            // The orphan reason belongs to the orphan sweep, not to a resource by id.
            Some(DeprovisionReason::Orphan) | None => {
                return fail(
                    ErrorCode::InvalidRequest,
                    "reason must be customer_request, expired or operator",
                );
            }
            Some(reason) => reason,
        },
    };
    let cause = DeprovisionCause {
        reason,
        actor: actor(&headers),
        request_id: Some(request_id.clone()),
    };
    match state
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(id),
            &cause,
            OffsetDateTime::now_utc(),
        )
        .await
    {
        Ok(done) => {
            let outcome = match done {
                Deprovisioned::Retired => "deprovisioned",
                Deprovisioned::AlreadyRetired
                | Deprovisioned::OrphanReclaimed
                | Deprovisioned::OrphanAbsent => "already_deprovisioned",
            };
            json_response(
                StatusCode::OK,
                &DeletedView {
                    ok: true,
                    id: id.to_string(),
                    status: "deleted",
                    outcome,
                },
            )
        }
        Err(e) => fail(e.code(), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use keel_audit::AuditKind;
    use keel_audit::postgres::{AuditFilter, fetch};
    use keel_provision::ProvisionMetrics;
    use keel_provision::fault::{FaultyStore, StoreStep};
    use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
    use keel_testkit::TestDatabase;
    use prometheus_client::registry::Registry;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::backends::Backends;

    type Store = FaultyStore<PgResourceStore>;

    /// A running API on a fresh migrated database with one team.
    struct Api {
        addr: SocketAddr,
        db: TestDatabase,
        team: TeamId,
        state: Arc<AppState<Store, Backends>>,
        stop: CancellationToken,
    }

    impl Drop for Api {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn api() -> Api {
        let db = keel_testkit::database().await;
        let team = TeamId::from_uuid(db.team("pro").await);
        let mut registry = Registry::default();
        let metrics = ProvisionMetrics::register(&mut registry);
        let backends = Backends {
            postgres: Some(PgClusterBackend::new(db.server().admin_options(), None, 4)),
            namespaces: None,
        };
        let state = Arc::new(AppState {
            provisioner: Provisioner::new(
                FaultyStore::new(PgResourceStore::new(db.pool().clone())),
                backends,
                metrics,
            ),
            docs: DocsBase::parse("https://keel.dev/docs/errors").unwrap(),
            tiers: ["free", "pro"].into_iter().map(String::from).collect(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = router_with_ops(
            state.clone(),
            keel_service::http::router(Arc::new(registry)),
        );
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
                .unwrap();
        });
        Api {
            addr,
            db,
            team,
            state,
            stop,
        }
    }

    struct Answer {
        status: u16,
        head: String,
        body: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
        }
    }

    impl Api {
        async fn call(&self, method: &str, path: &str, body: &str) -> Answer {
            let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
                 X-Request-Id: req-test-1\r\nX-Keel-Actor: agent:test\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            let (head, body) = raw.split_once("\r\n\r\n").unwrap();
            let status = head[9..12].parse().unwrap();
            Answer {
                status,
                head: head.to_owned(),
                body: body.to_owned(),
            }
        }

        fn create_body(&self, resource_type: &str, tier: &str) -> String {
            json!({"team_id": self.team.to_string(), "resource_type": resource_type, "tier": tier})
                .to_string()
        }

        async fn database_exists(&self, name: &str) -> bool {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(self.db.pool())
                .await
                .unwrap()
        }

        async fn provider_ids(&self) -> Vec<String> {
            sqlx::query_scalar("SELECT 'cust_' || token FROM resources ORDER BY created_at")
                .fetch_all(self.db.pool())
                .await
                .unwrap()
        }
    }

    fn assert_envelope(answer: &Answer, status: u16, code: &str) {
        assert_eq!(answer.status, status, "{}", answer.body);
        let body = answer.json();
        assert_eq!(body["ok"], false);
        assert_eq!(body["error"], code, "{body}");
        assert_eq!(body["status"], status);
        assert_eq!(body["request_id"], "req-test-1");
        assert!(
            body["agent_action"]
                .as_str()
                .unwrap()
                .starts_with("Tell the user"),
            "{body}"
        );
        assert!(body["type"].as_str().unwrap().starts_with("https://"));
    }

    #[tokio::test]
    async fn provisions_reads_and_deprovisions_a_real_database_over_http() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        assert!(
            created
                .head
                .to_lowercase()
                .contains("cache-control: no-store")
        );
        let body = created.json();
        let id = body["id"].as_str().unwrap().to_owned();
        let url = body["connection_url"].as_str().unwrap().to_owned();
        let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
        let mut customer: sqlx::PgConnection =
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
                .await
                .unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut customer)
            .await
            .unwrap();
        assert_eq!(one, 1);
        drop(customer);

        let read = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(read.status, 200);
        assert_eq!(read.json()["status"], "active");
        assert!(
            read.json().get("connection_url").is_none(),
            "shown once only"
        );
        let password = url.split(':').nth(2).unwrap().split('@').next().unwrap();
        assert!(!read.body.contains(password));

        let name = api.provider_ids().await.remove(0);
        assert!(api.database_exists(&name).await);
        let deleted = api
            .call(
                "DELETE",
                &format!("/v1/resources/{id}?reason=customer_request"),
                "",
            )
            .await;
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        assert_eq!(deleted.json()["outcome"], "deprovisioned");
        assert!(!api.database_exists(&name).await);
        let again = api.call("DELETE", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(again.json()["outcome"], "already_deprovisioned");
        let read = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(read.json()["status"], "deleted");

        let mut conn = api.db.pool().acquire().await.unwrap();
        let kinds: Vec<AuditKind> = fetch(&mut conn, &AuditFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|stored| stored.event.kind())
            .collect();
        assert_eq!(
            kinds,
            [
                AuditKind::ProvisionCreated,
                AuditKind::ResourceDeprovisioned
            ]
        );
        let metrics = api.call("GET", "/metrics", "").await;
        assert!(
            metrics.body.contains(
                "instant_provision_outcomes_total{resource_type=\"postgres\",outcome=\"provisioned\"} 1"
            ),
            "{}",
            metrics.body
        );
        assert_eq!(api.call("GET", "/healthz", "").await.status, 200);
    }

    #[tokio::test]
    async fn bad_input_gets_a_4xx_envelope_never_a_panic_or_a_500() {
        let api = api().await;
        let team = api.team.to_string();
        let cases: Vec<(&str, String, String, u16, &str)> = vec![
            ("POST", "/v1/resources".into(), "{not json".into(), 400, "invalid_request"),
            ("POST", "/v1/resources".into(), "".into(), 400, "invalid_request"),
            ("POST", "/v1/resources".into(), "[1,2]".into(), 400, "invalid_request"),
            (
                "POST",
                "/v1/resources".into(),
                json!({"team_id": team, "resource_type": "postgres"}).to_string(),
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/v1/resources".into(),
                json!({"team_id": team, "resource_type": "postgres", "tier": "pro", "x": 1})
                    .to_string(),
                400,
                "invalid_request",
            ),
            (
                "POST",
                "/v1/resources".into(),
                json!({"team_id": "nope", "resource_type": "postgres", "tier": "pro"}).to_string(),
                400,
                "invalid_request",
            ),
            ("POST", "/v1/resources".into(), api.create_body("mysql", "pro"), 400, "unknown_resource_type"),
            // Known, but this deployment has no Kubernetes backend.
            ("POST", "/v1/resources".into(), api.create_body("redis", "pro"), 400, "unknown_resource_type"),
            ("POST", "/v1/resources".into(), api.create_body("postgres", "platinum"), 400, "unknown_tier"),
            ("POST", "/v1/resources".into(), api.create_body("postgres", "NOT A TIER"), 400, "unknown_tier"),
            (
                "POST",
                "/v1/resources".into(),
                json!({"team_id": TeamId::new_random().to_string(), "resource_type": "postgres", "tier": "pro"})
                    .to_string(),
                404,
                "team_not_found",
            ),
            ("GET", "/v1/resources/not-a-uuid".into(), "".into(), 400, "invalid_request"),
            ("GET", format!("/v1/resources/{}", ResourceId::new_random()), "".into(), 404, "resource_not_found"),
            ("DELETE", format!("/v1/resources/{}", ResourceId::new_random()), "".into(), 404, "resource_not_found"),
            (
                "DELETE",
                format!("/v1/resources/{}?reason=drop_everything", ResourceId::new_random()),
                "".into(),
                400,
                "invalid_request",
            ),
            (
                "DELETE",
                format!("/v1/resources/{}?reason=orphan", ResourceId::new_random()),
                "".into(),
                400,
                "invalid_request",
            ),
        ];
        for (method, path, body, status, code) in cases {
            let answer = api.call(method, &path, &body).await;
            assert_envelope(&answer, status, code);
        }
        assert!(api.provider_ids().await.is_empty(), "nothing was reserved");
    }

    #[tokio::test]
    async fn a_finalize_failure_answers_503_with_retry_after_and_leaves_no_database() {
        let api = api().await;
        api.state.provisioner.store().fail(StoreStep::Activate, 1);
        let answer = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_envelope(&answer, 503, "provision_failed");
        assert!(
            answer.head.to_lowercase().contains("retry-after: 5"),
            "{}",
            answer.head
        );
        let body = answer.json();
        assert_eq!(body["retry_after_seconds"], 5);
        assert!(
            body["agent_action"]
                .as_str()
                .unwrap()
                .contains("exponential backoff")
        );
        assert!(body.get("connection_url").is_none());
        let name = api.provider_ids().await.remove(0);
        assert!(!api.database_exists(&name).await, "torn down");
        let status: String = sqlx::query_scalar("SELECT status FROM resources")
            .fetch_one(api.db.pool())
            .await
            .unwrap();
        assert_eq!(status, "failed");
    }
}
