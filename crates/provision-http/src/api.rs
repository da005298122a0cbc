//! The handlers: `POST` and `GET /v1/resources`, `GET` and `DELETE /v1/resources/{id}`,
//! `POST /v1/resources/{id}/rotate-credentials`, and `GET /openapi.json`.
//!
//! **Keys.** Every `/v1` route needs `Authorization: Bearer <API key>`; a request without a live
//! key answers `unauthorized` (401). A team key sees and changes only its team's resources:
//! another team's resource answers `resource_not_found` (404, so ids do not leak), another team
//! in a body `team_not_found`. Only operator keys may delete with `reason=operator|expired`
//! (`forbidden`, 403). The audit actor is the key's principal ([`Principal::actor`]); no header
//! names it. Each key is rate limited ([`Limits::requests_per_minute`]; 429 with `Retry-After`).
//!
//! Every error — the handlers' own, the framework's (404, 405, 413, 415, a malformed path) and
//! a panic — is one [`ErrorEnvelope`] served as `application/problem+json`, with its agent
//! action and `instance`; a 503 carries `Retry-After`. The 201 is built only from a
//! [`keel_provision::Provisioned`] (through [`ProvisionedBody`]), carries `Location`, and is the
//! one response besides a rotation that shows a password (stored nowhere). Bodies are limited
//! to [`BODY_LIMIT`] bytes and must be `application/json`.
//!
//! Each provisioning runs in a task of its own, tracked by the state's [`TaskTracker`]: a
//! client that disconnects does not cut it short, and [`serve`] drains the tracker on shutdown
//! within a deadline. The task also writes the outcome of its `Idempotency-Key`, so a client
//! that timed out finds it when it retries.
//!
//! **Admission and deadlines.** At most [`AppState::admission`]'s permits of provisionings run at
//! once; past that a POST answers `too_many_provisions` (503, `Retry-After`) before anything is
//! reserved. A team holding [`Limits::team_quota`] live resources is answered
//! `quota_exceeded`. Every request is answered by [`AppState::deadline`]: a GET or DELETE that is
//! still waiting answers `backend_unavailable`; a POST whose flow is still running answers
//! `provision_pending` naming the reserved resource (GET it until `active` or `failed`) — never
//! "failed", since the flow goes on in its task and may yet finalize.

use std::any::Any;
use std::collections::BTreeSet;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_audit::{RequestId, ResourceId, ResourceType, TeamId, Tier};
use keel_provision::{
    Backend, DeprovisionCause, DeprovisionReason, DeprovisionTarget, Deprovisioned, DocsBase,
    ErrorChain, ErrorCode, ErrorEnvelope, PROBLEM_JSON, ProvisionRequest, ProvisionedBody,
    Provisioner, ResourceStatus, ResourceStore, RotateError,
};
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::idempotency::{self, Claim, IdempotencyKey, Slot};
use crate::keys::{self, Principal};
use crate::limits::{Limits, RateLimiter};

/// The largest request body accepted: the create body is three short fields.
pub const BODY_LIMIT: usize = 4 * 1024;

/// What the handlers share.
pub struct AppState<S, B> {
    /// The provisioner.
    pub provisioner: Provisioner<S, B>,
    /// The error docs base for agent actions (and the envelopes' `type`).
    pub docs: DocsBase,
    /// The tiers this platform sells.
    pub tiers: BTreeSet<String>,
    /// The provisioning tasks in flight (drained on shutdown).
    pub tracker: TaskTracker,
    /// How long a request may wait before it is answered: a GET or DELETE then answers 503
    /// `backend_unavailable`, a POST whose flow goes on answers 503 `provision_pending` with the
    /// reserved resource's id.
    pub deadline: Duration,
    /// One permit per provisioning in flight; a POST that finds none is refused before anything
    /// is reserved.
    pub admission: Arc<tokio::sync::Semaphore>,
    /// The platform database: API keys, idempotency keys, listings and quotas.
    pub pool: PgPool,
    /// Permits to hold one of `pool`'s connections while waiting for another (a team's quota
    /// lock, held until its reservation is written; the stale-pending reconciler's lock, held
    /// for its tick). At most half the pool ([`lock_holders_for`]): those who hold one connection
    /// and wait for a second then always find one, however many POSTs arrive at once.
    pub lock_holders: Arc<tokio::sync::Semaphore>,
    /// Rate limit, team quota, idempotency retention.
    pub limits: Limits,
    /// The per-key token buckets.
    pub rate: RateLimiter,
}

impl<S: ResourceStore, B: Backend> AppState<S, B> {
    /// A state with the defaults of `keel-provision-api serve`: tiers free, hobby, pro and team,
    /// a 30 s request deadline, 32 provisionings in flight, [`Limits::default`], and error docs
    /// under `https://keel.dev/docs/errors`. Every field is public: change what differs.
    pub fn new(provisioner: Provisioner<S, B>, pool: PgPool) -> Self {
        Self {
            lock_holders: lock_holders_for(&pool),
            provisioner,
            docs: DocsBase::parse("https://keel.dev/docs/errors")
                .expect("the default docs base is a short https URL"),
            tiers: ["free", "hobby", "pro", "team"]
                .into_iter()
                .map(String::from)
                .collect(),
            tracker: TaskTracker::new(),
            deadline: Duration::from_secs(30),
            admission: Arc::new(tokio::sync::Semaphore::new(32)),
            pool,
            limits: Limits::default(),
            rate: RateLimiter::new(),
        }
    }

    /// The resource types this deployment offers, comma-separated.
    fn offered_types(&self) -> String {
        ResourceType::ALL
            .iter()
            .filter(|t| self.provisioner.backend().supports(**t))
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The API router: every `/v1` route behind an API key, `/openapi.json` open, every error an
/// envelope. Mount it under a prefix with [`Router::nest`]; `Location` headers follow the prefix.
pub fn router<S, B>(state: Arc<AppState<S, B>>) -> Router
where
    S: ResourceStore + 'static,
    B: Backend + 'static,
{
    let docs = state.docs.clone();
    let api = Router::new()
        .route("/v1/resources", post(create::<S, B>).get(list::<S, B>))
        .route(
            "/v1/resources/{id}",
            get(read::<S, B>).delete(delete::<S, B>),
        )
        .route(
            "/v1/resources/{id}/rotate-credentials",
            post(rotate::<S, B>),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate::<S, B>,
        ))
        .route("/openapi.json", get(openapi::<S, B>))
        .with_state(state);
    with_envelopes(api, docs)
}

/// Wraps `router` so that unknown paths, wrong methods, oversized bodies and panics answer with
/// the envelope too.
fn with_envelopes(router: Router, docs: DocsBase) -> Router {
    let not_found = {
        let docs = docs.clone();
        move |headers: HeaderMap| {
            let docs = docs.clone();
            async move {
                error_response(
                    ErrorCode::RouteNotFound,
                    "no route has this path",
                    &request_id(&headers),
                    &docs,
                )
            }
        }
    };
    let not_allowed = {
        let docs = docs.clone();
        move |headers: HeaderMap| {
            let docs = docs.clone();
            async move {
                error_response(
                    ErrorCode::MethodNotAllowed,
                    "this path does not answer this method",
                    &request_id(&headers),
                    &docs,
                )
            }
        }
    };
    let panicked = move |_: Box<dyn Any + Send + 'static>| {
        tracing::error!("a request handler panicked");
        // The id the request's span (and so the log line above) carries, which support is
        // told to look for; a fresh one only outside a request's span.
        let id = REQUEST_ID
            .try_with(RequestId::clone)
            .unwrap_or_else(|_| fresh_request_id());
        error_response(
            ErrorCode::Internal,
            "the request failed unexpectedly",
            &id,
            &docs,
        )
    };
    router
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(in_request_span))
}

tokio::task_local! {
    /// The id of the request being handled, set by [`in_request_span`]: what a panic's
    /// envelope names.
    static REQUEST_ID: RequestId;
}

/// Runs a request inside a `request` span carrying its `request_id`, `method`, `route` (the
/// matched route's template, never the path itself, nor any header or body) and, once
/// authenticated, its `key_id`, so every log line written while handling it carries them. A
/// request without a valid `X-Request-Id` is given a fresh one here, once, so the span and the
/// response's envelope name the same id.
async fn in_request_span(mut request: axum::extract::Request, next: Next) -> Response {
    let id = request_id(request.headers());
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        request.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!(
        "request",
        request_id = id.as_str(),
        method = request.method().as_str(),
        route = route.as_str(),
        key_id = tracing::field::Empty,
    );
    REQUEST_ID
        .scope(id, next.run(request))
        .instrument(span)
        .await
}

/// Authenticates the request's API key, applies its rate limit, and hands the handlers its
/// [`Principal`].
async fn authenticate<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    mut request: axum::extract::Request,
    next: Next,
) -> Response {
    let request_id = request_id(request.headers());
    let unauthorized = |message: &str| {
        let mut response =
            error_response(ErrorCode::Unauthorized, message, &request_id, &state.docs);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    };
    // Two keys in one request are refused, whichever of them is valid.
    let Ok(authorization) = single_header(request.headers(), "authorization") else {
        return unauthorized("send one Authorization header, with one API key");
    };
    let presented = authorization.and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, key) = v.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| key.trim().to_owned())
    });
    let Some(presented) = presented else {
        return unauthorized("send an API key as Authorization: Bearer <key>");
    };
    let checked =
        tokio::time::timeout(state.deadline, keys::authenticate(&state.pool, &presented)).await;
    let principal = match checked {
        Ok(Ok(Some(principal))) => principal,
        Ok(Ok(None)) => return unauthorized("the API key is unknown, malformed or revoked"),
        Ok(Err(e)) => {
            tracing::error!(error = %ErrorChain(&e), "could not check an API key");
            return error_response(
                ErrorCode::BackendUnavailable,
                "could not check the API key",
                &request_id,
                &state.docs,
            );
        }
        Err(_) => {
            tracing::error!("checking an API key exceeded the request deadline");
            return error_response(
                ErrorCode::BackendUnavailable,
                "checking the API key took too long",
                &request_id,
                &state.docs,
            );
        }
    };
    tracing::Span::current().record("key_id", principal.key_id().as_str());
    if let Err(wait) = state.rate.take(
        principal.key_id().as_str(),
        state.limits.requests_per_minute,
        tokio::time::Instant::now(),
    ) {
        let seconds = u32::try_from(wait.as_secs().saturating_add(1)).unwrap_or(u32::MAX);
        let mut envelope = ErrorEnvelope::new(
            ErrorCode::RateLimited,
            format!(
                "this key may make {} requests a minute; nothing was done",
                state.limits.requests_per_minute
            ),
            request_id.as_str(),
            &state.docs,
        );
        envelope.retry_after_seconds = Some(seconds);
        return envelope_response(&envelope);
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Serves `router` on `listener` until `shutdown`, then waits up to `drain` for the
/// provisionings still in flight in `tracker` (a client that gave up does not keep its
/// connection open, so the listener alone would not wait for it). What outlives the deadline is
/// logged; its `pending` row is settled by the reconciler.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    // Each request head within its deadline, and the connections still open at shutdown given
    // the same drain as the provisionings.
    let limits = keel_http_serve::Limits {
        shutdown_grace: drain,
        ..keel_http_serve::Limits::default()
    };
    keel_http_serve::serve(listener, router, shutdown, limits).await?;
    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            "waiting for provisionings in flight before stopping"
        );
    }
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::error!(
            in_flight = tracker.len(),
            "provisionings still in flight at the shutdown deadline; their pending rows are left to the reconciler"
        );
    }
    Ok(())
}

fn fresh_request_id() -> RequestId {
    RequestId::parse(&format!("req-{}", uuid::Uuid::new_v4().simple()))
        .expect("req- and 32 hex digits is a valid request id")
}

/// The header a client names its request id in.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// The header a client names its idempotency key in.
const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The request id from `X-Request-Id` when it is one valid id on one field line, else a fresh
/// one: of two ids sent, neither is the request's, so neither labels its logs and answer.
fn request_id(headers: &HeaderMap) -> RequestId {
    single_header(headers, REQUEST_ID_HEADER)
        .ok()
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| RequestId::parse(v).ok())
        .unwrap_or_else(fresh_request_id)
}

fn json_response(
    status: StatusCode,
    content_type: &'static str,
    body: &impl serde::Serialize,
) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn envelope_response(envelope: &ErrorEnvelope) -> Response {
    let status = StatusCode::from_u16(envelope.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, PROBLEM_JSON, envelope);
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

fn error_response(
    code: ErrorCode,
    message: impl Into<String>,
    request_id: &RequestId,
    docs: &DocsBase,
) -> Response {
    envelope_response(&ErrorEnvelope::new(
        code,
        message,
        request_id.as_str(),
        docs,
    ))
}

fn with_location(mut response: Response, location: &str) -> Response {
    if let Ok(location) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The only place a 201 is built, and it takes a [`ProvisionedBody`] (built only from a
/// [`keel_provision::Provisioned`]).
fn created(body: &ProvisionedBody, location: &str) -> Response {
    with_location(
        json_response(StatusCode::CREATED, "application/json", body),
        location,
    )
}

/// The body of `POST /v1/resources`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    /// The owning team (a team key: its own team).
    team_id: String,
    /// `postgres`, `redis` or `namespace`, as this deployment offers.
    resource_type: String,
    /// One of the tiers this platform sells.
    tier: String,
}

/// A request header that HTTP allows once (`Authorization`, `Content-Type`, `Idempotency-Key`)
/// was sent on more than one field line, so which value the client meant is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {0} header was sent more than once")]
struct RepeatedHeader(&'static str);

/// The value of the singleton header `name`: `None` when it is absent, an error when it was
/// sent on more than one field line. Taking the first of several would act on one value
/// while a proxy in front may have checked another.
fn single_header<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<Option<&'h header::HeaderValue>, RepeatedHeader> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (_, Some(_)) => Err(RepeatedHeader(name)),
    }
}

/// The list header `name` (`Accept`, `If-Match`) as one list: every field line, in order,
/// joined with `", "`, as HTTP combines a list sent on several lines (RFC 9110, 5.3). `None`
/// when it is absent; an error when a line is not visible ASCII.
fn list_header(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<String>, header::ToStrError> {
    let mut list: Option<String> = None;
    for value in headers.get_all(name) {
        let value = value.to_str()?;
        match &mut list {
            Some(list) => {
                list.push_str(", ");
                list.push_str(value);
            }
            None => list = Some(value.to_owned()),
        }
    }
    Ok(list)
}

/// Whether the request declares a JSON body (`application/json`, parameters allowed); a
/// `Content-Type` sent twice declares nothing.
fn is_json(headers: &HeaderMap) -> bool {
    single_header(headers, "content-type")
        .ok()
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// A body rejection as the envelope's code and message.
fn body_rejection(rejection: &BytesRejection) -> (ErrorCode, String) {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        (
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {BODY_LIMIT} bytes"),
        )
    } else {
        (
            ErrorCode::InvalidRequest,
            "the body could not be read".to_owned(),
        )
    }
}

/// The path of the collection this request addressed, as the client sent it (so a router
/// mounted under a prefix answers `Location`s under that prefix).
fn collection_path(uri: &OriginalUri) -> String {
    uri.path().trim_end_matches('/').to_owned()
}

/// What a provisioning task hands back: the resource and its 201 body.
type Finished = Result<(ResourceId, ProvisionedBody), keel_provision::ProvisionError>;

/// Provisions a resource. Honours `Idempotency-Key`: the same key and body replay the first
/// 201 (marked `Idempotent-Replayed: true`, without the password), another body answers 422,
/// a request still in flight 409.
#[utoipa::path(
    post,
    path = "/v1/resources",
    tag = "resources",
    request_body(content = CreateBody, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; one per intended resource, reused on every retry"),
        ("X-Request-Id" = Option<String>, Header, description = "Your id for this request (1 to 128 of [A-Za-z0-9._:-]), echoed in errors and logs")
    ),
    responses(
        (status = 201, description = "The resource is active; the connection URL (password included) is shown in the first answer only", body = ProvisionedBody, content_type = "application/json",
            headers(("Location" = String, description = "The resource's URL"))),
        (status = "default", description = "Any error: an RFC 9457 problem whose `error` is one of `x-keel-error-codes`", body = ErrorEnvelope, content_type = "application/problem+json")
    ),
    security(("api_key" = []))
)]
pub(crate) async fn create<S: ResourceStore + 'static, B: Backend + 'static>(
    State(state): State<Arc<AppState<S, B>>>,
    Extension(principal): Extension<Principal>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    if !is_json(&headers) {
        return fail(
            ErrorCode::UnsupportedMediaType,
            "the body must be sent as Content-Type: application/json",
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let (code, message) = body_rejection(&rejection);
            return fail(code, &message);
        }
    };
    // An object only: serde reads a struct from an array too (`["…", "postgres", "pro"]` by
    // position), and the contract is an object with named fields. Decoded straight into the
    // struct, so a field given twice is refused (a JSON value would keep the last one silently).
    let parsed = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<CreateBody>(&body),
        Some(_) | None => Err(serde::de::Error::custom(
            "expected an object with named fields",
        )),
    };
    let body: CreateBody = match parsed {
        Ok(body) => body,
        // serde names the field (`unknown field `x``, `missing field `tier``); field names and
        // the caller's own short values are not secret. Capped, so an echo stays small.
        Err(e) => {
            let detail: String = e.to_string().chars().take(200).collect();
            return fail(
                ErrorCode::InvalidRequest,
                &format!(
                    "the body must be a JSON object {{team_id, resource_type, tier}}: {detail}"
                ),
            );
        }
    };
    let Ok(team_id) = TeamId::from_str(&body.team_id) else {
        return fail(ErrorCode::InvalidRequest, "team_id must be a UUID");
    };
    // Another team is answered as a team that does not exist: its existence does not leak.
    if !principal.may_act_for(team_id) {
        return fail(ErrorCode::TeamNotFound, "the team does not exist");
    }
    let resource_type = match ResourceType::from_str(&body.resource_type) {
        Ok(t) if state.provisioner.backend().supports(t) => t,
        Ok(_) | Err(_) => {
            return fail(
                ErrorCode::UnknownResourceType,
                &format!("resource_type must be one of: {}", state.offered_types()),
            );
        }
    };
    let tier = match Tier::parse(&body.tier) {
        Ok(tier) if state.tiers.contains(tier.as_str()) => tier,
        Ok(_) | Err(_) => {
            let known: Vec<&str> = state.tiers.iter().map(String::as_str).collect();
            return fail(
                ErrorCode::UnknownTier,
                &format!("tier must be one of: {}", known.join(", ")),
            );
        }
    };
    let collection = collection_path(&uri);
    // Two keys would make a retry under either one a second resource: refused.
    let Ok(idempotency_key) = single_header(&headers, IDEMPOTENCY_KEY_HEADER) else {
        return fail(
            ErrorCode::InvalidRequest,
            "send one Idempotency-Key header, not several",
        );
    };
    let slot = match idempotency_key {
        None => None,
        Some(value) => match value.to_str().ok().and_then(IdempotencyKey::parse) {
            Some(key) => Some(Slot {
                scope: principal.idempotency_scope(),
                key,
            }),
            None => {
                return fail(
                    ErrorCode::InvalidRequest,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                );
            }
        },
    };
    if let Some(slot) = &slot {
        let fingerprint = idempotency::fingerprint(&[
            team_id.to_string().as_str(),
            resource_type.as_str(),
            tier.as_str(),
        ]);
        let claimed = tokio::time::timeout(
            state.deadline,
            idempotency::claim(
                &state.pool,
                slot,
                &fingerprint,
                state.limits.idempotency_retention,
            ),
        )
        .await;
        match claimed {
            Ok(Ok(Claim::Claimed)) => {}
            Ok(Ok(Claim::Replay { status, body })) => return replay(status, &body, &collection),
            Ok(Ok(Claim::InFlight { resource_id })) => {
                let mut envelope = ErrorEnvelope::new(
                    ErrorCode::IdempotencyKeyInUse,
                    "a request with this Idempotency-Key is still being processed",
                    request_id.as_str(),
                    &state.docs,
                );
                if let Some(id) = resource_id {
                    envelope = envelope.with_resource(id);
                }
                return envelope_response(&envelope);
            }
            Ok(Ok(Claim::Unreadable)) => {
                tracing::error!(
                    "an Idempotency-Key holds an outcome this API never stores (another writer \
                     changed provision_api.idempotency_keys); it was not replayed"
                );
                return fail(
                    ErrorCode::Internal,
                    "the stored outcome of this Idempotency-Key cannot be read; nothing was reserved",
                );
            }
            Ok(Ok(Claim::Mismatch)) => {
                return fail(
                    ErrorCode::IdempotencyKeyReused,
                    "this Idempotency-Key was used with a different team_id, resource_type or tier",
                );
            }
            Ok(Err(e)) => {
                tracing::error!(error = %ErrorChain(&e), "could not claim an idempotency key");
                return fail(
                    ErrorCode::BackendUnavailable,
                    "could not check the Idempotency-Key; nothing was reserved",
                );
            }
            Err(_) => {
                return fail(
                    ErrorCode::BackendUnavailable,
                    "checking the Idempotency-Key took too long; nothing was reserved",
                );
            }
        }
    }
    // From here on, a refusal gives the key up again: nothing was done.
    let refuse = |code: ErrorCode, message: String| {
        let state = Arc::clone(&state);
        let slot = slot.clone();
        let request_id = request_id.clone();
        async move {
            if let Some(slot) = &slot {
                release(&state.pool, slot).await;
            }
            error_response(code, message, &request_id, &state.docs)
        }
    };
    // Admission first: past the in-flight limit a POST is refused at once, before it waits for
    // anything.
    let Ok(permit) = Arc::clone(&state.admission).try_acquire_owned() else {
        state.provisioner.metrics().shed(resource_type);
        tracing::warn!(resource_type = %resource_type, "refused a provisioning: too many in flight");
        return refuse(
            ErrorCode::TooManyProvisions,
            "too many provisionings are in flight; nothing was reserved".to_owned(),
        )
        .await;
    };
    // The team's quota lock is held from the count until the reservation is written, so
    // concurrent POSTs of one team cannot together pass its quota.
    let quota = match tokio::time::timeout(
        state.deadline,
        lock_quota(&state.pool, &state.lock_holders, team_id),
    )
    .await
    {
        Ok(Ok((quota, live))) if live >= i64::from(state.limits.team_quota) => {
            quota.release().await;
            return refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "the team holds {live} live resources and its quota is {}; nothing was reserved",
                    state.limits.team_quota
                ),
            )
            .await;
        }
        Ok(Ok((quota, _))) => quota,
        Ok(Err(e)) => {
            tracing::error!(error = %ErrorChain(&e), "could not count a team's resources");
            return refuse(
                ErrorCode::BackendUnavailable,
                "could not check the team's quota; nothing was reserved".to_owned(),
            )
            .await;
        }
        Err(_) => {
            return refuse(
                ErrorCode::BackendUnavailable,
                "checking the team's quota took too long; nothing was reserved".to_owned(),
            )
            .await;
        }
    };
    let request = ProvisionRequest {
        team_id,
        resource_type,
        tier,
        request_id: request_id.clone(),
        actor: principal.actor(),
    };
    let deadline = tokio::time::Instant::now() + state.deadline;
    // Its own tracked task, holding its admission permit to the end: a client that disconnects
    // (or a deadline answer) must not cut provisioning short between create and finalize, and
    // shutdown waits for it. Each step reads the clock anew. The reserved id is sent out as soon
    // as the intent is written, so a deadline answer can name it. The task writes the
    // idempotency outcome itself, so it is there for a client that gave up.
    let (reserved_tx, reserved_rx) = tokio::sync::oneshot::channel();
    let mut flow = {
        let state = Arc::clone(&state);
        let slot = slot.clone();
        state.tracker.clone().spawn(
            async move {
                let _permit = permit;
                let finished =
                    provision(&state, request, reserved_tx, quota, slot.as_ref()).await;
                if let Some(slot) = &slot {
                    match &finished {
                        Ok((_, body)) => {
                            let stored = replayable(body);
                            if let Err(e) =
                                idempotency::complete(&state.pool, slot, 201, &stored).await
                            {
                                tracing::error!(error = %ErrorChain(&e), "could not store an idempotency outcome");
                            }
                        }
                        // A row left pending may hide a finalize that committed unheard: the
                        // key stays in flight, naming its resource, until the abandoned-key
                        // pass settles it by the row's fate (a 201 to replay, or released), so
                        // a retry never creates a second live resource.
                        Err(e) if e.fate_unsettled() => {
                            tracing::warn!(
                                "an idempotency key stays in flight until its attempt's \
                                 reservation is settled"
                            );
                        }
                        Err(_) => release(&state.pool, slot).await,
                    }
                }
                finished
            }
            .instrument(tracing::Span::current()),
        )
    };
    let finished = match tokio::time::timeout_at(deadline, &mut flow).await {
        Ok(finished) => finished,
        // Past the deadline. Reserving is bounded by the store's own deadline, so waiting for
        // its outcome is bounded too: either a reserved id to name, or the flow's own error.
        Err(_) => match reserved_rx.await {
            Ok(id) => {
                state.provisioner.metrics().answered_pending(resource_type);
                tracing::warn!(resource_id = %id, "a provisioning outlived the request deadline; it goes on");
                let response = envelope_response(
                    &ErrorEnvelope::new(
                        ErrorCode::ProvisionPending,
                        "the resource is still being created; GET it until its status is active \
                         or failed. Its password is shown only in a 201: once it is active, POST \
                         to its rotate-credentials to get one",
                        request_id.as_str(),
                        &state.docs,
                    )
                    .with_resource(id),
                );
                return with_location(response, &format!("{collection}/{id}"));
            }
            Err(_) => flow.await,
        },
    };
    match finished {
        Ok(Ok((id, body))) => created(&body, &format!("{collection}/{id}")),
        Ok(Err(e)) => {
            let mut envelope =
                ErrorEnvelope::new(e.code(), e.to_string(), request_id.as_str(), &state.docs);
            if let Some(id) = e.resource_id() {
                envelope = envelope.with_resource(id);
            }
            envelope_response(&envelope)
        }
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "the provisioning task failed");
            fail(ErrorCode::Internal, "the provisioning task failed")
        }
    }
}

/// Reserve, create, finalize; the reserved id goes out on `reserved` (and into the idempotency
/// slot) as soon as the intent is written.
async fn provision<S: ResourceStore, B: Backend>(
    state: &AppState<S, B>,
    request: ProvisionRequest,
    reserved: tokio::sync::oneshot::Sender<ResourceId>,
    quota: QuotaLock,
    slot: Option<&Slot>,
) -> Finished {
    let provisioner = &state.provisioner;
    let reservation = provisioner
        .reserve(request, OffsetDateTime::now_utc())
        .await;
    // Written (or not): the next POST of the team may count.
    quota.release().await;
    let reservation = reservation?;
    let id = reservation.id();
    let _ = reserved.send(id);
    if let Some(slot) = slot
        && let Err(e) = idempotency::note_resource(&state.pool, slot, id).await
    {
        tracing::warn!(error = %ErrorChain(&e), "could not note the resource of an idempotency key");
    }
    let created = provisioner
        .create(reservation, OffsetDateTime::now_utc())
        .await?;
    let provisioned = provisioner
        .finalize(created, OffsetDateTime::now_utc())
        .await?;
    Ok((provisioned.id(), ProvisionedBody::from(provisioned)))
}

/// The 201 body as stored for replay: everything but the connection URL (its password is
/// stored nowhere), plus a note on how to get credentials.
fn replayable(body: &ProvisionedBody) -> serde_json::Value {
    let mut value = serde_json::to_value(body).unwrap_or(serde_json::Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.remove("connection_url");
        object.insert(
            "credentials".to_owned(),
            serde_json::Value::String(idempotency::CREDENTIALS_NOTE.to_owned()),
        );
    }
    value
}

/// Answers a stored outcome again, marked `Idempotent-Replayed: true`.
fn replay(status: u16, body: &serde_json::Value, collection: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, "application/json", body);
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    match body.get("id").and_then(|id| id.as_str()) {
        Some(id) if status == StatusCode::CREATED => {
            with_location(response, &format!("{collection}/{id}"))
        }
        Some(_) | None => response,
    }
}

async fn release(pool: &PgPool, slot: &Slot) {
    if let Err(e) = idempotency::release(pool, slot).await {
        tracing::error!(error = %ErrorChain(&e), "could not release an idempotency key");
    }
}

/// The permits of [`AppState::lock_holders`] for `pool`: half its connections, at least one.
/// A pool of one connection cannot serve a holder (it waits for a second connection that never
/// comes); `keel-provision-api` refuses fewer than two.
pub fn lock_holders_for(pool: &PgPool) -> Arc<tokio::sync::Semaphore> {
    let connections = usize::try_from(pool.options().get_max_connections()).unwrap_or(2);
    Arc::new(tokio::sync::Semaphore::new((connections / 2).max(1)))
}

/// A team's quota lock: a transaction-scoped advisory lock, held from the count of the team's
/// live resources until its reservation is written, then released by ending the transaction;
/// with it, the permit of [`AppState::lock_holders`] its connection is held under.
struct QuotaLock(
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::sync::OwnedSemaphorePermit,
);

impl QuotaLock {
    async fn release(self) {
        let Self(tx, _holder) = self;
        if let Err(e) = tx.rollback().await {
            // The connection is closed rather than returned, which ends the lock too.
            tracing::warn!(error = %ErrorChain(&e), "could not end a quota lock's transaction");
        }
    }
}

/// Takes `team`'s quota lock and counts its live resources (the quota counts these). Waits
/// without holding a connection: a busy lock is tried again a moment later, so POSTs queued
/// behind one team never take the connections its reservation needs; and a connection is held
/// only under a permit of `holders`, so POSTs of many teams at once never hold every connection
/// while each waits for another to write its reservation.
async fn lock_quota(
    pool: &PgPool,
    holders: &Arc<tokio::sync::Semaphore>,
    team: TeamId,
) -> Result<(QuotaLock, i64), sqlx::Error> {
    loop {
        let holder = Arc::clone(holders)
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let mut tx = pool.begin().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('keel-provision-quota'), hashtext($1))",
        )
        .bind(team.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            tx.rollback().await?;
            drop(holder);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM resources \
              WHERE team_id = $1 AND status IN ('pending', 'active', 'paused', 'suspended')",
        )
        .bind(team.as_uuid())
        .fetch_one(&mut *tx)
        .await?;
        return Ok((QuotaLock(tx, holder), live));
    }
}

/// A resource id in its one canonical form (lowercase, hyphenated).
fn parse_id(id: Result<Path<String>, PathRejection>) -> Option<ResourceId> {
    let Path(id) = id.ok()?;
    ResourceId::from_str(&id)
        .ok()
        .filter(|parsed| parsed.to_string() == id)
}

const BAD_ID: &str = "the resource id must be a UUID in lowercase hyphenated form";

/// A resource as read (never its credentials).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ResourceView {
    /// Always `true`.
    ok: bool,
    /// The resource id.
    id: String,
    /// The owning team.
    team_id: String,
    /// What it is.
    resource_type: String,
    /// Its tier.
    tier: String,
    /// pending, active, paused, suspended, deleted or failed.
    status: String,
    /// When it was reserved (RFC 3339).
    created_at: String,
    /// When its row last changed (RFC 3339).
    updated_at: String,
    /// When it was deleted, if it was (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted_at: Option<String>,
}

impl ResourceView {
    fn of(record: &keel_provision::ResourceRecord) -> Self {
        Self {
            ok: true,
            id: record.id.to_string(),
            team_id: record.team_id.to_string(),
            resource_type: record.resource_type.as_str().to_owned(),
            tier: record.tier.as_str().to_owned(),
            status: record.status.as_str().to_owned(),
            created_at: record.created_at.format(&Rfc3339).unwrap_or_default(),
            updated_at: record.updated_at.format(&Rfc3339).unwrap_or_default(),
            deleted_at: record.deleted_at.and_then(|at| at.format(&Rfc3339).ok()),
        }
    }

    /// A strong entity tag of this representation: 64-bit FNV-1a of its JSON, the same on every
    /// replica, so any change a GET can see (status, tier, `updated_at`) changes it.
    fn etag(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("\"{hash:016x}\"")
    }
}

/// Whether an `If-Match` value admits `current` (RFC 9110 strong comparison: `*` matches any
/// current representation; weak tags never match).
fn if_match_admits(if_match: &str, current: Option<&str>) -> bool {
    let Some(current) = current else {
        return false;
    };
    if_match
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == current)
}

/// How reading a resource the principal may see went.
enum Visible {
    /// The resource, the principal's to see.
    Found(keel_provision::ResourceRecord),
    /// No such resource, or another team's (answered alike).
    NotFound,
    /// The envelope to answer instead (an outage or the deadline).
    Failed(Box<ErrorEnvelope>),
}

/// Reads `id` for `principal` within the request deadline: another team's resource is
/// [`Visible::NotFound`], exactly like a missing one.
async fn visible<S: ResourceStore, B: Backend>(
    state: &AppState<S, B>,
    principal: &Principal,
    id: ResourceId,
    request_id: &RequestId,
) -> Visible {
    let fail = |code, message: &str| {
        Box::new(ErrorEnvelope::new(
            code,
            message,
            request_id.as_str(),
            &state.docs,
        ))
    };
    match tokio::time::timeout(state.deadline, state.provisioner.get(id)).await {
        Err(_) => {
            tracing::error!(resource_id = %id, "reading a resource exceeded the request deadline");
            Visible::Failed(fail(
                ErrorCode::BackendUnavailable,
                "reading the resource took too long",
            ))
        }
        Ok(Ok(Some(record))) if principal.may_act_for(record.team_id) => Visible::Found(record),
        Ok(Ok(Some(_) | None)) => Visible::NotFound,
        Ok(Err(e @ keel_provision::StoreError::Corrupt { .. })) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "a resource row does not decode; it needs repair");
            // Not an outage: a retry reads the same row, so the answer says not to retry.
            Visible::Failed(fail(
                ErrorCode::Internal,
                "the resource's stored row cannot be read; retrying will not help",
            ))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %ErrorChain(&e), "could not read a resource");
            // The same answer as POST and DELETE give during an outage.
            Visible::Failed(fail(
                ErrorCode::BackendUnavailable,
                "could not read the resource",
            ))
        }
    }
}

/// Reads a resource of the caller's team (never its credentials).
#[utoipa::path(
    get,
    path = "/v1/resources/{id}",
    tag = "resources",
    params(("id" = String, Path, description = "The resource id (lowercase hyphenated UUID)"), ("X-Request-Id" = Option<String>, Header, description = "Your id for this request (1 to 128 of [A-Za-z0-9._:-]), echoed in errors and logs")),
    responses(
        (status = 200, description = "The resource", body = ResourceView, content_type = "application/json",
            headers(("ETag" = String, description = "Its current version, for If-Match"))),
        (status = "default", description = "Any error: an RFC 9457 problem whose `error` is one of `x-keel-error-codes`", body = ErrorEnvelope, content_type = "application/problem+json")
    ),
    security(("api_key" = []))
)]
pub(crate) async fn read<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let Some(id) = parse_id(id) else {
        return fail(ErrorCode::InvalidRequest, BAD_ID);
    };
    match visible(&state, &principal, id, &request_id).await {
        Visible::Found(record) => {
            let view = ResourceView::of(&record);
            let mut response = json_response(StatusCode::OK, "application/json", &view);
            if let Ok(etag) = HeaderValue::from_str(&view.etag()) {
                response.headers_mut().insert(header::ETAG, etag);
            }
            response
        }
        Visible::NotFound => fail(ErrorCode::ResourceNotFound, "no resource has this id"),
        Visible::Failed(envelope) => envelope_response(&envelope),
    }
}

/// The query parameters of `GET /v1/resources`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Only resources in this status.
    status: Option<String>,
    /// Only resources of this type.
    resource_type: Option<String>,
    /// The team (operator keys; a team key lists its own team).
    team_id: Option<String>,
    /// Page size, 1 to 200 (default 50).
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// A page of resources.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ListView {
    /// Always `true`.
    ok: bool,
    /// Newest first.
    resources: Vec<ResourceView>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ListedRow {
    id: uuid::Uuid,
    team_id: uuid::Uuid,
    resource_type: String,
    tier: String,
    status: String,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    deleted_at: Option<OffsetDateTime>,
}

/// A page position: the last row's `created_at` (microseconds since the epoch) and id.
fn cursor_of(row: &ListedRow) -> String {
    format!(
        "{}.{}",
        row.created_at.unix_timestamp_nanos() / 1000,
        row.id.simple()
    )
}

fn parse_cursor(cursor: &str) -> Option<(OffsetDateTime, uuid::Uuid)> {
    let (micros, id) = cursor.split_once('.')?;
    let micros: i128 = micros.parse().ok()?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1000)?).ok()?;
    // Only a time the schema can hold: one before the year 1 would reach the database and fail
    // there, answered as an outage.
    let at = keel_audit::utc_in_range(at)?;
    let id = uuid::Uuid::try_parse(id).ok()?;
    Some((at, id))
}

/// Lists the caller's team's resources (an operator key: every team's, or `team_id`'s), newest
/// first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/resources",
    tag = "resources",
    params(ListParams, ("X-Request-Id" = Option<String>, Header, description = "Your id for this request (1 to 128 of [A-Za-z0-9._:-]), echoed in errors and logs")),
    responses(
        (status = 200, description = "A page of resources", body = ListView, content_type = "application/json"),
        (status = "default", description = "Any error: an RFC 9457 problem whose `error` is one of `x-keel-error-codes`", body = ErrorEnvelope, content_type = "application/problem+json")
    ),
    security(("api_key" = []))
)]
pub(crate) async fn list<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Extension(principal): Extension<Principal>,
    params: Result<Query<ListParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let params = match params {
        Ok(Query(params)) => params,
        Err(e) => {
            let detail: String = e.body_text().chars().take(200).collect();
            return fail(
                ErrorCode::InvalidRequest,
                &format!(
                    "the query takes status, resource_type, team_id, limit and cursor: {detail}"
                ),
            );
        }
    };
    let status = match params.status.as_deref().map(ResourceStatus::parse) {
        None => None,
        Some(Some(status)) => Some(status),
        Some(None) => {
            let known: Vec<&str> = ResourceStatus::ALL.iter().map(|s| s.as_str()).collect();
            return fail(
                ErrorCode::InvalidRequest,
                &format!("status must be one of: {}", known.join(", ")),
            );
        }
    };
    let resource_type = match params.resource_type.as_deref().map(ResourceType::from_str) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            let known: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
            return fail(
                ErrorCode::InvalidRequest,
                &format!("resource_type must be one of: {}", known.join(", ")),
            );
        }
    };
    let team = match (params.team_id.as_deref(), principal.scope()) {
        (None, crate::Scope::Team(own)) => Some(own),
        (None, crate::Scope::Operator) => None,
        (Some(team), _) => {
            let Ok(team) = TeamId::from_str(team) else {
                return fail(ErrorCode::InvalidRequest, "team_id must be a UUID");
            };
            if !principal.may_act_for(team) {
                return fail(ErrorCode::TeamNotFound, "the team does not exist");
            }
            Some(team)
        }
    };
    let limit = match params.limit.as_deref().map(str::parse::<i64>) {
        None => DEFAULT_PAGE,
        Some(Ok(limit)) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(Ok(_) | Err(_)) => {
            return fail(
                ErrorCode::InvalidRequest,
                &format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            );
        }
    };
    let after = match params.cursor.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(after)) => Some(after),
        Some(None) => {
            return fail(
                ErrorCode::InvalidRequest,
                "cursor must be the next_cursor of a previous page",
            );
        }
    };
    let query = sqlx::query_as::<_, ListedRow>(
        "SELECT id, team_id, resource_type, tier, status, created_at, updated_at, deleted_at \
           FROM resources \
          WHERE ($1::uuid IS NULL OR team_id = $1) \
            AND ($2::text IS NULL OR status = $2) \
            AND ($3::text IS NULL OR resource_type = $3) \
            AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5)) \
          ORDER BY created_at DESC, id DESC \
          LIMIT $6",
    )
    .bind(team.map(|t| t.as_uuid()))
    .bind(status.map(ResourceStatus::as_str))
    .bind(resource_type.map(ResourceType::as_str))
    .bind(after.map(|(at, _)| at))
    .bind(after.map(|(_, id)| id))
    .bind(limit + 1)
    .fetch_all(&state.pool);
    let mut rows = match tokio::time::timeout(state.deadline, query).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::error!(error = %ErrorChain(&e), "could not list resources");
            return fail(
                ErrorCode::BackendUnavailable,
                "could not list the resources",
            );
        }
        Err(_) => {
            return fail(
                ErrorCode::BackendUnavailable,
                "listing the resources took too long",
            );
        }
    };
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    let resources = rows
        .into_iter()
        .map(|row| ResourceView {
            ok: true,
            id: row.id.to_string(),
            team_id: row.team_id.to_string(),
            resource_type: row.resource_type,
            tier: row.tier,
            status: row.status,
            created_at: row.created_at.format(&Rfc3339).unwrap_or_default(),
            updated_at: row.updated_at.format(&Rfc3339).unwrap_or_default(),
            deleted_at: row.deleted_at.and_then(|at| at.format(&Rfc3339).ok()),
        })
        .collect();
    json_response(
        StatusCode::OK,
        "application/json",
        &ListView {
            ok: true,
            resources,
            next_cursor,
        },
    )
}

/// New credentials, shown once.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct RotatedView {
    /// Always `true`.
    ok: bool,
    /// The resource id.
    id: String,
    /// How to connect, with the new password.
    connection_url: String,
    /// The request id.
    request_id: String,
}

/// Issues new credentials for an active resource (the old password stops working); the new
/// connection URL is shown once.
#[utoipa::path(
    post,
    path = "/v1/resources/{id}/rotate-credentials",
    tag = "resources",
    params(("id" = String, Path, description = "The resource id (lowercase hyphenated UUID)"), ("X-Request-Id" = Option<String>, Header, description = "Your id for this request (1 to 128 of [A-Za-z0-9._:-]), echoed in errors and logs")),
    responses(
        (status = 200, description = "The new connection URL, shown once", body = RotatedView, content_type = "application/json"),
        (status = "default", description = "Any error: an RFC 9457 problem whose `error` is one of `x-keel-error-codes`", body = ErrorEnvelope, content_type = "application/problem+json")
    ),
    security(("api_key" = []))
)]
pub(crate) async fn rotate<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let Some(id) = parse_id(id) else {
        return fail(ErrorCode::InvalidRequest, BAD_ID);
    };
    let record = match visible(&state, &principal, id, &request_id).await {
        Visible::Found(record) => record,
        Visible::NotFound => return fail(ErrorCode::ResourceNotFound, "no resource has this id"),
        Visible::Failed(envelope) => return envelope_response(&envelope.with_resource(id)),
    };
    let rotated = tokio::time::timeout(
        state.deadline,
        state.provisioner.rotate_credentials(
            &record,
            principal.actor(),
            Some(request_id.clone()),
            OffsetDateTime::now_utc(),
        ),
    )
    .await;
    let url = match rotated {
        Ok(Ok(url)) => url,
        Ok(Err(RotateError::NotActive(status))) => {
            return envelope_response(
                &ErrorEnvelope::new(
                    ErrorCode::ResourceNotActive,
                    format!(
                        "the resource is {}; only an active resource's credentials rotate",
                        status.as_str()
                    ),
                    request_id.as_str(),
                    &state.docs,
                )
                .with_resource(id),
            );
        }
        // Not an outage: this replica has no backend for the resource's type, or its object
        // is not the platform's. A retry meets the same answer.
        Ok(Err(
            e @ RotateError::Backend(
                keel_provision::BackendError::Unsupported(_)
                | keel_provision::BackendError::Foreign { .. },
            ),
        )) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "could not rotate credentials");
            return fail(
                ErrorCode::Internal,
                "this deployment cannot rotate this resource's credentials (no backend for its \
                 type here, or its object is not the platform's); nothing was rotated",
            );
        }
        Ok(Err(e @ RotateError::Backend(_))) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "could not rotate credentials");
            return fail(
                ErrorCode::BackendUnavailable,
                "could not rotate the credentials; the old ones may still work",
            );
        }
        Ok(Err(e @ RotateError::ObjectMissing)) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "could not rotate credentials");
            return fail(
                ErrorCode::BackendUnavailable,
                "the resource's backend object was not found; nothing was rotated",
            );
        }
        Ok(Err(e @ RotateError::Store(_))) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "could not record a credential rotation");
            // Shown only once recorded: a rotation nobody audited never hands out a password.
            return fail(
                ErrorCode::BackendUnavailable,
                "the credentials were reset but the rotation could not be recorded, so the new \
                 ones are shown to nobody and the old ones may no longer work; send the request \
                 again for new credentials",
            );
        }
        // `RotateError` is non-exhaustive: a failure mode this build does not know is a failed
        // rotation whose new credentials are shown to nobody.
        Ok(Err(e)) => {
            tracing::error!(resource_id = %id, error = %ErrorChain(&e), "could not rotate credentials");
            return fail(
                ErrorCode::BackendUnavailable,
                "could not rotate the credentials; the old ones may still work",
            );
        }
        Err(_) => {
            tracing::error!(resource_id = %id, "rotating credentials exceeded the request deadline");
            return fail(
                ErrorCode::BackendUnavailable,
                "rotating the credentials took too long; the old ones may no longer work: send \
                 the request again for new ones",
            );
        }
    };
    tracing::info!(resource_id = %id, "rotated a resource's credentials");
    json_response(
        StatusCode::OK,
        "application/json",
        &RotatedView {
            ok: true,
            id: id.to_string(),
            connection_url: url.expose().to_owned(),
            request_id: request_id.as_str().to_owned(),
        },
    )
}

/// The query parameters of `DELETE /v1/resources/{id}` (others are ignored).
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteParams {
    /// Why the resource is deprovisioned (default `customer_request`).
    reason: Option<String>,
}

/// The outcome of a DELETE.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct DeletedView {
    /// Always `true`.
    ok: bool,
    /// The resource id.
    id: String,
    /// Always `deleted`.
    status: &'static str,
    /// `deprovisioned` (now) or `already_deprovisioned`.
    outcome: &'static str,
}

/// Deprovisions a resource through the audited chokepoint (idempotent).
#[utoipa::path(
    delete,
    path = "/v1/resources/{id}",
    tag = "resources",
    params(
        ("id" = String, Path, description = "The resource id (lowercase hyphenated UUID)"),
        DeleteParams,
        ("If-Match" = Option<String>, Header, description = "Delete only this version (an ETag from GET)"),
        ("X-Request-Id" = Option<String>, Header, description = "Your id for this request (1 to 128 of [A-Za-z0-9._:-]), echoed in errors and logs")
    ),
    responses(
        (status = 200, description = "Deprovisioned, now or before", body = DeletedView, content_type = "application/json"),
        (status = "default", description = "Any error: an RFC 9457 problem whose `error` is one of `x-keel-error-codes`", body = ErrorEnvelope, content_type = "application/problem+json")
    ),
    security(("api_key" = []))
)]
pub(crate) async fn delete<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<DeleteParams>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let request_id = request_id(&headers);
    let fail = |code, message: &str| error_response(code, message, &request_id, &state.docs);
    let Some(id) = parse_id(id) else {
        return fail(ErrorCode::InvalidRequest, BAD_ID);
    };
    let Ok(Query(params)) = params else {
        return fail(
            ErrorCode::InvalidRequest,
            "the query string could not be read; it takes one reason parameter",
        );
    };
    let reason = match params.reason.as_deref() {
        None => DeprovisionReason::CustomerRequest,
        Some(reason) => match DeprovisionReason::parse(reason) {
            // The orphan reason belongs to the orphan sweep, not to a resource by id.
            Some(DeprovisionReason::Orphan) | None => {
                return fail(
                    ErrorCode::InvalidRequest,
                    "the reason parameter must be customer_request, expired or operator",
                );
            }
            Some(reason) => reason,
        },
    };
    match reason {
        DeprovisionReason::CustomerRequest => {}
        DeprovisionReason::Expired | DeprovisionReason::Operator if principal.is_operator() => {}
        DeprovisionReason::Expired | DeprovisionReason::Operator | DeprovisionReason::Orphan => {
            return fail(
                ErrorCode::Forbidden,
                "only an operator key may delete with reason expired or operator",
            );
        }
    }
    let cause = DeprovisionCause {
        reason,
        actor: principal.actor(),
        request_id: Some(request_id.clone()),
    };
    let deadline = tokio::time::Instant::now() + state.deadline;
    let too_long = || {
        envelope_response(
            &ErrorEnvelope::new(
                ErrorCode::BackendUnavailable,
                "the deprovision took too long; send the same DELETE again to finish it",
                request_id.as_str(),
                &state.docs,
            )
            .with_resource(id),
        )
    };
    let record = match visible(&state, &principal, id, &request_id).await {
        Visible::Found(record) => record,
        Visible::NotFound => {
            // `If-Match` on nothing is a failed precondition, as before.
            if headers.contains_key(header::IF_MATCH) {
                return envelope_response(
                    &ErrorEnvelope::new(
                        ErrorCode::PreconditionFailed,
                        "If-Match does not name the resource's current version; nothing was deleted",
                        request_id.as_str(),
                        &state.docs,
                    )
                    .with_resource(id),
                );
            }
            return fail(ErrorCode::ResourceNotFound, "no resource has this id");
        }
        // Named, so the same DELETE can be sent again.
        Visible::Failed(envelope) => return envelope_response(&envelope.with_resource(id)),
    };
    // `If-Match`: only the version the caller last read is deleted.
    // Several If-Match lines are one list of entity tags.
    let if_match = list_header(&headers, "if-match");
    if let Some(if_match) = if_match.transpose() {
        let Ok(if_match) = if_match else {
            return fail(
                ErrorCode::InvalidRequest,
                "If-Match must be a list of entity tags",
            );
        };
        let current = ResourceView::of(&record).etag();
        if !if_match_admits(&if_match, Some(&current)) {
            return envelope_response(
                &ErrorEnvelope::new(
                    ErrorCode::PreconditionFailed,
                    "If-Match does not name the resource's current version; nothing was deleted",
                    request_id.as_str(),
                    &state.docs,
                )
                .with_resource(id),
            );
        }
    }
    // Cut short at the deadline, the chokepoint leaves an audited, retryable state at worst
    // (every step is idempotent; a retry finishes it).
    let deprovisioned = tokio::time::timeout_at(
        deadline,
        state.provisioner.deprovision(
            DeprovisionTarget::Resource(id),
            &cause,
            OffsetDateTime::now_utc(),
        ),
    )
    .await;
    let Ok(deprovisioned) = deprovisioned else {
        tracing::error!(resource_id = %id, "a deprovision exceeded the request deadline");
        return too_long();
    };
    match deprovisioned {
        Ok(done) => {
            let outcome = match done {
                Deprovisioned::Retired => "deprovisioned",
                Deprovisioned::AlreadyRetired
                | Deprovisioned::OrphanReclaimed
                | Deprovisioned::OrphanAbsent => "already_deprovisioned",
            };
            tracing::info!(resource_id = %id, outcome, "deprovisioned a resource");
            json_response(
                StatusCode::OK,
                "application/json",
                &DeletedView {
                    ok: true,
                    id: id.to_string(),
                    status: "deleted",
                    outcome,
                },
            )
        }
        Err(e) => {
            tracing::warn!(resource_id = %id, error = %ErrorChain(&e), "a deprovision did not complete");
            envelope_response(
                &ErrorEnvelope::new(e.code(), e.to_string(), request_id.as_str(), &state.docs)
                    .with_resource(id),
            )
        }
    }
}

/// The OpenAPI document (no key needed: it describes, it does not act).
async fn openapi<S: ResourceStore, B: Backend>(
    State(state): State<Arc<AppState<S, B>>>,
) -> Response {
    json_response(
        StatusCode::OK,
        "application/json",
        &crate::openapi::document(&state.docs),
    )
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
    use crate::bounded::BoundedStore;
    use crate::keys::Scope;

    type Store = FaultyStore<BoundedStore<PgResourceStore>>;

    /// A running API on a fresh migrated database with one team.
    struct Api {
        addr: SocketAddr,
        db: TestDatabase,
        team: TeamId,
        state: Arc<AppState<Store, Backends>>,
        /// A key of `team`.
        key: String,
        stop: CancellationToken,
        served: Option<tokio::task::JoinHandle<()>>,
    }

    impl Drop for Api {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn api() -> Api {
        api_with(Limits::default()).await
    }

    /// A server that checks customer passwords (SCRAM over TCP), so a test can tell a working
    /// password from a stale one.
    fn password_server() -> &'static keel_testkit::PgServer {
        static SERVER: std::sync::OnceLock<keel_testkit::PgServer> = std::sync::OnceLock::new();
        SERVER.get_or_init(|| {
            keel_testkit::PgServer::start_throwaway_with(&keel_testkit::ThrowawayOptions {
                settings: vec![("password_encryption".into(), "scram-sha-256".into())],
                password_auth: true,
            })
            .unwrap_or_else(|e| panic!("no PostgreSQL server with password authentication: {e}"))
        })
    }

    async fn api_with(limits: Limits) -> Api {
        api_on(keel_testkit::database().await, limits).await
    }

    /// A key of `scope`, created as an operator would.
    async fn key_for(pool: &PgPool, scope: Scope) -> String {
        let (_, key) = keys::create(
            pool,
            scope,
            "test",
            keel_audit::Actor::parse("operator:test").unwrap(),
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        key.expose().to_owned()
    }

    async fn api_on(db: TestDatabase, limits: Limits) -> Api {
        let pool = db.pool().clone();
        api_on_pool(db, limits, pool, std::time::Duration::from_secs(2)).await
    }

    /// [`api_on`] whose store and handlers use `pool` (a smaller one, say) for the platform
    /// database, with requests answered by `deadline`.
    async fn api_on_pool(
        db: TestDatabase,
        limits: Limits,
        pool: PgPool,
        deadline: std::time::Duration,
    ) -> Api {
        let team = TeamId::from_uuid(db.team("pro").await);
        let mut registry = Registry::default();
        let metrics = ProvisionMetrics::register(&mut registry);
        let backends = Backends {
            postgres: Some(PgClusterBackend::new(db.server().admin_options(), None, 4)),
            namespaces: None,
        };
        let state = Arc::new(AppState {
            provisioner: Provisioner::new(
                FaultyStore::new(BoundedStore::new(
                    PgResourceStore::new(pool.clone()),
                    std::time::Duration::from_secs(5),
                )),
                backends,
                metrics,
            ),
            docs: DocsBase::parse("https://keel.dev/docs/errors").unwrap(),
            tiers: ["free", "pro"].into_iter().map(String::from).collect(),
            tracker: TaskTracker::new(),
            deadline,
            admission: Arc::new(tokio::sync::Semaphore::new(8)),
            lock_holders: lock_holders_for(&pool),
            pool,
            limits,
            rate: RateLimiter::new(),
        });
        let key = key_for(db.pool(), Scope::Team(team)).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = router(state.clone()).merge(keel_service::http::router(Arc::new(registry)));
        let served = tokio::spawn(serve(
            listener,
            app,
            state.tracker.clone(),
            stop.clone(),
            std::time::Duration::from_secs(30),
        ));
        let served = Some(tokio::spawn(async move { served.await.unwrap().unwrap() }));
        Api {
            addr,
            db,
            team,
            state,
            key,
            stop,
            served,
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
        /// The kinds of every audit row written so far, oldest first, but the creation of the
        /// test's own keys.
        async fn audit_kinds(&self) -> Vec<AuditKind> {
            let mut conn = self.db.pool().acquire().await.unwrap();
            fetch(&mut conn, &AuditFilter::default())
                .await
                .unwrap()
                .into_iter()
                .map(|stored| stored.event.kind())
                .filter(|kind| *kind != AuditKind::ApiKeyCreated)
                .collect()
        }

        /// Makes every finalize (the `UPDATE` to `active`) take `seconds`, so a test can act
        /// while one is in flight.
        async fn slow_down_finalize(&self, seconds: f64) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE FUNCTION slow_finalize() RETURNS trigger LANGUAGE plpgsql AS $$ \
                   BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$; \
                 CREATE TRIGGER slow_finalize BEFORE UPDATE ON resources FOR EACH ROW \
                   WHEN (NEW.status = 'active') EXECUTE FUNCTION slow_finalize();"
            )))
            .execute(self.db.pool())
            .await
            .unwrap();
        }

        async fn call(&self, method: &str, path: &str, body: &str) -> Answer {
            self.call_as(method, path, Some("application/json"), body)
                .await
        }

        async fn call_as(
            &self,
            method: &str,
            path: &str,
            content_type: Option<&str>,
            body: &str,
        ) -> Answer {
            let content_type = content_type
                .map(|c| format!("Content-Type: {c}\r\n"))
                .unwrap_or_default();
            self.call_raw(method, path, &content_type, body).await
        }

        /// A bodiless call with one extra header.
        async fn call_with(&self, method: &str, path: &str, name: &str, value: &str) -> Answer {
            self.call_raw(method, path, &format!("{name}: {value}\r\n"), "")
                .await
        }

        async fn call_raw(&self, method: &str, path: &str, extra: &str, body: &str) -> Answer {
            self.call_keyed(Some(&self.key), method, path, extra, body)
                .await
        }

        /// A call with `key` (or none), `extra` header lines, and a header naming a forged
        /// actor (which must never reach the audit trail).
        async fn call_keyed(
            &self,
            key: Option<&str>,
            method: &str,
            path: &str,
            extra: &str,
            body: &str,
        ) -> Answer {
            send(self.addr, key, method, path, extra, body).await
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
            sqlx::query_scalar("SELECT 'cust_' || token_digest FROM resources ORDER BY created_at")
                .fetch_all(self.db.pool())
                .await
                .unwrap()
        }
    }

    /// One HTTP/1.1 request on a connection of its own.
    async fn send(
        addr: SocketAddr,
        key: Option<&str>,
        method: &str,
        path: &str,
        extra: &str,
        body: &str,
    ) -> Answer {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let authorization = key
            .map(|key| format!("Authorization: Bearer {key}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
             X-Request-Id: req-test-1\r\nX-Keel-Actor: operator:forged\r\n\
             {authorization}{extra}Content-Length: {}\r\n\r\n{body}",
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
        assert!(
            answer
                .head
                .to_lowercase()
                .contains("content-type: application/problem+json"),
            "{}",
            answer.head
        );
        assert!(
            body["instance"]
                .as_str()
                .unwrap()
                .starts_with("urn:keel:request:"),
            "{body}"
        );
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

        let kinds = api.audit_kinds().await;
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
            // The three fields by position: the contract is an object with named fields.
            (
                "POST",
                "/v1/resources".into(),
                json!([team, "postgres", "pro"]).to_string(),
                400,
                "invalid_request",
            ),
            ("POST", "/v1/resources".into(), "\"postgres\"".into(), 400, "invalid_request"),
            // A field given twice: refused, not the last one kept.
            (
                "POST",
                "/v1/resources".into(),
                format!(
                    r#"{{"team_id": "{team}", "resource_type": "postgres", "tier": "free", "tier": "pro"}}"#
                ),
                400,
                "invalid_request",
            ),
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
                422,
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

    /// PROV-7: framework errors and panics are the same envelope as handler errors.
    #[tokio::test]
    async fn every_response_with_status_4xx_or_5xx_is_an_envelope() {
        let api = api().await;
        let big = format!(
            "{{\"team_id\":\"{}\",\"resource_type\":\"postgres\",\"tier\":\"pro\"}}{}",
            api.team,
            " ".repeat(BODY_LIMIT * 2)
        );
        let cases: Vec<(&str, &str, String, u16, &str)> = vec![
            ("POST", "/v1/resources", big, 413, "payload_too_large"),
            (
                "GET",
                "/v1/resources/%ff%fe",
                String::new(),
                400,
                "invalid_request",
            ),
            ("GET", "/nowhere", String::new(), 404, "route_not_found"),
            (
                "GET",
                "/v1/resources/",
                String::new(),
                404,
                "route_not_found",
            ),
            (
                "PUT",
                "/v1/resources",
                String::new(),
                405,
                "method_not_allowed",
            ),
            (
                "PATCH",
                "/v1/resources",
                String::new(),
                405,
                "method_not_allowed",
            ),
            (
                "DELETE",
                "/v1/resources",
                String::new(),
                405,
                "method_not_allowed",
            ),
        ];
        for (method, path, body, status, code) in cases {
            let answer = api.call(method, path, &body).await;
            assert_envelope(&answer, status, code);
        }
        assert!(api.provider_ids().await.is_empty(), "nothing was reserved");
        let unknown = api
            .call(
                "POST",
                "/v1/resources",
                &json!({"team_id": api.team.to_string(), "resource_type": "postgres", "tier": "pro", "colour": 1}).to_string(),
            )
            .await;
        assert_envelope(&unknown, 400, "invalid_request");
        assert!(
            unknown.json()["message"]
                .as_str()
                .unwrap()
                .contains("colour"),
            "the field is named"
        );

        // A panicking handler behind the same layers answers 500 with the envelope.
        let docs = DocsBase::parse("https://keel.dev/docs/errors").unwrap();
        let panicking = with_envelopes(
            Router::new().route(
                "/panic",
                get(|| async {
                    let v: Vec<u8> = Vec::new();
                    v[1].to_string()
                }),
            ),
            docs,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, panicking).await.unwrap() });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"GET /panic HTTP/1.1\r\nHost: keel\r\nX-Request-Id: my-req-1\r\n\
                  Connection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 500"), "{raw}");
        assert!(
            raw.to_lowercase().contains("application/problem+json"),
            "{raw}"
        );
        assert!(raw.contains("\"error\":\"internal\""), "{raw}");
        // The id support is told to quote is the request's own, the one its log lines carry.
        assert!(raw.contains("\"request_id\":\"my-req-1\""), "{raw}");
    }

    /// A writer that keeps what the JSON subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    /// OPS-18: every JSON log line written while a request is handled, in the handler or in a
    /// task it spawns, carries that request's id, method and route template in its span; a
    /// request without an id gets one, the same in its log lines and its envelope.
    #[tokio::test]
    async fn every_json_log_line_of_a_request_carries_its_request_id() {
        let out = Captured::default();
        let subscriber = keel_service::telemetry::subscriber(
            keel_service::cli::LogFormat::Json,
            tracing_subscriber::EnvFilter::new("info"),
            false,
            out.clone(),
        );
        // The test runtime is single-threaded: the server's tasks run on this thread.
        let _default = tracing::subscriber::set_default(subscriber);
        let docs = DocsBase::parse("https://keel.dev/docs/errors").unwrap();
        let logging = with_envelopes(
            Router::new().route(
                "/v1/log/{secret}",
                get(|headers: HeaderMap| async move {
                    tracing::info!("in the handler");
                    tokio::spawn(
                        async { tracing::info!("in a spawned task") }
                            .instrument(tracing::Span::current()),
                    )
                    .await
                    .unwrap();
                    request_id(&headers).as_str().to_owned()
                }),
            ),
            docs,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, logging).await.unwrap() });
        let call = |head: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut raw = String::new();
            stream.read_to_string(&mut raw).await.unwrap();
            raw
        };
        let raw = call(
            "GET /v1/log/tok-s3cr3t HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
             X-Request-Id: req-span-7\r\n\r\n",
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        let logged = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = logged
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{logged}");
        for line in &lines {
            assert_eq!(line["span"]["name"], "request", "{line}");
            assert_eq!(line["span"]["request_id"], "req-span-7", "{line}");
            assert_eq!(line["span"]["method"], "GET", "{line}");
            assert_eq!(line["span"]["route"], "/v1/log/{secret}", "{line}");
        }
        assert!(
            !logged.contains("s3cr3t"),
            "the path itself is never logged: {logged}"
        );

        // Without an id: the envelope names the id the span was given.
        out.0.lock().unwrap().clear();
        let raw = call("GET /v1/log/x HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n").await;
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        let logged = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let first: Value = serde_json::from_str(logged.lines().next().unwrap()).unwrap();
        let given = first["span"]["request_id"].as_str().unwrap();
        assert!(given.starts_with("req-"), "{given}");
        let body = raw.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(body, given, "the handler sees the id its span carries");
    }

    /// OPS-24: the query string is decoded as a form (a percent-encoded reason is the reason),
    /// and one that cannot be read (a repeated reason) is an `invalid_request` envelope.
    #[tokio::test]
    async fn query_strings_are_decoded_and_an_unreadable_one_is_an_envelope() {
        let api = api().await;
        let missing = ResourceId::new_random();
        for (query, status, code) in [
            ("reason=customer%5Frequest", 404, "resource_not_found"),
            ("reason=customer_request&page=2", 404, "resource_not_found"),
            // A team key may not use an operator's reason.
            ("reason=operator", 403, "forbidden"),
            ("reason=expired&reason=operator", 400, "invalid_request"),
            ("reason=", 400, "invalid_request"),
            ("reason=or%70han", 400, "invalid_request"),
        ] {
            let answer = api
                .call("DELETE", &format!("/v1/resources/{missing}?{query}"), "")
                .await;
            assert_envelope(&answer, status, code);
        }
    }

    /// A row another writer left in a shape this build cannot read is not an outage: GET,
    /// DELETE and rotate-credentials answer 500 `internal` without Retry-After (a retry reads the
    /// same row), never 503 `backend_unavailable` with advice to retry forever.
    #[tokio::test]
    async fn a_row_that_does_not_decode_is_a_500_without_retry_advice() {
        let api = api().await;
        let id = uuid::Uuid::new_v4();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url) \
             VALUES ($1, 'tok-garbage-1', $2, 'mysql', 'diamond', 'active', 'x', 'y')",
        )
        .bind(id)
        .bind(api.team.as_uuid())
        .execute(api.db.pool())
        .await
        .unwrap();
        for (method, path) in [
            ("GET", format!("/v1/resources/{id}")),
            ("DELETE", format!("/v1/resources/{id}")),
            ("POST", format!("/v1/resources/{id}/rotate-credentials")),
        ] {
            let answer = api.call(method, &path, "").await;
            assert_envelope(&answer, 500, "internal");
            assert!(
                !answer.head.to_lowercase().contains("retry-after"),
                "{method} {path}: {}",
                answer.head
            );
        }
        let status: String = sqlx::query_scalar("SELECT status FROM resources WHERE id = $1")
            .bind(id)
            .fetch_one(api.db.pool())
            .await
            .unwrap();
        assert_eq!(status, "active", "nothing was changed");
    }

    /// A rotation this deployment can never perform (no backend here for the resource's
    /// type) is a 500 without retry advice, not a 503 to retry forever; a rotation whose reset
    /// went through but could not be recorded says the old password may no longer work.
    #[tokio::test]
    async fn a_rotation_that_cannot_succeed_or_was_not_recorded_says_so() {
        let api = api().await;
        let id = uuid::Uuid::new_v4();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url) \
             VALUES ($1, $2, $3, 'namespace', 'pro', 'active', 'x', 'y')",
        )
        .bind(id)
        .bind(format!("tok{}", uuid::Uuid::new_v4().simple()))
        .bind(api.team.as_uuid())
        .execute(api.db.pool())
        .await
        .unwrap();
        let answer = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_envelope(&answer, 500, "internal");
        assert!(!answer.head.to_lowercase().contains("retry-after"));

        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = created.json()["id"].as_str().unwrap().to_owned();
        api.state.provisioner.store().fail(StoreStep::Record, 1);
        let unrecorded = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_envelope(&unrecorded, 503, "backend_unavailable");
        assert!(
            unrecorded.json()["message"]
                .as_str()
                .unwrap()
                .contains("the old ones may no longer work"),
            "{}",
            unrecorded.body
        );
    }

    /// PROV-8: only a JSON body creates anything; a cross-site "simple request" cannot.
    #[tokio::test]
    async fn a_body_that_is_not_declared_json_is_refused_with_415_before_anything_is_written() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        for content_type in [
            Some("text/plain"),
            None,
            Some("application/x-www-form-urlencoded"),
        ] {
            let answer = api
                .call_as("POST", "/v1/resources", content_type, &body)
                .await;
            assert_envelope(&answer, 415, "unsupported_media_type");
        }
        let ok = api
            .call_as(
                "POST",
                "/v1/resources",
                Some("application/json; charset=utf-8"),
                &body,
            )
            .await;
        assert_eq!(ok.status, 201, "{}", ok.body);
        assert_eq!(api.provider_ids().await.len(), 1);
    }

    /// A header HTTP allows once, sent on two lines, is refused whichever line is valid: two
    /// keys (401), two idempotency keys (400; a retry under either would otherwise make a
    /// second resource) and two content types (415), with nothing reserved. A list header
    /// sent on two lines is one list: an `If-Match` whose second line names the current
    /// version deletes.
    #[tokio::test]
    async fn a_header_sent_twice_is_refused_unless_it_is_a_list() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        let unknown = format!(
            "Authorization: Bearer keel_0123456789ab_{}\r\n",
            "A".repeat(43)
        );
        let live = format!("Authorization: Bearer {}\r\n", api.key);
        for (method, path) in [("POST", "/v1/resources"), ("GET", "/v1/resources")] {
            for keys in [format!("{live}{unknown}"), format!("{unknown}{live}")] {
                let answer = api
                    .call_keyed(None, method, path, &format!("{JSON}{keys}"), &body)
                    .await;
                assert_envelope(&answer, 401, "unauthorized");
                assert!(
                    answer.json()["message"]
                        .as_str()
                        .unwrap()
                        .contains("one Authorization")
                );
            }
        }
        let twice = api
            .call_raw(
                "POST",
                "/v1/resources",
                &format!("{JSON}Idempotency-Key: first\r\nIdempotency-Key: second\r\n"),
                &body,
            )
            .await;
        assert_envelope(&twice, 400, "invalid_request");
        assert!(
            twice.json()["message"]
                .as_str()
                .unwrap()
                .contains("one Idempotency-Key")
        );
        let typed_twice = api
            .call_raw(
                "POST",
                "/v1/resources",
                &format!("{JSON}Content-Type: text/plain\r\n"),
                &body,
            )
            .await;
        assert_envelope(&typed_twice, 415, "unsupported_media_type");
        assert!(api.provider_ids().await.is_empty(), "nothing was reserved");
        assert_eq!(
            api.count("SELECT count(*) FROM provision_api.idempotency_keys")
                .await,
            0,
            "no idempotency key was claimed"
        );

        let created = api.call("POST", "/v1/resources", &body).await;
        assert_eq!(created.status, 201, "{}", created.body);
        let path = format!("/v1/resources/{}", created.json()["id"].as_str().unwrap());
        let tag = header(&api.call("GET", &path, "").await, "etag")
            .unwrap()
            .to_owned();
        let name = api.provider_ids().await.remove(0);
        let stale = api
            .call_raw(
                "DELETE",
                &path,
                "If-Match: \"x\"\r\nIf-Match: \"y\"\r\n",
                "",
            )
            .await;
        assert_envelope(&stale, 412, "precondition_failed");
        assert!(api.database_exists(&name).await, "nothing was deleted");
        let listed = api
            .call_raw(
                "DELETE",
                &path,
                &format!("If-Match: \"x\"\r\nIf-Match: {tag}\r\n"),
                "",
            )
            .await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert!(!api.database_exists(&name).await);
    }

    /// PROV-6: actions name only what this deployment offers, and follow the compensation.
    #[tokio::test]
    async fn every_agent_action_names_only_endpoints_and_types_this_deployment_offers() {
        let api = api().await;
        let answer = api
            .call("POST", "/v1/resources", &api.create_body("redis", "pro"))
            .await;
        assert_envelope(&answer, 400, "unknown_resource_type");
        let body = answer.json();
        let text = format!("{} {}", body["message"], body["agent_action"]);
        assert!(
            body["message"].as_str().unwrap().ends_with("postgres"),
            "{text}"
        );
        for absent in ["redis", "namespace", "list the team"] {
            assert!(!text.contains(absent), "{absent}: {text}");
        }
        for &code in ErrorCode::ALL {
            let action = code.agent_action(&api.state.docs);
            for absent in ["redis", "namespace", "list the", "create the team"] {
                assert!(!action.contains(absent), "{code}: {action}");
            }
        }
    }

    /// PROV-6, PROV-18: a failure whose cleanup is unfinished never says "nothing was left
    /// behind"; the 503 names the reserved resource, whose row GET can read.
    #[tokio::test]
    async fn every_agent_action_is_consistent_with_the_compensation_outcome() {
        let api = api().await;
        api.state.provisioner.store().fail(StoreStep::Activate, 1);
        api.state.provisioner.store().fail(StoreStep::Abandon, 2);
        let answer = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_envelope(&answer, 503, "provision_incomplete");
        let body = answer.json();
        assert!(
            !body["agent_action"]
                .as_str()
                .unwrap()
                .contains("nothing was left"),
            "{body}"
        );
        assert!(
            !body["message"].as_str().unwrap().contains("(recorded"),
            "{body}"
        );
        let id = body["resource_id"].as_str().unwrap().to_owned();
        let read = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(read.status, 200);
        assert_eq!(read.json()["status"], "pending");
    }

    /// PROV-18, PROV-6: a Location on the 201, one canonical id form, and an outage answered
    /// alike by GET, POST and DELETE.
    #[tokio::test]
    async fn http_details_location_canonical_ids_and_outage_answers() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = created.json()["id"].as_str().unwrap().to_owned();
        assert!(
            created
                .head
                .to_lowercase()
                .contains(&format!("location: /v1/resources/{id}")),
            "{}",
            created.head
        );
        for other_form in [
            id.to_uppercase(),
            format!("{{{id}}}"),
            id.replace('-', ""),
            format!("urn:uuid:{id}"),
        ] {
            let answer = api
                .call("GET", &format!("/v1/resources/{other_form}"), "")
                .await;
            assert_envelope(&answer, 400, "invalid_request");
        }
        api.state.provisioner.store().fail(StoreStep::Get, 1);
        let outage = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_envelope(&outage, 503, "backend_unavailable");
    }

    /// PROV-5 (the SIGTERM variant of the fault matrix): a client gives up mid-flow and the
    /// process is told to stop; the provisioning in flight still finishes before the server
    /// returns, so no `pending` row and no unowned database are left.
    #[tokio::test]
    async fn shutdown_waits_for_in_flight_provisioning() {
        let mut api = api().await;
        // The finalize takes a while: shutdown arrives while it runs.
        api.slow_down_finalize(1.5).await;
        let body = api.create_body("postgres", "pro");
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let request = format!(
            "POST /v1/resources HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            api.key,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // Wait until the flow has reached its finalize (the database exists), then the client
        // disconnects and the process is told to stop.
        loop {
            let names = api.provider_ids().await;
            if let Some(name) = names.first()
                && api.database_exists(name).await
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(stream);
        api.stop.cancel();
        api.served.take().unwrap().await.unwrap();
        let (status, name): (String, String) =
            sqlx::query_as("SELECT status, 'cust_' || token_digest FROM resources")
                .fetch_one(api.db.pool())
                .await
                .unwrap();
        assert_eq!(
            status, "active",
            "the flow in flight was drained, not cut short"
        );
        assert!(api.database_exists(&name).await);
    }

    /// PROV-10: a GET or DELETE stuck behind the store answers 503 at the request deadline
    /// instead of hanging; the DELETE names the resource so it can be sent again.
    #[tokio::test]
    async fn a_request_stuck_behind_the_store_answers_503_at_its_deadline() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let mut blocker = api.db.pool().begin().await.unwrap();
        sqlx::query("LOCK TABLE resources IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *blocker)
            .await
            .unwrap();
        let read = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_envelope(&read, 503, "backend_unavailable");
        let delete = api.call("DELETE", &format!("/v1/resources/{id}"), "").await;
        assert_envelope(&delete, 503, "backend_unavailable");
        assert_eq!(delete.json()["resource_id"], id.as_str());
        blocker.rollback().await.unwrap();
        let again = api.call("DELETE", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(again.status, 200, "{}", again.body);
    }

    /// POSTs of many teams at once on a small pool all provision: a POST holds a connection
    /// under its team's quota lock while its reservation takes another, and at most half the
    /// pool is held so, so no burst can hold every connection while each waits for one more
    /// (which answered 503 after the deadline for most of them).
    #[tokio::test]
    async fn a_burst_of_posts_from_many_teams_never_holds_every_connection() {
        let db = keel_testkit::database().await;
        let small = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(db.pool().connect_options().as_ref().clone())
            .await
            .unwrap();
        // A deadline no burst on a loaded machine reaches while it makes progress: only
        // connections held while each waits for one more (which no deadline ends) fail it.
        let api = api_on_pool(
            db,
            Limits::default(),
            small,
            std::time::Duration::from_secs(30),
        )
        .await;
        let mut teams = Vec::new();
        for _ in 0..8 {
            let team = TeamId::from_uuid(api.db.team("pro").await);
            teams.push((team, key_for(api.db.pool(), Scope::Team(team)).await));
        }
        let posts = teams.iter().map(|(team, key)| {
            let body =
                json!({"team_id": team.to_string(), "resource_type": "postgres", "tier": "pro"})
                    .to_string();
            let addr = api.addr;
            let key = key.clone();
            tokio::spawn(async move {
                send(
                    addr,
                    Some(&key),
                    "POST",
                    "/v1/resources",
                    "Content-Type: application/json\r\n",
                    &body,
                )
                .await
            })
        });
        let mut statuses = Vec::new();
        for post in posts.collect::<Vec<_>>() {
            let answer = post.await.unwrap();
            statuses.push((answer.status, answer.body));
        }
        for (status, body) in &statuses {
            assert_eq!(*status, 201, "{body}");
        }
        assert_eq!(api.provider_ids().await.len(), 8);
    }

    /// An API key sent as `X-Request-Id` (by mistake, or to plant it) is never taken as the
    /// request id: the request gets a fresh one, and the key reaches no audit row.
    #[tokio::test]
    async fn an_api_key_sent_as_the_request_id_is_never_stored() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let request = format!(
            "POST /v1/resources HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
             X-Request-Id: {key}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len(),
            key = api.key,
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let created = Answer {
            status: raw[9..12].parse().unwrap(),
            head: String::new(),
            body: raw.split_once("\r\n\r\n").unwrap().1.to_owned(),
        };
        assert_eq!(created.status, 201, "{}", created.body);
        let stored: Vec<Option<String>> = sqlx::query_scalar("SELECT request_id FROM audit_events")
            .fetch_all(api.db.pool())
            .await
            .unwrap();
        assert!(!stored.is_empty());
        for request_id in stored.iter().flatten() {
            assert!(!request_id.contains(&api.key), "{request_id}");
            assert!(!api.key.contains(request_id.as_str()), "{request_id}");
        }
    }

    /// PROV-10: admission control. Past the in-flight limit a POST is refused with 503 and
    /// `Retry-After` before anything is reserved, counted as `shed`; once a permit frees up the
    /// same POST provisions.
    #[tokio::test]
    async fn past_the_in_flight_limit_a_post_is_refused_before_anything_is_reserved() {
        let api = api().await;
        let all = Arc::clone(&api.state.admission)
            .acquire_many_owned(8)
            .await
            .unwrap();
        let refused = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_envelope(&refused, 503, "too_many_provisions");
        assert!(
            refused.head.to_lowercase().contains("retry-after: 5"),
            "{}",
            refused.head
        );
        assert!(refused.json().get("resource_id").is_none());
        assert!(api.provider_ids().await.is_empty(), "nothing was reserved");
        assert_eq!(
            api.state
                .provisioner
                .metrics()
                .outcomes(ResourceType::Postgres, keel_provision::Outcome::Shed),
            1
        );
        let metrics = api.call("GET", "/metrics", "").await;
        assert!(
            metrics.body.contains(
                "instant_provision_outcomes_total{resource_type=\"postgres\",outcome=\"shed\"} 1"
            ),
            "{}",
            metrics.body
        );
        drop(all);
        let admitted = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_eq!(admitted.status, 201, "{}", admitted.body);
        assert_eq!(
            api.state.admission.available_permits(),
            8,
            "the permit came back"
        );
    }

    /// PROV-10: a POST whose flow outlives the request deadline is answered with the reserved
    /// resource's id and "still being created" (never "failed"); the flow goes on in its own task
    /// and the resource GET names becomes active.
    #[tokio::test]
    async fn a_post_past_its_deadline_names_the_reserved_resource_and_never_says_failed() {
        let api = api().await;
        // The finalize outlasts the request deadline (2 s) but not the store deadline (5 s).
        api.slow_down_finalize(3.0).await;
        let answer = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_envelope(&answer, 503, "provision_pending");
        let body = answer.json();
        let text = format!("{} {}", body["message"], body["agent_action"]);
        // "failed" appears only as one of the statuses to wait for.
        let claims = text.replace("active or failed", "");
        for untrue in [
            "failed",
            "could not be created",
            "nothing was left",
            "retry",
        ] {
            assert!(!claims.contains(untrue), "{text}");
        }
        assert!(text.contains("GET"), "{text}");
        assert!(!text.contains("postgres://"), "{text}");
        let id = body["resource_id"].as_str().unwrap().to_owned();
        assert_eq!(
            header(&answer, "location"),
            Some(format!("/v1/resources/{id}").as_str()),
            "the answer points at the resource to poll"
        );
        let first = api.call("GET", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(first.json()["status"], "pending", "{}", first.body);
        // The flow was not cut short: the resource it reserved becomes active.
        let status = loop {
            let read = api.call("GET", &format!("/v1/resources/{id}"), "").await;
            let status = read.json()["status"].as_str().unwrap().to_owned();
            if status != "pending" {
                break status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert_eq!(status, "active");
        let name = api.provider_ids().await.remove(0);
        assert!(api.database_exists(&name).await);
        assert_eq!(
            api.state
                .provisioner
                .metrics()
                .answered_pending_total(ResourceType::Postgres),
            1
        );
    }

    /// A singleton header sent on two lines is an error, never its first line; a list header
    /// on several lines is every line, in order.
    #[test]
    fn a_singleton_header_is_read_once_and_a_list_header_whole() {
        let mut headers = HeaderMap::new();
        assert_eq!(single_header(&headers, "authorization"), Ok(None));
        assert_eq!(list_header(&headers, "if-match").unwrap(), None);
        headers.append("authorization", "Bearer a".parse().unwrap());
        headers.append("if-match", "\"x\"".parse().unwrap());
        assert_eq!(
            single_header(&headers, "authorization").map(|v| v.map(|v| v.as_bytes())),
            Ok(Some(&b"Bearer a"[..]))
        );
        assert_eq!(
            list_header(&headers, "if-match").unwrap().as_deref(),
            Some("\"x\"")
        );
        headers.append("authorization", "Bearer b".parse().unwrap());
        headers.append("if-match", "\"y\", \"z\"".parse().unwrap());
        assert_eq!(
            single_header(&headers, "authorization"),
            Err(RepeatedHeader("authorization"))
        );
        assert_eq!(
            list_header(&headers, "if-match").unwrap().as_deref(),
            Some("\"x\", \"y\", \"z\"")
        );
        headers.append(
            "if-match",
            header::HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        assert!(list_header(&headers, "if-match").is_err());
    }

    #[test]
    fn a_request_id_sent_twice_labels_nothing_and_a_fresh_one_is_given() {
        let mut headers = HeaderMap::new();
        headers.append(REQUEST_ID_HEADER, "mine-a".parse().unwrap());
        assert_eq!(request_id(&headers).as_str(), "mine-a");
        headers.append(REQUEST_ID_HEADER, "mine-a".parse().unwrap());
        let twice = request_id(&headers);
        assert_ne!(twice.as_str(), "mine-a");
        headers.append(REQUEST_ID_HEADER, "mine-b".parse().unwrap());
        let ids: Vec<_> = (0..2).map(|_| request_id(&headers)).collect();
        assert!(ids.iter().all(|id| !id.as_str().starts_with("mine-")));
        assert_ne!(ids[0], ids[1], "each fresh id is its own");
    }

    fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
        answer.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// PROV-18: GET shows `updated_at` and an `ETag` that changes with the row; DELETE honours
    /// `If-Match` and, on a version that is not the current one, answers 412 in the envelope and
    /// deletes nothing.
    #[tokio::test]
    async fn delete_with_a_stale_if_match_answers_412_and_deletes_nothing() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let path = format!("/v1/resources/{id}");
        let first = api.call("GET", &path, "").await;
        let first_tag = header(&first, "etag").unwrap().to_owned();
        assert!(
            first_tag.starts_with('"') && first_tag.ends_with('"'),
            "{first_tag}"
        );
        let first_updated = first.json()["updated_at"].as_str().unwrap().to_owned();
        let again = api.call("GET", &path, "").await;
        assert_eq!(
            header(&again, "etag"),
            Some(first_tag.as_str()),
            "the same version has the same tag"
        );
        // The row changes (as a tier change by propagation would).
        sqlx::query(
            "UPDATE resources SET tier = 'free', updated_at = updated_at + interval '1 second' \
              WHERE id = $1",
        )
        .bind(uuid::Uuid::parse_str(&id).unwrap())
        .execute(api.db.pool())
        .await
        .unwrap();
        let second = api.call("GET", &path, "").await;
        let second_tag = header(&second, "etag").unwrap().to_owned();
        assert_ne!(first_tag, second_tag);
        assert_ne!(second.json()["updated_at"].as_str().unwrap(), first_updated);

        let name = api.provider_ids().await.remove(0);
        for stale in [first_tag.clone(), format!("W/{second_tag}"), "\"x\"".into()] {
            let refused = api.call_with("DELETE", &path, "If-Match", &stale).await;
            assert_envelope(&refused, 412, "precondition_failed");
            assert_eq!(refused.json()["resource_id"], id.as_str());
            assert!(api.database_exists(&name).await, "nothing was deleted");
        }
        assert_eq!(api.call("GET", &path, "").await.json()["status"], "active");
        let kinds = api.audit_kinds().await;
        assert_eq!(
            kinds,
            [AuditKind::ProvisionCreated],
            "no deprovision recorded"
        );

        let deleted = api
            .call_with("DELETE", &path, "If-Match", &format!("\"x\", {second_tag}"))
            .await;
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        assert!(!api.database_exists(&name).await);
        let missing = format!("/v1/resources/{}", ResourceId::new_random());
        let absent = api.call_with("DELETE", &missing, "If-Match", "*").await;
        assert_envelope(&absent, 412, "precondition_failed");
    }

    const JSON: &str = "Content-Type: application/json\r\n";

    fn idempotent(key: &str) -> String {
        format!("{JSON}Idempotency-Key: {key}\r\n")
    }

    impl Api {
        /// The `(kind, actor)` of every audit row, oldest first.
        async fn audit_actors(&self) -> Vec<(AuditKind, String)> {
            let mut conn = self.db.pool().acquire().await.unwrap();
            fetch(&mut conn, &AuditFilter::default())
                .await
                .unwrap()
                .into_iter()
                .map(|stored| {
                    (
                        stored.event.kind(),
                        stored.event.actor().as_str().to_owned(),
                    )
                })
                .collect()
        }

        /// A second team with a key of its own.
        async fn other_team(&self) -> (TeamId, String) {
            let team = TeamId::from_uuid(self.db.team("pro").await);
            (team, key_for(self.db.pool(), Scope::Team(team)).await)
        }

        async fn count(&self, sql: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                .fetch_one(self.db.pool())
                .await
                .unwrap()
        }
    }

    fn key_id(key: &str) -> &str {
        &key["keel_".len().."keel_".len() + 12]
    }

    /// PROV-2: no key, a malformed key, an unknown key and a revoked key all answer 401 in the
    /// envelope, and nothing is done; a revocation is audited.
    #[tokio::test]
    async fn requests_without_a_live_key_answer_401_in_the_envelope() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        let unknown = format!("keel_0123456789ab_{}", "A".repeat(43));
        let malformed = "keel_nope".to_owned();
        for key in [None, Some(malformed.as_str()), Some(unknown.as_str())] {
            for (method, path) in [
                ("POST", "/v1/resources"),
                ("GET", "/v1/resources"),
                ("GET", "/v1/resources/00000000-0000-4000-8000-000000000000"),
            ] {
                let answer = api.call_keyed(key, method, path, JSON, &body).await;
                assert_envelope(&answer, 401, "unauthorized");
                assert_eq!(header(&answer, "www-authenticate"), Some("Bearer"));
            }
        }
        assert!(api.provider_ids().await.is_empty(), "nothing was reserved");
        // The document describes; it needs no key.
        let document = api.call_keyed(None, "GET", "/openapi.json", "", "").await;
        assert_eq!(document.status, 200, "{}", document.body);
        assert_eq!(document.json()["openapi"], "3.1.0");
        assert!(document.json()["x-keel-error-codes"].is_array());

        let ok = api.call("GET", "/v1/resources", "").await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        let revoked = keys::revoke(
            api.db.pool(),
            &crate::KeyId::parse(key_id(&api.key)).unwrap(),
            keel_audit::Actor::parse("operator:test").unwrap(),
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
        assert!(revoked);
        let refused = api.call("GET", "/v1/resources", "").await;
        assert_envelope(&refused, 401, "unauthorized");
        let kinds = api.audit_kinds().await;
        assert_eq!(kinds, [AuditKind::ApiKeyRevoked]);
    }

    /// PROV-2: team B's key can neither read, list, rotate nor delete team A's resource (each
    /// answers as if it did not exist), nor create for team A; a team key cannot use an
    /// operator's reason; an operator key can do all of it.
    #[tokio::test]
    async fn a_principal_cannot_read_or_delete_another_teams_resource() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let name = api.provider_ids().await.remove(0);
        let (other, other_key) = api.other_team().await;
        let other_key = Some(other_key.as_str());
        let path = format!("/v1/resources/{id}");
        for (method, path) in [
            ("GET", path.clone()),
            ("DELETE", path.clone()),
            ("DELETE", format!("{path}?reason=customer_request")),
            ("POST", format!("{path}/rotate-credentials")),
        ] {
            let answer = api.call_keyed(other_key, method, &path, "", "").await;
            assert_envelope(&answer, 404, "resource_not_found");
        }
        let listed = api
            .call_keyed(other_key, "GET", "/v1/resources", "", "")
            .await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(listed.json()["resources"], json!([]));
        let asked = api
            .call_keyed(
                other_key,
                "GET",
                &format!("/v1/resources?team_id={}", api.team),
                "",
                "",
            )
            .await;
        assert_envelope(&asked, 422, "team_not_found");
        let for_a = api
            .call_keyed(
                other_key,
                "POST",
                "/v1/resources",
                JSON,
                &api.create_body("postgres", "pro"),
            )
            .await;
        assert_envelope(&for_a, 422, "team_not_found");
        assert!(api.database_exists(&name).await, "nothing was deleted");
        assert_eq!(api.provider_ids().await.len(), 1, "nothing was created");

        for reason in ["operator", "expired"] {
            let own = api
                .call("DELETE", &format!("{path}?reason={reason}"), "")
                .await;
            assert_envelope(&own, 403, "forbidden");
        }
        assert!(api.database_exists(&name).await);

        let operator = key_for(api.db.pool(), Scope::Operator).await;
        let operator = Some(operator.as_str());
        let all = api
            .call_keyed(operator, "GET", "/v1/resources", "", "")
            .await;
        assert_eq!(all.json()["resources"][0]["id"], id.as_str());
        let read = api.call_keyed(operator, "GET", &path, "", "").await;
        assert_eq!(read.status, 200);
        let for_other = api
            .call_keyed(
                operator,
                "POST",
                "/v1/resources",
                JSON,
                &json!({"team_id": other.to_string(), "resource_type": "postgres", "tier": "pro"})
                    .to_string(),
            )
            .await;
        assert_eq!(for_other.status, 201, "an operator acts for any team");
        let deleted = api
            .call_keyed(
                operator,
                "DELETE",
                &format!("{path}?reason=operator"),
                "",
                "",
            )
            .await;
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        assert!(!api.database_exists(&name).await);
    }

    /// PROV-2: the audit actor is the key that authenticated the request; a header naming
    /// another actor (every test request sends `X-Keel-Actor: operator:forged`) is ignored.
    #[tokio::test]
    async fn the_audit_actor_is_the_authenticated_principal() {
        let api = api().await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let rotated = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        let deleted = api.call("DELETE", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(deleted.status, 200, "{}", deleted.body);
        let by_key = format!("key:{}", key_id(&api.key));
        let actors = api.audit_actors().await;
        assert_eq!(
            actors,
            [
                (AuditKind::ApiKeyCreated, "operator:test".to_owned()),
                (AuditKind::ProvisionCreated, by_key.clone()),
                (AuditKind::ResourceCredentialsRotated, by_key.clone()),
                (AuditKind::ResourceDeprovisioned, by_key),
            ]
        );
    }

    /// An outcome another writer put in an idempotency key (a status this API never stores, a
    /// 201 whose id is not a resource id) is never replayed: the retry answers 500 in the error
    /// format, with no `Location`, and nothing is reserved.
    #[tokio::test]
    async fn an_outcome_this_api_never_stores_is_never_replayed() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        let first = api
            .call_raw("POST", "/v1/resources", &idempotent("odd-1"), &body)
            .await;
        assert_eq!(first.status, 201, "{}", first.body);
        for (status, stored) in [
            (101, json!({"id": "x", "ok": true})),
            (999, json!({"ok": true})),
            (500, json!({"ok": true})),
            (201, json!({"id": "../../../evil.example.com/x"})),
        ] {
            sqlx::query(
                "UPDATE provision_api.idempotency_keys SET response_status = $1, response_body = $2",
            )
            .bind(status)
            .bind(&stored)
            .execute(api.db.pool())
            .await
            .unwrap();
            let again = api
                .call_raw("POST", "/v1/resources", &idempotent("odd-1"), &body)
                .await;
            assert_envelope(&again, 500, "internal");
            assert!(
                !again.head.to_lowercase().contains("location:"),
                "{status}: {}",
                again.head
            );
        }
        assert_eq!(api.count("SELECT count(*) FROM resources").await, 1);
    }

    /// PROV-3: ten concurrent POSTs with one Idempotency-Key make one resource and one
    /// database; every answer is that resource's 201 (or 409 while it is in flight); a later
    /// retry replays the 201 without the password.
    #[tokio::test]
    async fn the_same_idempotency_key_yields_one_resource() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (addr, key, body) = (api.addr, api.key.clone(), body.clone());
            calls.spawn(async move {
                send(
                    addr,
                    Some(&key),
                    "POST",
                    "/v1/resources",
                    &idempotent("agent-attempt-42"),
                    &body,
                )
                .await
            });
        }
        let answers = calls.join_all().await;
        let ids: BTreeSet<String> = answers
            .iter()
            .filter(|answer| answer.status == 201)
            .map(|answer| answer.json()["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1, "one resource answered");
        for answer in &answers {
            match answer.status {
                201 => {}
                409 => assert_envelope(answer, 409, "idempotency_key_in_use"),
                other => panic!("unexpected {other}: {}", answer.body),
            }
        }
        assert_eq!(api.count("SELECT count(*) FROM resources").await, 1);
        let name = api.provider_ids().await.remove(0);
        assert!(api.database_exists(&name).await);
        let id = ids.into_iter().next().unwrap();
        let again = api
            .call_raw(
                "POST",
                "/v1/resources",
                &idempotent("agent-attempt-42"),
                &body,
            )
            .await;
        assert_eq!(again.status, 201, "{}", again.body);
        assert_eq!(again.json()["id"], id.as_str());
        assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
        assert_eq!(
            header(&again, "location"),
            Some(format!("/v1/resources/{id}").as_str())
        );
        assert!(
            again.json().get("connection_url").is_none(),
            "{}",
            again.body
        );
        assert!(!again.body.contains("postgres://"));
        assert_eq!(api.count("SELECT count(*) FROM resources").await, 1);
    }

    /// PROV-3: a key reused with other parameters is refused with 422 and creates nothing; keys
    /// are scoped to the caller, so another team's same key is its own.
    #[tokio::test]
    async fn a_reused_key_with_different_parameters_is_refused() {
        let api = api().await;
        let first = api
            .call_raw(
                "POST",
                "/v1/resources",
                &idempotent("k-1"),
                &api.create_body("postgres", "pro"),
            )
            .await;
        assert_eq!(first.status, 201, "{}", first.body);
        let other = api
            .call_raw(
                "POST",
                "/v1/resources",
                &idempotent("k-1"),
                &api.create_body("postgres", "free"),
            )
            .await;
        assert_envelope(&other, 422, "idempotency_key_reused");
        assert_eq!(api.provider_ids().await.len(), 1);
        let (team, key) = api.other_team().await;
        let theirs = api
            .call_keyed(
                Some(&key),
                "POST",
                "/v1/resources",
                &idempotent("k-1"),
                &json!({"team_id": team.to_string(), "resource_type": "postgres", "tier": "free"})
                    .to_string(),
            )
            .await;
        assert_eq!(theirs.status, 201, "{}", theirs.body);
        let bad = api
            .call_raw(
                "POST",
                "/v1/resources",
                &idempotent("\u{7f}"),
                &api.create_body("postgres", "pro"),
            )
            .await;
        assert_eq!(bad.status, 400, "{}", bad.body);
    }

    /// PROV-3: a compensated 503 is not stored as the key's outcome: the retry with the same key
    /// runs anew and creates the resource.
    #[tokio::test]
    async fn a_compensated_failure_is_not_replayed() {
        let api = api().await;
        api.state.provisioner.store().fail(StoreStep::Activate, 1);
        let body = api.create_body("postgres", "pro");
        let failed = api
            .call_raw("POST", "/v1/resources", &idempotent("retry-me"), &body)
            .await;
        assert_envelope(&failed, 503, "provision_failed");
        let retried = api
            .call_raw("POST", "/v1/resources", &idempotent("retry-me"), &body)
            .await;
        assert_eq!(retried.status, 201, "{}", retried.body);
        assert!(header(&retried, "idempotent-replayed").is_none());
        assert!(retried.json()["connection_url"].is_string());
    }

    /// Connects with `url` through psql (the Debian client beside the test server's binaries).
    fn psql_connects(url: &str) -> bool {
        let psql = keel_testkit::find_bin_dir().unwrap().join("psql");
        let out = std::process::Command::new(psql)
            .args(["-X", "-A", "-t", "-c", "SELECT 1", url])
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// PROV-3: a POST whose client gave up (timed out) before the answer still creates its
    /// resource once; the retry with its key returns that resource, and rotation gives working
    /// credentials (psql connects with them).
    #[tokio::test]
    async fn a_retried_post_after_a_client_timeout_returns_the_resource() {
        let api = api_on(
            keel_testkit::database_on(password_server()).await,
            Limits::default(),
        )
        .await;
        api.slow_down_finalize(1.0).await;
        let body = api.create_body("postgres", "pro");
        let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let request = format!(
            "POST /v1/resources HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\nIdempotency-Key: lost-answer\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            api.key,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // The client gives up once the work has started (the row is reserved).
        while api.provider_ids().await.is_empty() {
            tokio::task::yield_now().await;
        }
        drop(stream);
        // Until the first finishes, a retry is told to wait (naming the reserved id once the
        // key records it); then it gets the resource.
        let mut told_ids = Vec::new();
        let answer = loop {
            let answer = api
                .call_raw("POST", "/v1/resources", &idempotent("lost-answer"), &body)
                .await;
            if answer.status != 409 {
                break answer;
            }
            assert_envelope(&answer, 409, "idempotency_key_in_use");
            if let Some(id) = answer.json()["resource_id"].as_str() {
                told_ids.push(id.to_owned());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert_eq!(answer.status, 201, "{}", answer.body);
        assert_eq!(header(&answer, "idempotent-replayed"), Some("true"));
        let id = answer.json()["id"].as_str().unwrap().to_owned();
        assert!(
            told_ids.iter().all(|told| *told == id),
            "a 409 named another resource: {told_ids:?} vs {id}"
        );
        assert_eq!(api.provider_ids().await.len(), 1, "one resource");
        let rotated = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        let url = rotated.json()["connection_url"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            psql_connects(&url),
            "psql connects with the rotated credentials"
        );
    }

    /// Rotation: a new password works, the old one stops working, the rotation is audited, and
    /// a resource that is not active has nothing to rotate.
    #[tokio::test]
    async fn rotating_credentials_issues_a_working_password_and_retires_the_old_one() {
        let api = api_on(
            keel_testkit::database_on(password_server()).await,
            Limits::default(),
        )
        .await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let old = created.json()["connection_url"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(psql_connects(&old));
        let rotated = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_eq!(rotated.status, 200, "{}", rotated.body);
        assert!(
            rotated
                .head
                .to_lowercase()
                .contains("cache-control: no-store")
        );
        let new = rotated.json()["connection_url"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(new, old);
        assert!(psql_connects(&new));
        assert!(!psql_connects(&old), "the old password no longer works");
        assert!(
            api.audit_kinds()
                .await
                .contains(&AuditKind::ResourceCredentialsRotated)
        );
        let deleted = api.call("DELETE", &format!("/v1/resources/{id}"), "").await;
        assert_eq!(deleted.status, 200);
        let gone = api
            .call(
                "POST",
                &format!("/v1/resources/{id}/rotate-credentials"),
                "",
            )
            .await;
        assert_envelope(&gone, 409, "resource_not_active");
    }

    /// GET /v1/resources: the team's resources, newest first, filtered by status and type, in
    /// pages joined by a cursor; bad parameters are named.
    #[tokio::test]
    async fn listing_pages_through_the_teams_resources_with_filters() {
        let api = api().await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let created = api
                .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
                .await;
            ids.push(created.json()["id"].as_str().unwrap().to_owned());
        }
        let deleted = api
            .call("DELETE", &format!("/v1/resources/{}", ids[0]), "")
            .await;
        assert_eq!(deleted.status, 200);
        let first = api.call("GET", "/v1/resources?limit=2", "").await;
        assert_eq!(first.status, 200, "{}", first.body);
        let page: Vec<String> = first.json()["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(page, [ids[2].clone(), ids[1].clone()], "newest first");
        let cursor = first.json()["next_cursor"].as_str().unwrap().to_owned();
        let second = api
            .call("GET", &format!("/v1/resources?limit=2&cursor={cursor}"), "")
            .await;
        assert_eq!(second.json()["resources"][0]["id"], ids[0].as_str());
        assert_eq!(second.json()["resources"].as_array().unwrap().len(), 1);
        assert!(second.json()["next_cursor"].is_null());
        let active = api
            .call(
                "GET",
                "/v1/resources?status=active&resource_type=postgres",
                "",
            )
            .await;
        assert_eq!(active.json()["resources"].as_array().unwrap().len(), 2);
        let deleted = api.call("GET", "/v1/resources?status=deleted", "").await;
        assert_eq!(deleted.json()["resources"][0]["id"], ids[0].as_str());
        for (query, field) in [
            ("status=gone", "status"),
            ("resource_type=mysql", "resource_type"),
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("cursor=nope", "cursor"),
            // About the year -5000: the database cannot hold it, so it is the client's error,
            // not an outage to retry.
            (
                "cursor=-219951955440000000.0123456789abcdef0123456789abcdef",
                "cursor",
            ),
            ("colour=red", "colour"),
        ] {
            let answer = api.call("GET", &format!("/v1/resources?{query}"), "").await;
            assert_envelope(&answer, 400, "invalid_request");
            assert!(
                answer.json()["message"].as_str().unwrap().contains(field),
                "{query}"
            );
        }
    }

    /// Limits: past its rate a key is answered 429 with `Retry-After` (another key is not);
    /// past its quota a team is answered `quota_exceeded` and nothing is reserved.
    #[tokio::test]
    async fn a_key_past_its_rate_gets_429_and_a_team_past_its_quota_reserves_nothing() {
        let api = api_with(Limits {
            requests_per_minute: 3,
            team_quota: 1,
            ..Limits::default()
        })
        .await;
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let refused = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        assert_envelope(&refused, 403, "quota_exceeded");
        assert_eq!(api.provider_ids().await.len(), 1, "nothing was reserved");
        let third = api.call("GET", "/v1/resources", "").await;
        assert_eq!(third.status, 200, "the third of three");
        let limited = api.call("GET", "/v1/resources", "").await;
        assert_envelope(&limited, 429, "rate_limited");
        let wait: u64 = header(&limited, "retry-after").unwrap().parse().unwrap();
        assert!((1..=21).contains(&wait), "{wait}");
        assert_eq!(limited.json()["retry_after_seconds"], wait);
        let (_, other) = api.other_team().await;
        let theirs = api
            .call_keyed(Some(&other), "GET", "/v1/resources", "", "")
            .await;
        assert_eq!(theirs.status, 200, "another key has its own budget");
    }

    /// The router mounted in another axum app under a prefix: it answers there, and its
    /// `Location` headers carry the prefix.
    #[tokio::test]
    async fn mounted_under_a_prefix_the_router_answers_there_and_locations_follow() {
        let db = keel_testkit::database().await;
        let team = TeamId::from_uuid(db.team("pro").await);
        let provisioner = Provisioner::new(
            PgResourceStore::new(db.pool().clone()),
            Backends {
                postgres: Some(PgClusterBackend::new(db.server().admin_options(), None, 4)),
                namespaces: None,
            },
            ProvisionMetrics::register(&mut Registry::default()),
        );
        let state = Arc::new(AppState::new(provisioner, db.pool().clone()));
        let app = Router::new()
            .route("/", get(|| async { "host app" }))
            .nest("/platform/provisioning", router(Arc::clone(&state)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(
            listener,
            app,
            state.tracker.clone(),
            stop.clone(),
            std::time::Duration::from_secs(30),
        ));
        let key = key_for(db.pool(), Scope::Team(team)).await;
        let body = json!({"team_id": team.to_string(), "resource_type": "postgres", "tier": "pro"})
            .to_string();
        let created = send(
            addr,
            Some(&key),
            "POST",
            "/platform/provisioning/v1/resources",
            JSON,
            &body,
        )
        .await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = created.json()["id"].as_str().unwrap().to_owned();
        let location = header(&created, "location").unwrap().to_owned();
        assert_eq!(
            location,
            format!("/platform/provisioning/v1/resources/{id}")
        );
        let read = send(addr, Some(&key), "GET", &location, "", "").await;
        assert_eq!(read.status, 200, "{}", read.body);
        let host = send(addr, None, "GET", "/", "", "").await;
        assert_eq!(host.body, "host app");
        stop.cancel();
        served.await.unwrap().unwrap();
    }

    /// Keys whose request a crash cut short (still in flight long after): one that reserved
    /// nothing is released, so the retry runs anew; one whose resource went active replays that
    /// resource. Neither answers 409 until it expires.
    #[tokio::test]
    async fn a_key_whose_request_was_cut_short_never_answers_409_until_it_expires() {
        let api = api().await;
        let pool = api.db.pool();
        let fingerprint = idempotency::fingerprint(&["x"]);
        let retention = std::time::Duration::from_secs(3600);
        let slot = |key: &str| Slot {
            scope: "team:test".into(),
            key: IdempotencyKey::parse(key).unwrap(),
        };
        for key in ["cut-short", "working"] {
            let claimed = idempotency::claim(pool, &slot(key), &fingerprint, retention)
                .await
                .unwrap();
            assert_eq!(claimed, Claim::Claimed);
        }
        let created = api
            .call("POST", "/v1/resources", &api.create_body("postgres", "pro"))
            .await;
        let id = ResourceId::from_str(created.json()["id"].as_str().unwrap()).unwrap();
        idempotency::note_resource(pool, &slot("working"), id)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE provision_api.idempotency_keys SET created_at = now() - interval '1 hour'",
        )
        .execute(pool)
        .await
        .unwrap();
        let released = idempotency::release_abandoned(pool, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(released, 2);
        let again = idempotency::claim(pool, &slot("cut-short"), &fingerprint, retention)
            .await
            .unwrap();
        assert_eq!(
            again,
            Claim::Claimed,
            "nothing was reserved: the retry runs anew"
        );
        let Claim::Replay { status, body } =
            idempotency::claim(pool, &slot("working"), &fingerprint, retention)
                .await
                .unwrap()
        else {
            panic!("a key whose resource went active replays it");
        };
        assert_eq!(status, 201);
        assert_eq!(body["id"], id.to_string().as_str());
        assert_eq!(body["status"], "active");
        assert!(body.get("connection_url").is_none());
        let fresh = idempotency::release_abandoned(pool, std::time::Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            fresh, 0,
            "the re-claimed key is young, the replayed one settled"
        );
    }

    /// A finalize that committed but whose reply was lost, followed by a store that fails the
    /// compensation's flip (a failover): the 503 cannot know whether the resource is live, so
    /// the key stays in flight naming it, and the retry with that key never creates a second
    /// live resource. Once the abandoned-key pass runs, the retry replays the live resource;
    /// one that was paused meanwhile replays it with its status.
    #[tokio::test]
    async fn a_retry_after_a_finalize_committed_unheard_never_creates_a_second_resource() {
        let api = api().await;
        let body = api.create_body("postgres", "pro");
        api.state
            .provisioner
            .store()
            .fail_after(StoreStep::Activate, 1);
        api.state.provisioner.store().fail(StoreStep::Abandon, 2);
        let first = api
            .call_raw("POST", "/v1/resources", &idempotent("agent-7"), &body)
            .await;
        assert_envelope(&first, 503, "provision_incomplete");
        let id = first.json()["resource_id"].as_str().unwrap().to_owned();
        let status: String = sqlx::query_scalar("SELECT status FROM resources WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(api.db.pool())
            .await
            .unwrap();
        assert_eq!(status, "active", "the finalize committed");

        let retry = api
            .call_raw("POST", "/v1/resources", &idempotent("agent-7"), &body)
            .await;
        assert_envelope(&retry, 409, "idempotency_key_in_use");
        assert_eq!(retry.json()["resource_id"], id.as_str(), "{}", retry.body);
        assert_eq!(api.count("SELECT count(*) FROM resources").await, 1);

        sqlx::query("UPDATE resources SET status = 'paused' WHERE id = $1::uuid")
            .bind(&id)
            .execute(api.db.pool())
            .await
            .unwrap();
        sqlx::query(
            "UPDATE provision_api.idempotency_keys SET created_at = now() - interval '1 hour'",
        )
        .execute(api.db.pool())
        .await
        .unwrap();
        let settled =
            idempotency::release_abandoned(api.db.pool(), std::time::Duration::from_secs(60))
                .await
                .unwrap();
        assert_eq!(settled, 1);
        let replayed = api
            .call_raw("POST", "/v1/resources", &idempotent("agent-7"), &body)
            .await;
        assert_eq!(replayed.status, 201, "{}", replayed.body);
        assert_eq!(replayed.json()["id"], id.as_str());
        assert_eq!(replayed.json()["status"], "paused");
        assert_eq!(header(&replayed, "idempotent-replayed"), Some("true"));
        assert_eq!(api.count("SELECT count(*) FROM resources").await, 1);
    }

    /// Concurrent POSTs of one team cannot together pass its quota: with a quota of two, of
    /// six at once exactly two are created and the others answer `quota_exceeded`.
    #[tokio::test]
    async fn concurrent_posts_never_pass_the_team_quota() {
        let api = api_with(Limits {
            team_quota: 2,
            ..Limits::default()
        })
        .await;
        let body = api.create_body("postgres", "pro");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let (addr, key, body) = (api.addr, api.key.clone(), body.clone());
            calls.spawn(async move {
                send(addr, Some(&key), "POST", "/v1/resources", JSON, &body).await
            });
        }
        let mut statuses: Vec<u16> = calls
            .join_all()
            .await
            .iter()
            .map(|answer| answer.status)
            .collect();
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 201, 403, 403, 403, 403]);
        assert_eq!(api.provider_ids().await.len(), 2);
    }
}
