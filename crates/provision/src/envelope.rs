//! Error envelopes that tell a caller — often an AI agent acting for a user — what to do next.
//!
//! Every error is a closed [`ErrorCode`]. The registry ([`ErrorCode::agent_action`]) maps a code to
//! the action the agent should take; every registered action obeys one contract, checked by a
//! test over all codes: it opens with "Tell the user", names the reason, names the action,
//! carries a full `https://` URL, and stays under 280 characters. Plumbing errors are
//! deliberately unregistered (see [`UNREGISTERED`]) and fall back to contacting support.

use std::fmt;

/// Most characters an agent action may have.
pub const MAX_AGENT_ACTION_CHARS: usize = 280;

/// Every error a provisioning API answers with. Closed: a new code must decide its action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum ErrorCode {
    /// The request body is not valid JSON or lacks a field.
    InvalidRequest,
    /// The resource type is not one the platform provisions.
    UnknownResourceType,
    /// The tier does not exist.
    UnknownTier,
    /// The team does not exist.
    TeamNotFound,
    /// The resource does not exist (or was deprovisioned).
    ResourceNotFound,
    /// The backend object could not be created or its row could not be finalized; the attempt was
    /// fully compensated: nothing was left behind and nothing is billed.
    ProvisionFailed,
    /// The attempt failed and its compensation is not finished (a teardown failed, or the row
    /// could not be settled yet, so the resource may even have been created): the platform
    /// settles it; a retry with the same `Idempotency-Key` answers the resource if it was
    /// created, and runs anew otherwise.
    ProvisionIncomplete,
    /// The resource is protected against deletion (`keel.dev/protect`).
    ResourceProtected,
    /// `If-Match` names a version of the resource that is not its current one.
    PreconditionFailed,
    /// No route has this path.
    RouteNotFound,
    /// The route does not answer this method.
    MethodNotAllowed,
    /// The body is larger than the limit.
    PayloadTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The backend is temporarily unavailable.
    BackendUnavailable,
    /// Too many provisionings are in flight on this instance; nothing was reserved.
    TooManyProvisions,
    /// The provisioning outlived the request deadline and is still running: the reserved
    /// resource may yet become active or fail. Never "failed".
    ProvisionPending,
    /// The request carries no API key, or one that is unknown, malformed or revoked.
    Unauthorized,
    /// The API key's scope does not allow this (a team key asking for an operator's reason).
    Forbidden,
    /// The key sent more requests than its rate limit allows; nothing was done.
    RateLimited,
    /// The team holds as many live resources as its quota allows; nothing was reserved.
    QuotaExceeded,
    /// A request with the same `Idempotency-Key` is still being processed.
    IdempotencyKeyInUse,
    /// The resource is not active (still pending, failed or deleted), so it has no credentials
    /// to rotate.
    ResourceNotActive,
    /// The `Idempotency-Key` was already used with a different request body.
    IdempotencyKeyReused,
    /// A database operation failed (plumbing; unregistered).
    DbError,
    /// An unexpected internal failure (plumbing; unregistered).
    Internal,
}

/// Codes deliberately without an agent action of their own: plumbing failures whose only honest
/// advice is to contact support with the request id. This is the one place they are listed.
pub const UNREGISTERED: &[ErrorCode] = &[ErrorCode::DbError, ErrorCode::Internal];

/// The base of the platform's error documentation, e.g. `https://docs.example.com/errors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocsBase(String);

/// A docs base that is not a short `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the error docs base must be an https:// URL of at most 60 characters without a trailing slash"
)]
pub struct InvalidDocsBase;

impl DocsBase {
    /// Parses the base; short enough that every action stays under the length limit.
    pub fn parse(url: &str) -> Result<Self, InvalidDocsBase> {
        let ok = url.starts_with("https://")
            && url.len() > "https://".len()
            && url.len() <= 60
            && !url.ends_with('/')
            && !url.chars().any(char::is_whitespace);
        if ok {
            Ok(Self(url.to_owned()))
        } else {
            Err(InvalidDocsBase)
        }
    }

    fn page(&self, code: ErrorCode) -> String {
        format!("{}/{}", self.0, code.as_str())
    }
}

impl ErrorCode {
    /// Every code.
    pub const ALL: &'static [ErrorCode] = <Self as strum::VariantArray>::VARIANTS;

    /// The wire name (`error` in the envelope).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownResourceType => "unknown_resource_type",
            ErrorCode::UnknownTier => "unknown_tier",
            ErrorCode::TeamNotFound => "team_not_found",
            ErrorCode::ResourceNotFound => "resource_not_found",
            ErrorCode::ProvisionFailed => "provision_failed",
            ErrorCode::ProvisionIncomplete => "provision_incomplete",
            ErrorCode::ResourceProtected => "resource_protected",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::RouteNotFound => "route_not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::TooManyProvisions => "too_many_provisions",
            ErrorCode::ProvisionPending => "provision_pending",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::IdempotencyKeyInUse => "idempotency_key_in_use",
            ErrorCode::ResourceNotActive => "resource_not_active",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::DbError => "db_error",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::UnknownResourceType | ErrorCode::UnknownTier => {
                400
            }
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::QuotaExceeded => 403,
            ErrorCode::IdempotencyKeyInUse | ErrorCode::ResourceNotActive => 409,
            ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::ResourceNotFound | ErrorCode::RouteNotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::ResourceProtected => 409,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            // The request is well formed but names a team that does not exist.
            ErrorCode::TeamNotFound => 422,
            ErrorCode::ProvisionFailed
            | ErrorCode::ProvisionIncomplete
            | ErrorCode::BackendUnavailable
            | ErrorCode::TooManyProvisions
            | ErrorCode::ProvisionPending => 503,
            ErrorCode::DbError | ErrorCode::Internal => 500,
        }
    }

    /// A short title (RFC 9457 `title`).
    pub const fn title(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "Invalid request",
            ErrorCode::UnknownResourceType => "Unknown resource type",
            ErrorCode::UnknownTier => "Unknown tier",
            ErrorCode::TeamNotFound => "Team not found",
            ErrorCode::ResourceNotFound => "Resource not found",
            ErrorCode::ProvisionFailed => "Provisioning failed",
            ErrorCode::ProvisionIncomplete => "Provisioning failed; cleanup pending",
            ErrorCode::ResourceProtected => "Resource protected",
            ErrorCode::PreconditionFailed => "Precondition failed",
            ErrorCode::RouteNotFound => "Not found",
            ErrorCode::MethodNotAllowed => "Method not allowed",
            ErrorCode::PayloadTooLarge => "Payload too large",
            ErrorCode::UnsupportedMediaType => "Unsupported media type",
            ErrorCode::BackendUnavailable => "Backend unavailable",
            ErrorCode::TooManyProvisions => "Too many provisionings in flight",
            ErrorCode::ProvisionPending => "Provisioning still in progress",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::RateLimited => "Rate limited",
            ErrorCode::QuotaExceeded => "Quota exceeded",
            ErrorCode::IdempotencyKeyInUse => "Idempotency key in use",
            ErrorCode::ResourceNotActive => "Resource not active",
            ErrorCode::IdempotencyKeyReused => "Idempotency key reused",
            ErrorCode::DbError => "Database error",
            ErrorCode::Internal => "Internal error",
        }
    }

    /// Seconds a caller should wait before retrying, when retrying is the advice (503s).
    pub const fn retry_after_seconds(self) -> Option<u32> {
        match self {
            ErrorCode::ProvisionFailed
            | ErrorCode::TooManyProvisions
            | ErrorCode::ProvisionPending => Some(5),
            ErrorCode::IdempotencyKeyInUse => Some(1),
            // The actual wait is the key's own, set on the envelope.
            ErrorCode::RateLimited => Some(1),
            ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::QuotaExceeded
            | ErrorCode::ResourceNotActive
            | ErrorCode::IdempotencyKeyReused => None,
            ErrorCode::ProvisionIncomplete | ErrorCode::BackendUnavailable => Some(30),
            ErrorCode::ResourceProtected
            | ErrorCode::PreconditionFailed
            | ErrorCode::RouteNotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::PayloadTooLarge
            | ErrorCode::UnsupportedMediaType
            | ErrorCode::InvalidRequest
            | ErrorCode::UnknownResourceType
            | ErrorCode::UnknownTier
            | ErrorCode::TeamNotFound
            | ErrorCode::ResourceNotFound
            | ErrorCode::DbError
            | ErrorCode::Internal => None,
        }
    }

    /// The registered action template (`{url}` is the code's docs page), or `None` for the
    /// codes in [`UNREGISTERED`]. Exhaustive: a new code must be registered or listed there.
    const fn registered(self) -> Option<&'static str> {
        match self {
            ErrorCode::InvalidRequest => Some(
                "Tell the user the request was malformed (the message names the field, id or \
                 parameter); correct that value and send the request again. See {url}",
            ),
            ErrorCode::UnknownResourceType => Some(
                "Tell the user that resource type is not offered here; pick one of the types the \
                 message lists and send the request again. See {url}",
            ),
            ErrorCode::UnknownTier => Some(
                "Tell the user that tier does not exist; pick one of the tiers the message lists \
                 and send the request again. See {url}",
            ),
            ErrorCode::TeamNotFound => Some(
                "Tell the user the team was not found; check the team id with the user before \
                 sending the request again. See {url}",
            ),
            ErrorCode::ResourceNotFound => Some(
                "Tell the user the resource was not found or was deleted; check the id returned \
                 when it was created, and do not retry with the same id. See {url}",
            ),
            ErrorCode::ProvisionFailed => Some(
                "Tell the user the resource could not be created and nothing was left behind or \
                 billed; retry with exponential backoff, starting at 5 seconds, with the same \
                 Idempotency-Key. See {url}",
            ),
            ErrorCode::ProvisionIncomplete => Some(
                "Tell the user the attempt failed and is being settled; retry from 30 seconds \
                 with backoff and the same Idempotency-Key, which answers the resource if it was \
                 created after all. See {url}",
            ),
            ErrorCode::ResourceProtected => Some(
                "Tell the user the resource is protected against deletion; ask them to remove \
                 the protection first, and do not retry until they have. See {url}",
            ),
            ErrorCode::PreconditionFailed => Some(
                "Tell the user the resource changed since it was last read; GET it again, check \
                 it is still the one meant, and send the request with its new ETag in If-Match. \
                 See {url}",
            ),
            ErrorCode::RouteNotFound => Some(
                "Tell the user the path does not exist; use GET or POST /v1/resources, GET or \
                 DELETE /v1/resources/{id}, or POST /v1/resources/{id}/rotate-credentials. \
                 See {url}",
            ),
            ErrorCode::MethodNotAllowed => Some(
                "Tell the user the method is not allowed on this path; use GET or POST on \
                 /v1/resources, GET or DELETE on /v1/resources/{id}, POST on its \
                 rotate-credentials. See {url}",
            ),
            ErrorCode::PayloadTooLarge => Some(
                "Tell the user the request body is too large; send only the documented fields, \
                 which fit in a few hundred bytes. See {url}",
            ),
            ErrorCode::UnsupportedMediaType => Some(
                "Tell the user the body must be JSON; send it with Content-Type: \
                 application/json. See {url}",
            ),
            ErrorCode::BackendUnavailable => Some(
                "Tell the user the platform's backend is briefly unavailable; wait for the \
                 Retry-After delay, then retry with exponential backoff. See {url}",
            ),
            ErrorCode::TooManyProvisions => Some(
                "Tell the user the platform is busy creating other resources and nothing was \
                 reserved; wait for the Retry-After delay, then retry with exponential backoff. \
                 See {url}",
            ),
            ErrorCode::ProvisionPending => Some(
                "Tell the user the resource is still being created; do not POST again: GET \
                 /v1/resources/{id} with the resource_id given, every Retry-After seconds, until \
                 its status is active or failed. See {url}",
            ),
            ErrorCode::Unauthorized => Some(
                "Tell the user the API key is missing, malformed or revoked; send a valid key as \
                 Authorization: Bearer <key>, and ask an operator for a new key if it was \
                 revoked. See {url}",
            ),
            ErrorCode::Forbidden => Some(
                "Tell the user this key's scope does not allow the request; only an operator key \
                 may do it, so do not retry with the same key. See {url}",
            ),
            ErrorCode::RateLimited => Some(
                "Tell the user the key sent too many requests and nothing was done; wait for the \
                 Retry-After delay, then send the request again. See {url}",
            ),
            ErrorCode::QuotaExceeded => Some(
                "Tell the user the team holds as many resources as its quota allows and nothing \
                 was reserved; DELETE one it no longer needs, or ask for a larger quota. \
                 See {url}",
            ),
            ErrorCode::IdempotencyKeyInUse => Some(
                "Tell the user the same request is still being processed; wait for the \
                 Retry-After delay, then send it again with the same Idempotency-Key. See {url}",
            ),
            ErrorCode::ResourceNotActive => Some(
                "Tell the user the resource is not active (the message gives its status); GET it \
                 until it is active, or create a new one if it failed or was deleted. See {url}",
            ),
            ErrorCode::IdempotencyKeyReused => Some(
                "Tell the user this Idempotency-Key was already used for a different request; \
                 send a new request with a fresh key, never reuse one for other values. \
                 See {url}",
            ),
            ErrorCode::DbError | ErrorCode::Internal => None,
        }
    }

    /// The action an agent should take for this code, with its docs link.
    pub fn agent_action(self, docs: &DocsBase) -> String {
        let template = self.registered().unwrap_or(
            "Tell the user the platform hit an internal error it could not recover from; \
             contact support with the request id and do not retry in a loop. See {url}",
        );
        template.replace("{url}", &docs.page(self))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON error body: Keel's fields plus the RFC 9457 problem-details members.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorEnvelope {
    /// Always `false`.
    pub ok: bool,
    /// The error code's wire name.
    pub error: &'static str,
    /// What went wrong, for humans.
    pub message: String,
    /// What the caller should do next.
    pub agent_action: String,
    /// Seconds to wait before retrying, on 503s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
    /// The request id, for support.
    pub request_id: String,
    /// RFC 9457 `type`: the code's docs page.
    #[serde(rename = "type")]
    pub type_url: String,
    /// RFC 9457 `title`.
    pub title: &'static str,
    /// RFC 9457 `status`.
    pub status: u16,
    /// RFC 9457 `detail` (the message).
    pub detail: String,
    /// RFC 9457 `instance`: this occurrence, `urn:keel:request:<request id>`.
    pub instance: String,
    /// The resource the error concerns, when one was reserved (a failed provisioning's row can
    /// be read with `GET /v1/resources/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
}

/// The media type of every error body (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

impl ErrorEnvelope {
    /// The envelope for `code`.
    pub fn new(
        code: ErrorCode,
        message: impl Into<String>,
        request_id: impl Into<String>,
        docs: &DocsBase,
    ) -> Self {
        let message = message.into();
        let request_id = request_id.into();
        Self {
            instance: format!("urn:keel:request:{request_id}"),
            resource_id: None,
            ok: false,
            error: code.as_str(),
            agent_action: code.agent_action(docs),
            retry_after_seconds: code.retry_after_seconds(),
            request_id,
            type_url: docs.page(code),
            title: code.title(),
            status: code.status(),
            detail: message.clone(),
            message,
        }
    }

    /// The same envelope naming the resource it concerns.
    pub fn with_resource(mut self, id: impl std::fmt::Display) -> Self {
        self.resource_id = Some(id.to_string());
        self
    }

    /// The `Retry-After` header value: on 503s, and whenever the envelope names a wait (429, 409).
    pub fn retry_after_header(&self) -> Option<String> {
        if self.status == 503 {
            return Some(self.retry_after_seconds.unwrap_or(5).to_string());
        }
        self.retry_after_seconds.map(|seconds| seconds.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> DocsBase {
        // As long as a base may be, so the length check is the worst case.
        DocsBase::parse(&format!("https://{}", "d".repeat(52))).unwrap()
    }

    #[test]
    fn every_agent_action_obeys_the_contract() {
        let docs = docs();
        for &code in ErrorCode::ALL {
            let action = code.agent_action(&docs);
            assert!(action.starts_with("Tell the user"), "{code}: {action}");
            assert!(
                action.chars().count() < MAX_AGENT_ACTION_CHARS,
                "{code}: {} chars",
                action.chars().count()
            );
            let url = docs.page(code);
            assert!(
                action.contains(&url) && url.starts_with("https://"),
                "{code}: no full URL"
            );
            // Names the reason and the action: a clause after "Tell the user", then what to do.
            let (reason, todo) = action
                .split_once(';')
                .unwrap_or_else(|| panic!("{code}: no reason;action: {action}"));
            assert!(
                reason.len() > "Tell the user ".len() + 10,
                "{code}: no reason"
            );
            assert!(todo.trim().len() > 10, "{code}: no action");
        }
    }

    #[test]
    fn provision_failed_says_retry_with_backoff_not_contact_support() {
        let action = ErrorCode::ProvisionFailed.agent_action(&docs());
        assert!(
            action.contains("retry") && action.contains("exponential backoff"),
            "{action}"
        );
        assert!(!action.to_lowercase().contains("support"), "{action}");
    }

    #[test]
    fn only_the_listed_plumbing_codes_are_unregistered_and_they_fall_back_to_support() {
        for &code in ErrorCode::ALL {
            let unregistered = code.registered().is_none();
            assert_eq!(unregistered, UNREGISTERED.contains(&code), "{code}");
            if unregistered {
                assert!(code.status() >= 500, "{code}: only 5xx may fall back");
                assert!(code.agent_action(&docs()).contains("contact support"));
            }
        }
    }

    #[test]
    fn the_envelope_carries_keel_and_rfc9457_members_and_retry_after_on_503() {
        let envelope = ErrorEnvelope::new(
            ErrorCode::ProvisionFailed,
            "could not finalize",
            "req-1",
            &docs(),
        );
        let json = serde_json::to_value(&envelope).unwrap();
        for key in [
            "ok",
            "error",
            "message",
            "agent_action",
            "retry_after_seconds",
            "request_id",
            "type",
            "title",
            "status",
            "detail",
            "instance",
        ] {
            assert!(json.get(key).is_some(), "missing {key}: {json}");
        }
        assert_eq!(json["ok"], false);
        assert_eq!(json["status"], 503);
        assert_eq!(envelope.retry_after_header().as_deref(), Some("5"));
        let not_found = ErrorEnvelope::new(ErrorCode::ResourceNotFound, "gone", "req-2", &docs());
        assert_eq!(not_found.retry_after_header(), None);
        assert!(
            serde_json::to_value(&not_found)
                .unwrap()
                .get("retry_after_seconds")
                .is_none()
        );
    }

    #[test]
    fn docs_bases_must_be_short_https_urls() {
        for bad in [
            "http://x.test/errors",
            "https://",
            "https://x.test/errors/",
            &format!("https://{}", "d".repeat(60)),
        ] {
            assert_eq!(DocsBase::parse(bad), Err(InvalidDocsBase), "{bad}");
        }
    }
}
