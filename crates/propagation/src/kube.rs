//! The Kubernetes adapter: carries a tier to a customer namespace as a `ResourceQuota`.
//!
//! [`KubeQuotaApplier`] serves the resource types keel-provision backs with a namespace
//! (`namespace` and `redis`) and checks exactly what provisioning creates: the resource's
//! `provider_resource_id` is parsed with the newtype that named it
//! ([`keel_provision::BackendName`], `instant-customer-<token>`) and must carry the resource's
//! own token; the namespace must exist and carry the platform's ownership label
//! (`app.kubernetes.io/managed-by=keel`) and, when present, the matching
//! `keel.dev/resource-type` label. Only then does it server-side apply a `ResourceQuota` named
//! [`QUOTA_NAME`] whose `spec.hard` comes from the target tier's [`QuotaLimits`]. Anything else
//! — a missing namespace, one being deleted, one the platform did not label, a provider id
//! outside the prefix, a `postgres` resource (it has no namespace) — is an *unexpected* skip (it
//! retries, then dead-letters), never success, and no object is changed. The apply's answer is
//! the object as stored: unless its `spec.hard` holds the tier's amounts (compared as
//! quantities, so the server's canonical forms such as `8192Mi` for `8Gi` match), something on
//! the server's write path changed it, and the attempt is an unexpected skip too.
//!
//! The existence check is a metadata-only read (`PartialObjectMetadata`), so the applier never
//! downloads a namespace's spec.
//!
//! The customer token is secret: it is exposed only to build the namespace name for the API
//! call. Logs, skip details and error messages name the namespace with the token masked, and
//! text that comes back from the API server is redacted before it is kept.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, ResourceQuotaSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keel_audit::{ResourceType, Tier, Token};
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::applier::Applier;
use crate::model::Propagation;
use crate::outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};

/// Customer namespaces are named this prefix followed by the customer token.
pub const NAMESPACE_PREFIX: &str = "instant-customer-";

/// The name of the `ResourceQuota` Keel owns in each customer namespace.
pub const QUOTA_NAME: &str = "keel-tier";

/// The server-side apply field manager [`KubeQuotaApplier::new`] uses.
pub const DEFAULT_FIELD_MANAGER: &str = "keel";

/// The resource status that means the resource was deprovisioned on purpose.
const DELETED_STATUS: &str = "deleted";

/// Longest accepted quantity string.
const QUANTITY_MAX_LEN: usize = 32;

/// Suffixes a Kubernetes quantity may end with (binary SI, decimal SI, none). Exponent forms
/// such as `1e3` are deliberately not accepted.
const QUANTITY_SUFFIXES: &[&str] = &[
    "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
];

/// A quota limit that is not a plain Kubernetes quantity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {field} quantity {value:?}: use a non-negative number with an optional suffix \
     (m, k, M, G, Ki, Mi, Gi, …), e.g. \"500m\" or \"8Gi\""
)]
pub struct InvalidQuantity {
    /// Which limit (`cpu` or `memory`).
    pub field: &'static str,
    /// The rejected value (at most 32 characters of it).
    pub value: String,
}

/// Checks that `value` looks like a Kubernetes quantity: digits with at most one decimal
/// point, then one of [`QUANTITY_SUFFIXES`]. Minimal on purpose; the API server has the
/// final word.
fn validate_quantity(field: &'static str, value: &str) -> Result<String, InvalidQuantity> {
    let invalid = || InvalidQuantity {
        field,
        value: value.chars().take(QUANTITY_MAX_LEN).collect(),
    };
    if value.len() > QUANTITY_MAX_LEN {
        return Err(invalid());
    }
    let number_len = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(number_len);
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    let points = number.len() - digits;
    if digits == 0 || points > 1 || !QUANTITY_SUFFIXES.contains(&suffix) {
        return Err(invalid());
    }
    Ok(value.to_owned())
}

/// A quantity as `mantissa · 2^binary · 10^decimal`: digits with at most one decimal point, then
/// one of [`QUANTITY_SUFFIXES`] (the forms [`validate_quantity`] admits, and the forms the API
/// server writes back for them). `None` for anything else.
fn quantity_parts(value: &str) -> Option<(u128, u32, i32)> {
    let number_len = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.len() + fraction.len() == 0 || fraction.contains('.') {
        return None;
    }
    let mut mantissa: u128 = 0;
    for b in whole.bytes().chain(fraction.bytes()) {
        mantissa = mantissa
            .checked_mul(10)?
            .checked_add(u128::from(b.checked_sub(b'0')?))?;
    }
    let (binary, decimal) = match suffix {
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "" => (0, 0),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        _ => return None,
    };
    let places = i32::try_from(fraction.len()).ok()?;
    Some((mantissa, binary, decimal - places))
}

/// Whether two quantities name the same amount (`"1Gi"` and `"1024Mi"`, `"0.5"` and `"500m"`).
/// A quantity that does not parse, or whose comparison overflows, equals nothing.
fn same_quantity(a: &str, b: &str) -> bool {
    fn scaled(m: u128, twos: u32, tens: u32) -> Option<u128> {
        m.checked_mul(2u128.checked_pow(twos)?)?
            .checked_mul(10u128.checked_pow(tens)?)
    }
    let (Some((ma, ba, da)), Some((mb, bb, db))) = (quantity_parts(a), quantity_parts(b)) else {
        return false;
    };
    // Bring both to the smaller exponents: multiply each side by what the other lacks.
    let left = scaled(
        ma,
        ba.saturating_sub(bb),
        da.saturating_sub(db).max(0).unsigned_abs(),
    );
    let right = scaled(
        mb,
        bb.saturating_sub(ba),
        db.saturating_sub(da).max(0).unsigned_abs(),
    );
    matches!((left, right), (Some(l), Some(r)) if l == r)
}

/// Each of the tier's limits the stored quota does not hold, as `key "stored" (asked "wanted")`
/// (`"nothing"` for a missing key; a stored value cut to [`QUANTITY_MAX_LEN`] characters).
fn stored_differences(limits: &QuotaLimits, stored: ResourceQuota) -> Vec<String> {
    let hard = stored.spec.and_then(|spec| spec.hard).unwrap_or_default();
    limits
        .hard()
        .into_iter()
        .filter_map(|(key, wanted)| {
            let got = hard.get(&key).map(|q| q.0.as_str());
            if got.is_some_and(|got| same_quantity(got, &wanted.0)) {
                return None;
            }
            let got: String = got
                .unwrap_or("nothing")
                .chars()
                .take(QUANTITY_MAX_LEN)
                .collect();
            Some(format!("{key} {got:?} (asked {:?})", wanted.0))
        })
        .collect()
}

/// What a tier allows inside a customer namespace: the `ResourceQuota`'s `spec.hard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaLimits {
    cpu: String,
    memory: String,
    pods: u32,
}

impl QuotaLimits {
    /// Limits from Kubernetes quantities: `cpu` such as `"500m"` or `"4"`, `memory` such as
    /// `"512Mi"` or `"8Gi"`, and a pod count.
    pub fn new(cpu: &str, memory: &str, pods: u32) -> Result<Self, InvalidQuantity> {
        Ok(Self {
            cpu: validate_quantity("cpu", cpu)?,
            memory: validate_quantity("memory", memory)?,
            pods,
        })
    }

    /// The CPU limit (`spec.hard.cpu`).
    pub fn cpu(&self) -> &str {
        &self.cpu
    }

    /// The memory limit (`spec.hard.memory`).
    pub fn memory(&self) -> &str {
        &self.memory
    }

    /// The pod count limit (`spec.hard.pods`).
    pub fn pods(&self) -> u32 {
        self.pods
    }

    /// The `spec.hard` map.
    fn hard(&self) -> BTreeMap<String, Quantity> {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(self.cpu.clone())),
            ("memory".to_owned(), Quantity(self.memory.clone())),
            ("pods".to_owned(), Quantity(self.pods.to_string())),
        ])
    }
}

/// Which [`QuotaLimits`] each tier gets. A tier with no entry cannot be applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierQuotas {
    by_tier: BTreeMap<Tier, QuotaLimits>,
}

impl TierQuotas {
    /// No tiers at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The standard tiers: `free` (500m CPU, 512Mi, 2 pods), `hobby` (1, 1Gi, 4), `pro`
    /// (4, 8Gi, 20) and `team` (16, 32Gi, 100).
    pub fn standard() -> Self {
        const STANDARD: &[(&str, &str, &str, u32)] = &[
            ("free", "500m", "512Mi", 2),
            ("hobby", "1", "1Gi", 4),
            ("pro", "4", "8Gi", 20),
            ("team", "16", "32Gi", 100),
        ];
        // Every entry is a valid constant (pinned by a test), so nothing is dropped here.
        let by_tier = STANDARD
            .iter()
            .filter_map(|&(tier, cpu, memory, pods)| {
                Some((
                    Tier::parse(tier).ok()?,
                    QuotaLimits::new(cpu, memory, pods).ok()?,
                ))
            })
            .collect();
        Self { by_tier }
    }

    /// Adds or replaces `tier`'s limits.
    #[must_use]
    pub fn with(mut self, tier: Tier, limits: QuotaLimits) -> Self {
        self.insert(tier, limits);
        self
    }

    /// Adds or replaces `tier`'s limits, returning the ones replaced.
    pub fn insert(&mut self, tier: Tier, limits: QuotaLimits) -> Option<QuotaLimits> {
        self.by_tier.insert(tier, limits)
    }

    /// `tier`'s limits, if configured.
    pub fn get(&self, tier: &Tier) -> Option<&QuotaLimits> {
        self.by_tier.get(tier)
    }

    /// The configured tiers, in order.
    pub fn tiers(&self) -> impl Iterator<Item = &Tier> {
        self.by_tier.keys()
    }
}

/// A customer namespace: the real name for API calls, and a masked one for everything else.
struct CustomerNamespace<'a> {
    token: &'a Token,
    name: String,
    masked: String,
}

impl<'a> CustomerNamespace<'a> {
    fn of(token: &'a Token, name: &keel_provision::NamespaceName) -> Self {
        Self {
            token,
            name: name.expose().to_owned(),
            masked: name.masked(),
        }
    }

    /// An error for a failed step, with the API's words redacted.
    fn error(&self, step: fmt::Arguments<'_>, err: &kube::Error) -> ApplyError {
        let detail = if let kube::Error::Api(status) = err {
            format!("{} {}: {}", status.code, status.reason, status.message)
        } else {
            err.to_string()
        };
        ApplyError::new(self.redact(&format!("{step}: {detail}")))
    }

    /// `text` with every occurrence of the token masked.
    fn redact(&self, text: &str) -> String {
        text.replace(self.token.expose(), &self.token.masked())
    }
}

fn unexpected(bucket: ReasonBucket, detail: String) -> ApplyOutcome {
    ApplyOutcome::Skipped(SkipReason::Unexpected { bucket, detail })
}

/// Applies a propagation's target tier to the customer namespace as a `ResourceQuota`, by
/// server-side apply (idempotent, so at-least-once delivery is harmless).
#[derive(Clone)]
pub struct KubeQuotaApplier {
    client: kube::Client,
    quotas: TierQuotas,
    field_manager: String,
}

impl fmt::Debug for KubeQuotaApplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeQuotaApplier")
            .field("quotas", &self.quotas)
            .field("field_manager", &self.field_manager)
            .finish_non_exhaustive()
    }
}

impl KubeQuotaApplier {
    /// An applier that talks to `client` and applies `quotas`, as field manager
    /// [`DEFAULT_FIELD_MANAGER`].
    pub fn new(client: kube::Client, quotas: TierQuotas) -> Self {
        Self {
            client,
            quotas,
            field_manager: DEFAULT_FIELD_MANAGER.to_owned(),
        }
    }

    /// Uses `field_manager` for server-side apply instead (at most 128 characters; the API
    /// call fails otherwise).
    #[must_use]
    pub fn with_field_manager(mut self, field_manager: impl Into<String>) -> Self {
        self.field_manager = field_manager.into();
        self
    }

    /// The quota the applier writes for `tier`.
    fn quota(tier: &Tier, limits: &QuotaLimits) -> ResourceQuota {
        ResourceQuota {
            metadata: ObjectMeta {
                name: Some(QUOTA_NAME.to_owned()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".to_owned(), "keel".to_owned()),
                    ("keel.dev/tier".to_owned(), tier.as_str().to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(ResourceQuotaSpec {
                hard: Some(limits.hard()),
                ..ResourceQuotaSpec::default()
            }),
            status: None,
        }
    }
}

impl Applier for KubeQuotaApplier {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        let backend = &propagation.backend;
        match backend.status.as_deref() {
            // Deprovisioned on purpose: nothing left to change.
            Some(DELETED_STATUS) => {
                return Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                    LegitimateSkip::ResourceDeprovisioned,
                )));
            }
            // No resources row at all: a wrong id or a hard delete, never success.
            None => {
                return Ok(unexpected(
                    ReasonBucket::Other,
                    "the resource has no resources row".to_owned(),
                ));
            }
            Some(_) => {}
        }
        match propagation.resource_type {
            ResourceType::Namespace | ResourceType::Redis => {}
            ResourceType::Postgres => {
                return Ok(unexpected(
                    ReasonBucket::Other,
                    "a postgres resource has no customer namespace; it is routed to the wrong \
                     applier"
                        .to_owned(),
                ));
            }
        }
        let Some(token) = backend.token.as_ref() else {
            return Ok(unexpected(
                ReasonBucket::LegacyResource,
                format!(
                    "resource {} has no customer token, so it has no namespace",
                    propagation.resource_id
                ),
            ));
        };
        let parsed = backend.provider_resource_id.as_deref().map(|id| {
            keel_provision::BackendName::parse_provider_id(propagation.resource_type, id)
        });
        let name = match parsed {
            Some(Ok(keel_provision::BackendName::Namespace { name, .. }))
                if name.token() == token =>
            {
                name
            }
            Some(Ok(_)) => {
                return Ok(unexpected(
                    ReasonBucket::Other,
                    "the resource's provider resource id names another customer's namespace"
                        .to_owned(),
                ));
            }
            Some(Err(_)) | None => {
                return Ok(unexpected(
                    ReasonBucket::LegacyResource,
                    "the resource's provider resource id is not a customer namespace \
                     (instant-customer-<token>); other namespaces are never changed"
                        .to_owned(),
                ));
            }
        };
        let tier = propagation.payload.target_tier();
        let Some(limits) = self.quotas.get(tier) else {
            let configured: Vec<&str> = self.quotas.tiers().map(Tier::as_str).collect();
            return Err(ApplyError::new(format!(
                "tier {tier} has no ResourceQuota limits configured (configured: {}); add it to \
                 the applier's TierQuotas",
                configured.join(", ")
            )));
        };
        let ns = CustomerNamespace::of(token, &name);

        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        // Metadata only: existence and ownership labels are all that matter here.
        let found = namespaces
            .get_metadata_opt(&ns.name)
            .await
            .map_err(|e| ns.error(format_args!("could not read namespace {}", ns.masked), &e))?;
        let Some(found) = found else {
            tracing::warn!(%token, namespace = %ns.masked, "customer namespace not found");
            return Ok(unexpected(
                ReasonBucket::NamespaceNotFound,
                format!("namespace {} not found", ns.masked),
            ));
        };
        let labels = found.metadata.labels.unwrap_or_default();
        if labels
            .get(keel_provision::kube::MANAGED_BY_LABEL)
            .map(String::as_str)
            != Some(keel_provision::kube::MANAGED_BY)
        {
            tracing::warn!(%token, namespace = %ns.masked, "namespace not managed by the platform; left alone");
            return Ok(unexpected(
                ReasonBucket::Other,
                format!(
                    "namespace {} is not labelled as the platform's own; it is never changed",
                    ns.masked
                ),
            ));
        }
        if let Some(labelled) = labels.get(keel_provision::kube::RESOURCE_TYPE_LABEL)
            && labelled != propagation.resource_type.as_str()
        {
            return Ok(unexpected(
                ReasonBucket::Other,
                format!(
                    "namespace {} backs another resource type than {}",
                    ns.masked, propagation.resource_type
                ),
            ));
        }

        if found.metadata.deletion_timestamp.is_some() {
            tracing::warn!(%token, namespace = %ns.masked, "customer namespace is being deleted");
            return Ok(unexpected(
                ReasonBucket::NamespaceNotFound,
                format!(
                    "namespace {} is being deleted while its resource is live",
                    ns.masked
                ),
            ));
        }

        let quotas: Api<ResourceQuota> = Api::namespaced(self.client.clone(), &ns.name);
        let params = PatchParams::apply(&self.field_manager).force();
        let stored = quotas
            .patch(QUOTA_NAME, &params, &Patch::Apply(Self::quota(tier, limits)))
            .await
            .map_err(|e| {
                ns.error(
                    format_args!(
                        "could not apply ResourceQuota {QUOTA_NAME} for tier {tier} in namespace {}",
                        ns.masked
                    ),
                    &e,
                )
            })?;
        // The apply's answer is what the server stored: an admission webhook (or anything else
        // on the server's write path) may have changed it, and then the tier has not landed.
        let differs = stored_differences(limits, stored);
        if !differs.is_empty() {
            tracing::warn!(%token, namespace = %ns.masked, %tier, "the stored ResourceQuota is not the tier's");
            return Ok(unexpected(
                ReasonBucket::Other,
                format!(
                    "the API server stored ResourceQuota {QUOTA_NAME} in namespace {} with {}: \
                     something on its write path (an admission webhook?) changes the tier's \
                     limits",
                    ns.masked,
                    differs.join(", ")
                ),
            ));
        }
        tracing::info!(%token, namespace = %ns.masked, %tier, "applied tier ResourceQuota");
        Ok(ApplyOutcome::Applied)
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use keel_audit::{ResourceId, TeamId};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;
    use crate::model::{Backend, Payload, PropagationId};

    const TOKEN: &str = "a1b2c3d4e5f6";
    const NS: &str = "instant-customer-a1b2c3d4e5f6";
    const SSA_URI: &str = "/api/v1/namespaces/instant-customer-a1b2c3d4e5f6/resourcequotas/keel-tier?&force=true&fieldManager=keel";
    const NAMESPACE_URI: &str = "/api/v1/namespaces/instant-customer-a1b2c3d4e5f6";
    /// The `Accept` header of a metadata-only request: the API server answers with a
    /// `PartialObjectMetadata` (no spec, no Secret data).
    const METADATA_ACCEPT: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
    /// The `Accept` header kube sends with a server-side apply.
    const JSON_ACCEPT: &str = "application/json";

    fn propagation(resource_type: ResourceType, tier: &str) -> Propagation {
        Propagation {
            id: PropagationId(1),
            team_id: TeamId::new_random(),
            resource_id: ResourceId::new_random(),
            resource_type,
            payload: Payload::TierElevation {
                target_tier: Tier::parse(tier).unwrap(),
            },
            attempt: 1,
            backend: Backend {
                token: Some(Token::parse(TOKEN).unwrap()),
                provider_resource_id: Some(NS.into()),
                status: Some("active".into()),
                team_id: None,
            },
            fence: crate::Fence {
                claim: crate::ClaimToken(1),
                target: crate::TargetVersion(1),
            },
        }
    }

    fn pro_namespace() -> Propagation {
        propagation(ResourceType::Namespace, "pro")
    }

    /// What the fake API server expects next, and how it answers.
    struct Step {
        method: Method,
        uri: &'static str,
        /// The exact `Accept` header expected; `None` leaves it to the test to check.
        accept: Option<&'static str>,
        reply: Reply,
    }

    /// A request the fake API server received.
    #[derive(Debug)]
    struct Seen {
        method: Method,
        uri: String,
        accept: Option<String>,
    }

    enum Reply {
        /// 200 with this object.
        Object(Value),
        /// An error `Status` with this code.
        Status(StatusCode, Value),
        /// Check the apply request's body equals this, then echo it back as the server would.
        Applied { expected_body: Value },
        /// As [`Reply::Applied`], but the server stores (and answers with) this `spec.hard`,
        /// as an admission webhook or the server's own canonical quantities would make it.
        AppliedAs {
            expected_body: Value,
            stored_hard: Value,
        },
    }

    /// A metadata-only GET (`Api::get_metadata_opt`).
    fn get_metadata(uri: &'static str, reply: Reply) -> Step {
        Step {
            method: Method::GET,
            uri,
            accept: Some(METADATA_ACCEPT),
            reply,
        }
    }

    fn ssa(reply: Reply) -> Step {
        Step {
            method: Method::PATCH,
            uri: SSA_URI,
            accept: Some(JSON_ACCEPT),
            reply,
        }
    }

    fn get_namespace() -> Step {
        get_metadata(
            NAMESPACE_URI,
            Reply::Object(namespace_metadata(Some("namespace"))),
        )
    }

    /// What the API server returns for a metadata-only GET of a customer namespace that
    /// keel-provision created: its three labels (`resource_type` `None` leaves that one out).
    fn namespace_metadata(resource_type: Option<&str>) -> Value {
        let mut labels = json!({
            "kubernetes.io/metadata.name": NS,
            "app.kubernetes.io/managed-by": "keel",
            "keel.dev/tier": "free"
        });
        if let Some(resource_type) = resource_type {
            labels["keel.dev/resource-type"] = json!(resource_type);
        }
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": NS,
                "uid": "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
                "resourceVersion": "4711",
                "creationTimestamp": "2026-01-12T09:30:00Z",
                "labels": labels
            }
        })
    }

    /// A namespace someone else created under the platform's name: no ownership label.
    fn foreign_namespace_metadata() -> Value {
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": NS,
                "uid": "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a12",
                "resourceVersion": "4711",
                "creationTimestamp": "2026-01-12T09:30:00Z",
                "labels": { "kubernetes.io/metadata.name": NS }
            }
        })
    }

    fn not_found(kind: &str, name: &str) -> Reply {
        Reply::Status(
            StatusCode::NOT_FOUND,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": format!("{kind} \"{name}\" not found"),
                "reason": "NotFound",
                "details": { "name": name, "kind": kind },
                "code": 404
            }),
        )
    }

    fn pro_quota_body() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {
                "name": "keel-tier",
                "labels": {
                    "app.kubernetes.io/managed-by": "keel",
                    "keel.dev/tier": "pro"
                }
            },
            "spec": { "hard": { "cpu": "4", "memory": "8Gi", "pods": "20" } }
        })
    }

    fn respond(status: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// Plays the API server for `steps` in order, asserting each request (method, URI and
    /// `Accept` header), then asserts no further request arrives before the client is
    /// dropped. Returns the requests received.
    async fn serve(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        steps: Vec<Step>,
    ) -> Vec<Seen> {
        let mut seen = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("step {i}: expected {} {}", step.method, step.uri));
            let accept = request
                .headers()
                .get(http::header::ACCEPT)
                .map(|v| v.to_str().unwrap().to_owned());
            seen.push(Seen {
                method: request.method().clone(),
                uri: request.uri().to_string(),
                accept: accept.clone(),
            });
            assert_eq!(request.method(), step.method, "step {i}");
            assert_eq!(request.uri().to_string(), step.uri, "step {i}");
            if let Some(expected) = step.accept {
                assert_eq!(accept.as_deref(), Some(expected), "step {i}: Accept header");
            }
            let response = match step.reply {
                Reply::Object(body) => respond(StatusCode::OK, &body),
                Reply::Status(status, body) => respond(status, &body),
                Reply::Applied { expected_body } => applied(i, request, expected_body, None).await,
                Reply::AppliedAs {
                    expected_body,
                    stored_hard,
                } => applied(i, request, expected_body, Some(stored_hard)).await,
            };
            send.send_response(response);
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
        seen
    }

    /// The API server's answer to a server-side apply whose body must equal `expected_body`:
    /// the object as stored, with `stored_hard` as its `spec.hard` when given.
    async fn applied(
        i: usize,
        request: Request<Body>,
        expected_body: Value,
        stored_hard: Option<Value>,
    ) -> Response<Body> {
        assert_eq!(
            request.headers().get(http::header::CONTENT_TYPE).unwrap(),
            "application/apply-patch+yaml",
            "step {i}"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let mut body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body, expected_body, "step {i}: apply body");
        let meta = &mut body["metadata"];
        meta["namespace"] = json!(NS);
        meta["uid"] = json!("9d8c7b6a-5f4e-4d3c-8b2a-1a0b9c8d7e6f");
        meta["resourceVersion"] = json!("4713");
        meta["creationTimestamp"] = json!("2026-01-12T09:31:00Z");
        meta["managedFields"] = json!([{
            "manager": "keel",
            "operation": "Apply",
            "apiVersion": "v1",
            "time": "2026-01-12T09:31:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": { "f:spec": { "f:hard": {} } }
        }]);
        if let Some(hard) = stored_hard {
            body["spec"]["hard"] = hard;
        }
        body["status"] = json!({ "hard": body["spec"]["hard"].clone(), "used": {} });
        respond(StatusCode::OK, &body)
    }

    /// Runs one attempt against a fake API server that expects exactly `steps`.
    async fn run(
        quotas: TierQuotas,
        propagation: &Propagation,
        steps: Vec<Step>,
    ) -> Result<ApplyOutcome, ApplyError> {
        run_recording(quotas, propagation, steps).await.0
    }

    /// [`run`], also returning the requests the fake API server received.
    async fn run_recording(
        quotas: TierQuotas,
        propagation: &Propagation,
        steps: Vec<Step>,
    ) -> (Result<ApplyOutcome, ApplyError>, Vec<Seen>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, steps));
        let applier = KubeQuotaApplier::new(kube::Client::new(service, "default"), quotas);
        let outcome = applier.apply(propagation).await;
        drop(applier);
        let seen = server.await.unwrap();
        assert_token_hidden(&outcome);
        (outcome, seen)
    }

    fn assert_token_hidden(outcome: &Result<ApplyOutcome, ApplyError>) {
        let text = match outcome {
            Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { detail, .. })) => detail.clone(),
            Ok(ApplyOutcome::Applied | ApplyOutcome::Skipped(SkipReason::Legitimate(_))) => {
                String::new()
            }
            Err(e) => format!("{e} {e:?}"),
        };
        assert!(!text.contains(TOKEN), "full token leaked: {text}");
    }

    fn skipped(bucket: ReasonBucket, detail: &str) -> Result<ApplyOutcome, ApplyError> {
        Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
            bucket,
            detail: detail.to_owned(),
        }))
    }

    #[tokio::test]
    async fn applies_the_tier_quota_by_server_side_apply() {
        let (outcome, seen) = run_recording(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![
                get_namespace(),
                ssa(Reply::Applied {
                    expected_body: pro_quota_body(),
                }),
            ],
        )
        .await;
        assert_eq!(outcome, Ok(ApplyOutcome::Applied));
        let requests: Vec<(Method, &str, Option<&str>)> = seen
            .iter()
            .map(|s| (s.method.clone(), s.uri.as_str(), s.accept.as_deref()))
            .collect();
        assert_eq!(
            requests,
            [
                (Method::GET, NAMESPACE_URI, Some(METADATA_ACCEPT)),
                (Method::PATCH, SSA_URI, Some(JSON_ACCEPT)),
            ],
            "only the namespace's metadata is read, and only the quota is written"
        );
    }

    /// The server writes quantities back in its canonical form (`8Gi` may come back as
    /// `8192Mi`, `4` as `4000m`): the same amounts are the tier landing.
    #[tokio::test]
    async fn a_quota_stored_in_the_servers_canonical_quantities_is_applied() {
        let outcome = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![
                get_namespace(),
                ssa(Reply::AppliedAs {
                    expected_body: pro_quota_body(),
                    stored_hard: json!({ "cpu": "4000m", "memory": "8192Mi", "pods": "20" }),
                }),
            ],
        )
        .await;
        assert_eq!(outcome, Ok(ApplyOutcome::Applied));
    }

    /// The apply's answer is what the server stored: when something on its write path (an
    /// admission webhook) stores other limits than the tier's, the tier has not landed, and
    /// the attempt is an unexpected skip naming the difference, never `Applied`.
    #[tokio::test]
    async fn a_quota_the_server_stored_differently_is_an_unexpected_skip_not_success() {
        let outcome = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![
                get_namespace(),
                ssa(Reply::AppliedAs {
                    expected_body: pro_quota_body(),
                    stored_hard: json!({ "cpu": "2", "memory": "8Gi" }),
                }),
            ],
        )
        .await;
        assert_eq!(
            outcome,
            skipped(
                ReasonBucket::Other,
                "the API server stored ResourceQuota keel-tier in namespace instant-customer-a1b2… \
                 with cpu \"2\" (asked \"4\"), pods \"nothing\" (asked \"20\"): something on \
                 its write path (an admission webhook?) changes the tier's limits"
            )
        );
    }

    /// A namespace being deleted (its `deletionTimestamp` set) while its resource is live is an
    /// unexpected skip, and nothing is applied into it.
    #[tokio::test]
    async fn a_namespace_being_deleted_is_an_unexpected_skip_without_an_apply() {
        let mut terminating = namespace_metadata(Some("namespace"));
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        let outcome = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![get_metadata(NAMESPACE_URI, Reply::Object(terminating))],
        )
        .await;
        assert_eq!(
            outcome,
            skipped(
                ReasonBucket::NamespaceNotFound,
                "namespace instant-customer-a1b2… is being deleted while its resource is live"
            )
        );
    }

    #[test]
    fn quantities_compare_by_amount() {
        for (a, b) in [
            ("4", "4000m"),
            ("8Gi", "8192Mi"),
            ("0.5", "500m"),
            ("1.5Gi", "1536Mi"),
            ("1k", "1000"),
            ("20", "20"),
            ("1Ei", "1024Pi"),
        ] {
            assert!(same_quantity(a, b), "{a} = {b}");
            assert!(same_quantity(b, a), "{b} = {a}");
        }
        for (a, b) in [
            ("4", "2"),
            ("8Gi", "8G"),
            ("1", "1m"),
            ("20", ""),
            ("20", "2e1"),
            ("1.2.3", "1.2.3"),
            ("x", "x"),
        ] {
            assert!(!same_quantity(a, b), "{a} != {b}");
        }
        // Too large to compare exactly: never equal, so never taken as landed.
        let huge = "9".repeat(32);
        assert!(!same_quantity(&format!("{huge}E"), &format!("{huge}Ei")));
    }

    /// PROP-2: a redis resource is shaped by keel-provision as a labelled namespace and no
    /// Secret; the applier lands it with exactly the namespace read and the quota apply.
    #[tokio::test]
    async fn redis_and_namespace_resources_land_with_only_what_provisioning_creates() {
        for (resource_type, label) in [
            (ResourceType::Redis, Some("redis")),
            (ResourceType::Namespace, Some("namespace")),
            (ResourceType::Redis, None),
        ] {
            let outcome = run(
                TierQuotas::standard(),
                &propagation(resource_type, "pro"),
                vec![
                    get_metadata(NAMESPACE_URI, Reply::Object(namespace_metadata(label))),
                    ssa(Reply::Applied {
                        expected_body: pro_quota_body(),
                    }),
                ],
            )
            .await;
            assert_eq!(
                outcome,
                Ok(ApplyOutcome::Applied),
                "{resource_type} {label:?}"
            );
        }
    }

    /// PROP-7's class in the Kubernetes applier: only the platform's own namespaces change.
    #[tokio::test]
    async fn the_quota_applier_changes_only_namespaces_the_platform_labelled() {
        let foreign = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![get_metadata(
                NAMESPACE_URI,
                Reply::Object(foreign_namespace_metadata()),
            )],
        )
        .await;
        let Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { detail, .. })) = &foreign else {
            panic!("a foreign namespace was changed: {foreign:?}");
        };
        assert!(
            detail.contains("not labelled as the platform's own"),
            "{detail}"
        );

        let wrong_type = run(
            TierQuotas::standard(),
            &propagation(ResourceType::Redis, "pro"),
            vec![get_metadata(
                NAMESPACE_URI,
                Reply::Object(namespace_metadata(Some("namespace"))),
            )],
        )
        .await;
        assert!(
            matches!(
                wrong_type,
                Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { .. }))
            ),
            "{wrong_type:?}"
        );

        for provider_id in [
            "kube-system",
            "instant-customer-ffff0000",
            "cust_a1b2c3d4e5f6",
        ] {
            let mut named = pro_namespace();
            named.backend.provider_resource_id = Some(provider_id.into());
            let outcome = run(TierQuotas::standard(), &named, vec![]).await;
            assert!(
                matches!(
                    outcome,
                    Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { .. }))
                ),
                "{provider_id}: {outcome:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_postgres_resource_is_never_applied_as_a_namespace() {
        let outcome = run(
            TierQuotas::standard(),
            &propagation(ResourceType::Postgres, "pro"),
            vec![],
        )
        .await;
        assert!(
            matches!(
                outcome,
                Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { .. }))
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn missing_namespace_is_an_unexpected_skip_not_success() {
        let outcome = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![get_metadata(NAMESPACE_URI, not_found("namespaces", NS))],
        )
        .await;
        assert_eq!(
            outcome,
            skipped(
                ReasonBucket::NamespaceNotFound,
                "namespace instant-customer-a1b2… not found"
            )
        );
    }

    #[tokio::test]
    async fn deleted_resource_is_a_legitimate_skip_without_api_calls() {
        let mut deleted = pro_namespace();
        deleted.backend.status = Some("deleted".into());
        let outcome = run(TierQuotas::standard(), &deleted, vec![]).await;
        assert_eq!(
            outcome,
            Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::ResourceDeprovisioned
            )))
        );
    }

    #[tokio::test]
    async fn resource_without_a_token_is_an_unexpected_skip_without_api_calls() {
        let mut legacy = pro_namespace();
        legacy.backend.token = None;
        let outcome = run(TierQuotas::standard(), &legacy, vec![]).await;
        let Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { bucket, detail })) = outcome else {
            panic!("expected an unexpected skip, got {outcome:?}");
        };
        assert_eq!(bucket, ReasonBucket::LegacyResource);
        assert!(detail.contains("has no customer token"), "{detail}");
    }

    #[tokio::test]
    async fn unknown_tier_is_an_error_that_retries() {
        let enterprise = propagation(ResourceType::Namespace, "enterprise");
        let outcome = run(TierQuotas::standard(), &enterprise, vec![]).await;
        let Err(error) = &outcome else {
            panic!("expected an error, got {outcome:?}");
        };
        assert!(error.message.contains("tier enterprise"), "{error}");
        assert!(error.message.contains("free, hobby, pro, team"), "{error}");
        let transition = crate::decide(
            1,
            &outcome,
            &crate::RetryPolicy::standard(),
            time::OffsetDateTime::UNIX_EPOCH,
        );
        assert!(
            matches!(transition, crate::Transition::Retry { .. }),
            "{transition:?}"
        );
    }

    #[tokio::test]
    async fn api_error_on_apply_is_an_error_with_the_step_and_the_api_words() {
        let outcome = run(
            TierQuotas::standard(),
            &pro_namespace(),
            vec![
                get_namespace(),
                ssa(Reply::Status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": format!(
                            "Internal error occurred: resourcequotas \"keel-tier\" in namespace \
                             {NS}: etcdserver: request timed out"
                        ),
                        "reason": "InternalError",
                        "details": { "name": "keel-tier", "kind": "resourcequotas" },
                        "code": 500
                    }),
                )),
            ],
        )
        .await;
        assert_eq!(
            outcome,
            Err(ApplyError {
                bucket: ReasonBucket::ResourceNotReachable,
                message: "could not apply ResourceQuota keel-tier for tier pro in namespace \
                          instant-customer-a1b2…: 500 InternalError: Internal error occurred: \
                          resourcequotas \"keel-tier\" in namespace instant-customer-a1b2…: \
                          etcdserver: request timed out"
                    .to_owned(),
                reached_backend: true,
            })
        );
    }

    #[tokio::test]
    async fn no_outcome_text_contains_the_full_token() {
        let leaky_status = |code: StatusCode| {
            Reply::Status(
                code,
                json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": format!("namespaces \"{NS}\" is unavailable ({TOKEN})"),
                    "reason": "ServiceUnavailable",
                    "details": { "name": NS, "kind": "namespaces" },
                    "code": code.as_u16()
                }),
            )
        };
        let cases: Vec<(Propagation, Vec<Step>)> = vec![
            (
                pro_namespace(),
                vec![get_metadata(NAMESPACE_URI, not_found("namespaces", NS))],
            ),
            (
                pro_namespace(),
                vec![get_metadata(
                    NAMESPACE_URI,
                    leaky_status(StatusCode::SERVICE_UNAVAILABLE),
                )],
            ),
            (
                pro_namespace(),
                vec![
                    get_namespace(),
                    ssa(leaky_status(StatusCode::INTERNAL_SERVER_ERROR)),
                ],
            ),
            (propagation(ResourceType::Namespace, "enterprise"), vec![]),
        ];
        for (propagation, steps) in cases {
            let outcome = run(TierQuotas::standard(), &propagation, steps).await;
            assert!(!matches!(outcome, Ok(ApplyOutcome::Applied)), "{outcome:?}");
            // `run` asserts the token is hidden; check the masked form is what is shown.
            let text = match &outcome {
                Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { detail, .. })) => detail.clone(),
                Ok(other) => panic!("expected a failure, got {other:?}"),
                Err(e) => e.message.clone(),
            };
            assert!(!text.contains(TOKEN), "{text}");
            if !text.contains("tier enterprise") {
                assert!(text.contains("instant-customer-a1b2…"), "{text}");
            }
        }
    }

    #[test]
    fn standard_quotas_cover_the_four_tiers() {
        let quotas = TierQuotas::standard();
        let got: Vec<(&str, &str, &str, u32)> = quotas
            .tiers()
            .map(|tier| {
                let l = quotas.get(tier).unwrap();
                (tier.as_str(), l.cpu(), l.memory(), l.pods())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("free", "500m", "512Mi", 2),
                ("hobby", "1", "1Gi", 4),
                ("pro", "4", "8Gi", 20),
                ("team", "16", "32Gi", 100),
            ]
        );
    }

    #[test]
    fn tier_quotas_can_be_added_and_overridden() {
        let pro = Tier::parse("pro").unwrap();
        let enterprise = Tier::parse("enterprise").unwrap();
        let bigger = QuotaLimits::new("8", "16Gi", 40).unwrap();
        let quotas = TierQuotas::standard()
            .with(pro.clone(), bigger.clone())
            .with(
                enterprise.clone(),
                QuotaLimits::new("64", "128Gi", 500).unwrap(),
            );
        assert_eq!(quotas.get(&pro), Some(&bigger));
        assert_eq!(quotas.get(&enterprise).map(QuotaLimits::cpu), Some("64"));
        assert_eq!(quotas.tiers().count(), 5);
        assert_eq!(TierQuotas::empty().get(&pro), None);
    }

    #[test]
    fn quota_quantities_are_validated_minimally() {
        for ok in ["500m", "1", "0", "1.5", "512Mi", "8Gi", "1k", "2G", "0.25"] {
            assert!(QuotaLimits::new(ok, ok, 1).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "m",
            "-1",
            "1.2.3",
            "8 Gi",
            "8gi",
            "1e3",
            "lots",
            ".",
            &"9".repeat(33),
        ] {
            let err = QuotaLimits::new(bad, "1Gi", 1).unwrap_err();
            assert_eq!(err.field, "cpu", "{bad:?}");
            let err = QuotaLimits::new("1", bad, 1).unwrap_err();
            assert_eq!(err.field, "memory", "{bad:?}");
        }
    }
}
