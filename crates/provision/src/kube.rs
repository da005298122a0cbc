//! The Kubernetes adapter: a customer namespace per `namespace` or `redis` resource.
//!
//! [`KubeNamespaceBackend`] creates the namespace `instant-customer-<token>` with three labels:
//!
//! - [`MANAGED_BY_LABEL`] (`app.kubernetes.io/managed-by`) = [`MANAGED_BY`] (`keel`): the
//!   platform made it. This label is the ownership mark every other step checks.
//! - [`RESOURCE_TYPE_LABEL`] (`keel.dev/resource-type`) = the resource type (`namespace` or
//!   `redis`).
//! - [`TIER_LABEL`] (`keel.dev/tier`) = the tier it was provisioned at.
//!
//! **Create-if-absent.** When the namespace already exists (409 `AlreadyExists`), its metadata
//! is read: a namespace labelled managed-by `keel` is the platform's own (an earlier attempt
//! made it), so the retry succeeds with the same address; anything else is
//! [`BackendError::Foreign`] and is left alone. A keel namespace that is still being deleted is
//! not handed out (the create fails and is retried once it is gone).
//!
//! **Safety rule: it never deletes a namespace it did not label.** Teardown first reads the
//! namespace's metadata: an absent namespace is success (idempotent, no DELETE), one without
//! the managed-by `keel` label is [`BackendError::Foreign`] (no DELETE), a keel namespace
//! already being deleted is success (no second DELETE), and only then is a keel namespace
//! deleted (background propagation), with the UID just read as a precondition, so an object
//! re-created under the same name in between is not the one deleted.
//!
//! Reads are metadata-only (`PartialObjectMetadata`). The customer token is secret: it is
//! exposed only to name the namespace in the API call and in the one connection URL returned.
//! Logs name the namespace masked, and the API server's error text (which echoes the
//! namespace name) is kept only with the token masked.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keel_audit::{ResourceType, Tier};
use kube::Api;
use kube::api::{DeleteParams, PostParams, Preconditions};

use crate::model::{BackendName, BackendObject};
use crate::names::NamespaceName;
use crate::ports::{Backend, BackendError, RedactedError};
use crate::reclaim::{
    INSTALLATION_LABEL, InstallationId, ObjectFacts, Preflight, protect_value_protects,
};
use crate::secret::ConnectionUrl;

/// The label that marks a namespace as the platform's own.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on every namespace the platform creates.
pub const MANAGED_BY: &str = "keel";
/// The label recording the resource type a namespace backs (`namespace` or `redis`).
pub const RESOURCE_TYPE_LABEL: &str = "keel.dev/resource-type";
/// The label recording the tier a namespace was provisioned at.
pub const TIER_LABEL: &str = "keel.dev/tier";
/// The annotation that protects a namespace from every teardown when it is `true`.
pub const PROTECT_ANNOTATION: &str = "keel.dev/protect";
/// The field manager [`KubeNamespaceBackend::new`] creates namespaces as.
pub const DEFAULT_FIELD_MANAGER: &str = "keel";

/// The text of a Kubernetes error (and its causes) with every occurrence of `token` masked. The
/// original error, whose text names the namespace in full, is dropped.
fn redacted(err: &kube::Error, name: &BackendName) -> RedactedError {
    let text = if let kube::Error::Api(status) = err {
        format!("{} {}: {}", status.code, status.reason, status.message)
    } else {
        let mut text = err.to_string();
        let mut cause = err.source();
        while let Some(inner) = cause {
            let inner_text = inner.to_string();
            if !text.contains(&inner_text) {
                text.push_str(": ");
                text.push_str(&inner_text);
            }
            cause = inner.source();
        }
        text
    };
    RedactedError::new(name.mask_in(&text))
}

/// A backend failure on `name` caused by `err`, with the token masked.
fn unavailable(operation: &'static str, name: &BackendName, err: &kube::Error) -> BackendError {
    BackendError::unavailable(operation, name, redacted(err, name))
}

/// Whether `err` is the API server's 409 `AlreadyExists`.
fn is_already_exists(err: &kube::Error) -> bool {
    if let kube::Error::Api(status) = err {
        status.is_already_exists()
    } else {
        false
    }
}

/// Whether `err` is the API server's 404 `NotFound`.
fn is_not_found(err: &kube::Error) -> bool {
    if let kube::Error::Api(status) = err {
        status.is_not_found()
    } else {
        false
    }
}

/// Whether the object's labels say the platform made it.
fn is_managed(metadata: &ObjectMeta) -> bool {
    metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_BY_LABEL))
        .is_some_and(|value| value == MANAGED_BY)
}

/// Whether the object carries a `keel.dev/protect` mark that protects (any value but `false`),
/// among its annotations or its labels, as a database's comment is read.
fn is_protected(metadata: &ObjectMeta) -> bool {
    [&metadata.annotations, &metadata.labels]
        .into_iter()
        .any(|marks| {
            marks
                .as_ref()
                .and_then(|marks| marks.get(PROTECT_ANNOTATION))
                .is_some_and(|value| protect_value_protects(value))
        })
}

/// The namespace `name` names, or [`BackendError::Unsupported`] for a name this backend does
/// not serve (a database, or a namespace name claiming to back a Postgres resource).
fn namespace_of(name: &BackendName) -> Result<(&NamespaceName, ResourceType), BackendError> {
    match name {
        BackendName::Database(_) => Err(BackendError::Unsupported(ResourceType::Postgres)),
        BackendName::Namespace {
            name,
            resource_type,
        } => match resource_type {
            ResourceType::Namespace | ResourceType::Redis => Ok((name, *resource_type)),
            ResourceType::Postgres => Err(BackendError::Unsupported(ResourceType::Postgres)),
        },
    }
}

/// Creates, finds and tears down customer namespaces (for `namespace` and `redis` resources).
///
/// See the [module documentation](self) for the labels it sets and the rule that it never
/// deletes a namespace it did not label.
#[derive(Clone)]
pub struct KubeNamespaceBackend {
    client: kube::Client,
    connection_base: String,
    field_manager: String,
    installation: Option<InstallationId>,
}

impl fmt::Debug for KubeNamespaceBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeNamespaceBackend")
            .field("connection_base", &self.connection_base)
            .field("field_manager", &self.field_manager)
            .finish_non_exhaustive()
    }
}

impl KubeNamespaceBackend {
    /// A backend that talks to `client` and addresses each namespace as
    /// `<connection_base>/api/v1/namespaces/<namespace>` (`connection_base` is the API server's
    /// URL, such as `https://k8s.example.com:6443`; a trailing `/` is dropped). It creates
    /// namespaces as field manager [`DEFAULT_FIELD_MANAGER`].
    pub fn new(client: kube::Client, connection_base: impl Into<String>) -> Self {
        let mut connection_base = connection_base.into();
        while connection_base.ends_with('/') {
            connection_base.pop();
        }
        Self {
            client,
            connection_base,
            field_manager: DEFAULT_FIELD_MANAGER.to_owned(),
            installation: None,
        }
    }

    /// Stamps `installation` ([`INSTALLATION_LABEL`]) on every namespace it creates.
    #[must_use]
    pub fn with_installation(mut self, installation: InstallationId) -> Self {
        self.installation = Some(installation);
        self
    }

    /// Creates namespaces as `field_manager` instead (at most 128 characters; the API call
    /// fails otherwise).
    #[must_use]
    pub fn with_field_manager(mut self, field_manager: impl Into<String>) -> Self {
        self.field_manager = field_manager.into();
        self
    }

    fn namespaces(&self) -> Api<Namespace> {
        Api::all(self.client.clone())
    }

    /// The namespace the backend creates for `name`.
    fn namespace(
        &self,
        name: &NamespaceName,
        resource_type: ResourceType,
        tier: &Tier,
    ) -> Namespace {
        let mut labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
            (
                RESOURCE_TYPE_LABEL.to_owned(),
                resource_type.as_str().to_owned(),
            ),
            (TIER_LABEL.to_owned(), tier.as_str().to_owned()),
        ]);
        if let Some(installation) = self.installation {
            labels.insert(INSTALLATION_LABEL.to_owned(), installation.to_string());
        }
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.expose().to_owned()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: None,
            status: None,
        }
    }

    /// How the platform addresses the namespace.
    fn object(&self, name: &NamespaceName) -> BackendObject {
        BackendObject {
            provider_id: name.expose().to_owned(),
            connection_url: ConnectionUrl::new(format!(
                "{}/api/v1/namespaces/{}",
                self.connection_base,
                name.expose()
            )),
        }
    }
}

impl Backend for KubeNamespaceBackend {
    fn supports(&self, resource_type: ResourceType) -> bool {
        match resource_type {
            ResourceType::Namespace | ResourceType::Redis => true,
            ResourceType::Postgres => false,
        }
    }

    async fn create(&self, name: &BackendName, tier: &Tier) -> Result<BackendObject, BackendError> {
        let (ns, resource_type) = namespace_of(name)?;
        let namespaces = self.namespaces();
        let params = PostParams {
            field_manager: Some(self.field_manager.clone()),
            ..PostParams::default()
        };
        let err = match namespaces
            .create(&params, &self.namespace(ns, resource_type, tier))
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %name, %resource_type, %tier, "created customer namespace");
                return Ok(self.object(ns));
            }
            Err(err) => err,
        };
        if !is_already_exists(&err) {
            return Err(unavailable("create namespace", name, &err));
        }

        // It exists: ours (an earlier attempt made it) or someone else's.
        let existing = namespaces
            .get_metadata(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?;
        if !is_managed(&existing.metadata) {
            tracing::warn!(namespace = %name, "namespace exists but is not labelled managed-by keel; leaving it alone");
            return Err(BackendError::Foreign {
                name: name.masked(),
            });
        }
        if existing.metadata.deletion_timestamp.is_some() {
            tracing::warn!(namespace = %name, "customer namespace is still being deleted");
            return Err(BackendError::unavailable(
                "create namespace",
                name,
                RedactedError::new("the namespace is still being deleted; retry once it is gone"),
            ));
        }
        tracing::info!(namespace = %name, "customer namespace already exists; reusing it");
        Ok(self.object(ns))
    }

    /// A namespace holds no password: its address is answered while it exists, is the
    /// platform's and is not being deleted; otherwise nothing. It is never created.
    async fn reset_credentials(
        &self,
        name: &BackendName,
        _tier: &Tier,
    ) -> Result<Option<BackendObject>, BackendError> {
        let (ns, _) = namespace_of(name)?;
        let Some(existing) = self
            .namespaces()
            .get_metadata_opt(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?
        else {
            return Ok(None);
        };
        if !is_managed(&existing.metadata) {
            return Err(BackendError::Foreign {
                name: name.masked(),
            });
        }
        if existing.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        Ok(Some(self.object(ns)))
    }

    async fn teardown(&self, name: &BackendName) -> Result<(), BackendError> {
        let (ns, _) = namespace_of(name)?;
        let namespaces = self.namespaces();
        let Some(existing) = namespaces
            .get_metadata_opt(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?
        else {
            tracing::info!(namespace = %name, "customer namespace already gone");
            return Ok(());
        };
        if !is_managed(&existing.metadata) {
            tracing::warn!(namespace = %name, "refusing to delete a namespace not labelled managed-by keel");
            return Err(BackendError::Foreign {
                name: name.masked(),
            });
        }
        if existing.metadata.deletion_timestamp.is_some() {
            // Already on its way out; a second DELETE would only be refused with a 409 until
            // the namespace's content is gone.
            tracing::info!(namespace = %name, "customer namespace is already being deleted");
            return Ok(());
        }
        // Delete exactly the object just checked, not one re-created under its name since (a
        // changed UID is refused with a 409, and the retry checks the labels again).
        let params = DeleteParams {
            preconditions: existing.metadata.uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match namespaces.delete(ns.expose(), &params).await {
            Ok(_) => {
                tracing::info!(namespace = %name, "deleting customer namespace");
                Ok(())
            }
            Err(err) => {
                if is_not_found(&err) {
                    tracing::info!(namespace = %name, "customer namespace already gone");
                    Ok(())
                } else {
                    Err(unavailable("delete namespace", name, &err))
                }
            }
        }
    }

    async fn preflight(&self, name: &BackendName) -> Result<Preflight, BackendError> {
        let (ns, _) = namespace_of(name)?;
        let Some(found) = self
            .namespaces()
            .get_metadata_opt(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?
        else {
            return Ok(Preflight::Absent);
        };
        if found.metadata.deletion_timestamp.is_some() {
            return Ok(Preflight::Terminating);
        }
        Ok(Preflight::Present(ObjectFacts {
            platform_made: is_managed(&found.metadata),
            protected: is_protected(&found.metadata),
            installation: found
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(INSTALLATION_LABEL))
                .cloned(),
            incarnation: found.metadata.uid.clone(),
        }))
    }

    async fn exists(&self, name: &BackendName) -> Result<bool, BackendError> {
        let (ns, _) = namespace_of(name)?;
        let found = self
            .namespaces()
            .get_metadata_opt(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?;
        Ok(found.is_some())
    }

    async fn protected(&self, name: &BackendName) -> Result<bool, BackendError> {
        let (ns, _) = namespace_of(name)?;
        let found = self
            .namespaces()
            .get_metadata_opt(ns.expose())
            .await
            .map_err(|e| unavailable("read namespace", name, &e))?;
        Ok(found.is_some_and(|ns| is_protected(&ns.metadata)))
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use keel_audit::Token;
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    const TOKEN: &str = "a1b2c3d4e5f6a7b8";
    const NS: &str = "instant-customer-a1b2c3d4e5f6a7b8";
    const MASKED_NS: &str = "instant-customer-a1b2…";
    const BASE: &str = "https://k8s.example.com:6443";
    const UID: &str = "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11";
    const CREATE_URI: &str = "/api/v1/namespaces?&fieldManager=keel";
    const NAMESPACE_URI: &str = "/api/v1/namespaces/instant-customer-a1b2c3d4e5f6a7b8";
    const DELETE_URI: &str = "/api/v1/namespaces/instant-customer-a1b2c3d4e5f6a7b8?";
    /// The `Accept` header of a metadata-only read.
    const METADATA_ACCEPT: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

    fn token() -> Token {
        Token::parse(TOKEN).unwrap()
    }

    fn namespace_name(resource_type: ResourceType) -> BackendName {
        BackendName::for_resource(resource_type, &token())
    }

    fn pro() -> Tier {
        Tier::parse("pro").unwrap()
    }

    /// What the fake API server expects next, and how it answers.
    struct Step {
        method: Method,
        uri: &'static str,
        /// The exact `Accept` header expected, if any.
        accept: Option<&'static str>,
        /// The exact JSON body expected, if any.
        body: Option<Value>,
        status: StatusCode,
        reply: Value,
        /// Fail the request at the transport with this message instead of answering.
        transport_error: Option<String>,
    }

    fn post(body: Value, status: StatusCode, reply: Value) -> Step {
        Step {
            method: Method::POST,
            uri: CREATE_URI,
            accept: None,
            body: Some(body),
            status,
            reply,
            transport_error: None,
        }
    }

    fn get_metadata(status: StatusCode, reply: Value) -> Step {
        Step {
            method: Method::GET,
            uri: NAMESPACE_URI,
            accept: Some(METADATA_ACCEPT),
            body: None,
            status,
            reply,
            transport_error: None,
        }
    }

    fn delete(status: StatusCode, reply: Value) -> Step {
        Step {
            method: Method::DELETE,
            uri: DELETE_URI,
            accept: None,
            body: Some(json!({
                "propagationPolicy": "Background",
                "preconditions": { "uid": UID }
            })),
            status,
            reply,
            transport_error: None,
        }
    }

    /// The labels the backend sets.
    fn keel_labels(resource_type: &str, tier: &str) -> Value {
        json!({
            "app.kubernetes.io/managed-by": "keel",
            "keel.dev/resource-type": resource_type,
            "keel.dev/tier": tier
        })
    }

    /// The body of the POST that creates the namespace.
    fn create_body(resource_type: &str, tier: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": NS, "labels": keel_labels(resource_type, tier) }
        })
    }

    /// A full Namespace object as the API server returns it.
    fn namespace_object(resource_type: &str, tier: &str, phase: &str) -> Value {
        let mut labels = keel_labels(resource_type, tier);
        labels["kubernetes.io/metadata.name"] = json!(NS);
        let mut object = json!({
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {
                "name": NS,
                "uid": UID,
                "resourceVersion": "4711",
                "creationTimestamp": "2026-01-12T09:30:00Z",
                "labels": labels,
                "managedFields": [{
                    "manager": "keel",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-01-12T09:30:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": { "f:metadata": { "f:labels": {
                        ".": {},
                        "f:app.kubernetes.io/managed-by": {},
                        "f:keel.dev/resource-type": {},
                        "f:keel.dev/tier": {},
                        "f:kubernetes.io/metadata.name": {}
                    } } }
                }]
            },
            "spec": { "finalizers": ["kubernetes"] },
            "status": { "phase": phase }
        });
        if phase == "Terminating" {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        }
        object
    }

    /// What a metadata-only read of the namespace returns, with these labels.
    fn partial_metadata(labels: Value) -> Value {
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": NS,
                "uid": UID,
                "resourceVersion": "4711",
                "creationTimestamp": "2026-01-12T09:30:00Z",
                "labels": labels
            }
        })
    }

    fn keel_metadata() -> Value {
        let mut labels = keel_labels("namespace", "pro");
        labels["kubernetes.io/metadata.name"] = json!(NS);
        partial_metadata(labels)
    }

    /// A namespace someone else made: the system label only, plus another manager's.
    fn foreign_metadata() -> Value {
        partial_metadata(json!({
            "kubernetes.io/metadata.name": NS,
            "app.kubernetes.io/managed-by": "Helm"
        }))
    }

    fn status(code: StatusCode, reason: &str, message: String) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": { "name": NS, "kind": "namespaces" },
            "code": code.as_u16()
        })
    }

    fn already_exists() -> Value {
        status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("namespaces \"{NS}\" already exists"),
        )
    }

    fn not_found() -> Value {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{NS}\" not found"),
        )
    }

    fn internal_error() -> Value {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!(
                "Internal error occurred: namespaces \"{NS}\" (token {TOKEN}): etcdserver: \
                 request timed out"
            ),
        )
    }

    fn forbidden(verb: &str) -> Value {
        status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "namespaces \"{NS}\" is forbidden: User \
                 \"system:serviceaccount:keel:provisioner\" cannot {verb} resource \
                 \"namespaces\" in API group \"\" in the namespace \"{NS}\""
            ),
        )
    }

    fn respond(status: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// Plays the API server for `steps` in order, asserting each request's method, URI (with
    /// its query string), `Accept` header and body, then asserts no further request arrives
    /// before the client is dropped.
    async fn serve(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        steps: Vec<Step>,
    ) {
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("step {i}: expected {} {}", step.method, step.uri));
            assert_eq!(request.method(), step.method, "step {i}");
            assert_eq!(request.uri().to_string(), step.uri, "step {i}");
            if let Some(accept) = step.accept {
                assert_eq!(
                    request.headers().get(http::header::ACCEPT).unwrap(),
                    accept,
                    "step {i}: Accept header"
                );
            }
            if let Some(expected) = step.body {
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(body, expected, "step {i}: request body");
            }
            if let Some(message) = step.transport_error {
                send.send_error(message);
            } else {
                send.send_response(respond(step.status, &step.reply));
            }
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    /// A backend whose API server is a fake expecting exactly `steps`; drive it with `f`, then
    /// check the fake saw nothing more.
    async fn with_backend<T>(
        steps: Vec<Step>,
        f: impl AsyncFnOnce(&KubeNamespaceBackend) -> T,
    ) -> T {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, steps));
        let backend = KubeNamespaceBackend::new(kube::Client::new(service, "default"), BASE);
        let out = f(&backend).await;
        drop(backend);
        server.await.unwrap();
        out
    }

    /// Everything an error shows: `Display`, `Debug` and every source in its chain.
    fn everything_shown(err: &BackendError) -> String {
        let mut text = format!("{err} {err:?}");
        let mut cause = err.source();
        while let Some(inner) = cause {
            text.push_str(&format!(" | {inner} {inner:?}"));
            cause = inner.source();
        }
        text
    }

    fn assert_foreign(result: Result<impl fmt::Debug, BackendError>) {
        let Err(BackendError::Foreign { name }) = &result else {
            panic!("expected Foreign, got {result:?}");
        };
        assert_eq!(name, MASKED_NS);
    }

    #[tokio::test]
    async fn creates_a_labelled_namespace_and_returns_its_address() {
        for (resource_type, tier) in [
            (ResourceType::Namespace, "pro"),
            (ResourceType::Redis, "free"),
        ] {
            let kind = resource_type.as_str();
            let name = namespace_name(resource_type);
            let tier = Tier::parse(tier).unwrap();
            let object = with_backend(
                vec![post(
                    create_body(kind, tier.as_str()),
                    StatusCode::CREATED,
                    namespace_object(kind, tier.as_str(), "Active"),
                )],
                async |backend| backend.create(&name, &tier).await,
            )
            .await
            .unwrap();
            assert_eq!(object.provider_id, NS);
            assert_eq!(
                object.connection_url.expose(),
                format!("{BASE}/api/v1/namespaces/{NS}")
            );
        }
    }

    /// A rotation never creates: an absent namespace, or one being deleted, answers nothing
    /// after one metadata read (the fake fails the test on any create), and a live one of the
    /// platform's answers its address.
    #[tokio::test]
    async fn resetting_credentials_never_creates_a_namespace() {
        let name = namespace_name(ResourceType::Namespace);
        let mut terminating = keel_metadata();
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        for (reply, expected) in [
            (get_metadata(StatusCode::NOT_FOUND, not_found()), None),
            (get_metadata(StatusCode::OK, terminating), None),
            (
                get_metadata(StatusCode::OK, keel_metadata()),
                Some(format!("{BASE}/api/v1/namespaces/{NS}")),
            ),
        ] {
            let answered = with_backend(vec![reply], async |backend| {
                backend.reset_credentials(&name, &pro()).await
            })
            .await
            .unwrap();
            assert_eq!(
                answered.map(|object| object.connection_url.expose().to_owned()),
                expected
            );
        }
        let foreign = with_backend(
            vec![get_metadata(StatusCode::OK, foreign_metadata())],
            async |backend| backend.reset_credentials(&name, &pro()).await,
        )
        .await;
        assert_foreign(foreign);
    }

    #[tokio::test]
    async fn create_on_an_existing_keel_namespace_succeeds_so_a_retry_is_safe() {
        let name = namespace_name(ResourceType::Namespace);
        let object = with_backend(
            vec![
                post(
                    create_body("namespace", "pro"),
                    StatusCode::CONFLICT,
                    already_exists(),
                ),
                get_metadata(StatusCode::OK, keel_metadata()),
            ],
            async |backend| backend.create(&name, &pro()).await,
        )
        .await
        .unwrap();
        assert_eq!(object.provider_id, NS);
        assert_eq!(
            object.connection_url.expose(),
            format!("{BASE}/api/v1/namespaces/{NS}")
        );
    }

    #[tokio::test]
    async fn create_on_an_existing_namespace_not_labelled_by_keel_is_foreign_and_never_deleted() {
        let name = namespace_name(ResourceType::Namespace);
        for labels in [foreign_metadata(), partial_metadata(json!({}))] {
            // The fake server fails the test on any request after the metadata read.
            let result = with_backend(
                vec![
                    post(
                        create_body("namespace", "pro"),
                        StatusCode::CONFLICT,
                        already_exists(),
                    ),
                    get_metadata(StatusCode::OK, labels),
                ],
                async |backend| backend.create(&name, &pro()).await,
            )
            .await;
            assert_foreign(result);
        }
    }

    #[tokio::test]
    async fn create_on_a_keel_namespace_still_being_deleted_is_unavailable_not_success() {
        let name = namespace_name(ResourceType::Namespace);
        let mut terminating = keel_metadata();
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        let result = with_backend(
            vec![
                post(
                    create_body("namespace", "pro"),
                    StatusCode::CONFLICT,
                    status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("object is being deleted: namespaces \"{NS}\" already exists"),
                    ),
                ),
                get_metadata(StatusCode::OK, terminating),
            ],
            async |backend| backend.create(&name, &pro()).await,
        )
        .await;
        let Err(err @ BackendError::Unavailable { operation, .. }) = &result else {
            panic!("expected Unavailable, got {result:?}");
        };
        assert_eq!(*operation, "create namespace");
        assert!(
            everything_shown(err).contains("still being deleted"),
            "{err:?}"
        );
    }

    /// SWEEP-4: the orphan reclaim's pre-flight reports a namespace stuck terminating, so the
    /// chokepoint answers "already being deleted" without an audit row or a second DELETE.
    #[tokio::test]
    async fn preflight_reports_a_terminating_namespace() {
        let name = namespace_name(ResourceType::Namespace);
        let mut terminating = keel_metadata();
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        let found = with_backend(
            vec![get_metadata(StatusCode::OK, terminating)],
            async |backend| backend.preflight(&name).await,
        )
        .await
        .unwrap();
        assert_eq!(found, Preflight::Terminating);
    }

    /// SWEEP-1, SWEEP-9: the pre-flight reads the installation stamp and a protect mark of any
    /// value but `false`.
    #[tokio::test]
    async fn preflight_reads_the_installation_stamp_and_the_protect_mark() {
        let name = namespace_name(ResourceType::Namespace);
        let mut marked = keel_metadata();
        marked["metadata"]["labels"][INSTALLATION_LABEL] =
            json!("0c5a9a2e-9f1e-4a53-9d59-3b0a7c1e2f10");
        marked["metadata"]["annotations"] = json!({ PROTECT_ANNOTATION: "yes" });
        let found = with_backend(
            vec![get_metadata(StatusCode::OK, marked)],
            async |backend| backend.preflight(&name).await,
        )
        .await
        .unwrap();
        assert_eq!(
            found,
            Preflight::Present(ObjectFacts {
                platform_made: true,
                protected: true,
                installation: Some("0c5a9a2e-9f1e-4a53-9d59-3b0a7c1e2f10".to_owned()),
                incarnation: Some(UID.to_owned()),
            })
        );
    }

    /// A protect mark among the namespace's labels protects as one among its annotations does
    /// (as a database comment's is read), so no place an operator may put it fails open.
    #[tokio::test]
    async fn a_protect_mark_among_the_labels_protects_too() {
        let name = namespace_name(ResourceType::Namespace);
        let mut marked = keel_metadata();
        marked["metadata"]["labels"][PROTECT_ANNOTATION] = json!("true");
        let found = with_backend(
            vec![get_metadata(StatusCode::OK, marked)],
            async |backend| backend.preflight(&name).await,
        )
        .await
        .unwrap();
        assert!(
            matches!(
                found,
                Preflight::Present(ObjectFacts {
                    protected: true,
                    ..
                })
            ),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn teardown_deletes_a_keel_namespace() {
        let name = namespace_name(ResourceType::Redis);
        with_backend(
            vec![
                get_metadata(StatusCode::OK, keel_metadata()),
                delete(
                    StatusCode::OK,
                    namespace_object("redis", "pro", "Terminating"),
                ),
            ],
            async |backend| backend.teardown(&name).await,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn teardown_of_an_absent_namespace_is_success_without_a_delete() {
        let name = namespace_name(ResourceType::Namespace);
        with_backend(
            vec![get_metadata(StatusCode::NOT_FOUND, not_found())],
            async |backend| backend.teardown(&name).await,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn teardown_of_a_keel_namespace_already_being_deleted_is_success_without_a_delete() {
        let name = namespace_name(ResourceType::Namespace);
        let mut terminating = keel_metadata();
        terminating["metadata"]["deletionTimestamp"] = json!("2026-01-12T10:00:00Z");
        with_backend(
            vec![get_metadata(StatusCode::OK, terminating)],
            async |backend| backend.teardown(&name).await,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn teardown_of_a_namespace_gone_before_the_delete_is_success() {
        let name = namespace_name(ResourceType::Namespace);
        with_backend(
            vec![
                get_metadata(StatusCode::OK, keel_metadata()),
                delete(StatusCode::NOT_FOUND, not_found()),
            ],
            async |backend| backend.teardown(&name).await,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn teardown_refuses_a_namespace_keel_did_not_label_and_issues_no_delete() {
        let name = namespace_name(ResourceType::Namespace);
        for labels in [foreign_metadata(), partial_metadata(json!({}))] {
            // The fake server fails the test on any request after the metadata read.
            let result = with_backend(
                vec![get_metadata(StatusCode::OK, labels)],
                async |backend| backend.teardown(&name).await,
            )
            .await;
            assert_foreign(result);
        }
    }

    /// PROV-11: the chokepoint's protection check reads the namespace's annotation.
    #[tokio::test]
    async fn protection_is_read_from_the_namespace_annotation() {
        let name = namespace_name(ResourceType::Namespace);
        let mut protected = keel_metadata();
        protected["metadata"]["annotations"] = json!({ PROTECT_ANNOTATION: "true" });
        let cases = [
            (get_metadata(StatusCode::OK, protected), true),
            (get_metadata(StatusCode::OK, keel_metadata()), false),
            (get_metadata(StatusCode::NOT_FOUND, not_found()), false),
        ];
        for (step, expected) in cases {
            let found =
                with_backend(vec![step], async |backend| backend.protected(&name).await).await;
            assert_eq!(found.unwrap(), expected);
        }
    }

    #[tokio::test]
    async fn exists_reports_presence_from_a_metadata_read() {
        let name = namespace_name(ResourceType::Namespace);
        let found = with_backend(
            vec![get_metadata(StatusCode::OK, keel_metadata())],
            async |backend| backend.exists(&name).await,
        )
        .await;
        assert!(found.unwrap());
        let found = with_backend(
            vec![get_metadata(StatusCode::NOT_FOUND, not_found())],
            async |backend| backend.exists(&name).await,
        )
        .await;
        assert!(!found.unwrap());
    }

    #[tokio::test]
    async fn api_server_errors_are_unavailable_and_never_show_the_full_token() {
        let name = namespace_name(ResourceType::Namespace);
        let create_body = || create_body("namespace", "pro");
        let cases: Vec<(&str, &str, Vec<Step>)> = vec![
            (
                "create",
                "create namespace",
                vec![post(
                    create_body(),
                    StatusCode::INTERNAL_SERVER_ERROR,
                    internal_error(),
                )],
            ),
            (
                "create",
                "create namespace",
                vec![post(
                    create_body(),
                    StatusCode::FORBIDDEN,
                    forbidden("create"),
                )],
            ),
            (
                "create",
                "read namespace",
                vec![
                    post(create_body(), StatusCode::CONFLICT, already_exists()),
                    get_metadata(StatusCode::FORBIDDEN, forbidden("get")),
                ],
            ),
            (
                "teardown",
                "read namespace",
                vec![get_metadata(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    internal_error(),
                )],
            ),
            (
                "teardown",
                "delete namespace",
                vec![
                    get_metadata(StatusCode::OK, keel_metadata()),
                    delete(StatusCode::FORBIDDEN, forbidden("delete")),
                ],
            ),
            (
                "teardown",
                "delete namespace",
                vec![
                    get_metadata(StatusCode::OK, keel_metadata()),
                    delete(StatusCode::INTERNAL_SERVER_ERROR, internal_error()),
                ],
            ),
            (
                "exists",
                "read namespace",
                vec![get_metadata(StatusCode::FORBIDDEN, forbidden("get"))],
            ),
        ];
        for (call, expected_operation, steps) in cases {
            let code = steps.last().unwrap().status.as_u16();
            let result = with_backend(steps, async |backend| match call {
                "create" => backend.create(&name, &pro()).await.map(drop),
                "teardown" => backend.teardown(&name).await,
                "exists" => backend.exists(&name).await.map(drop),
                other => panic!("unknown call {other}"),
            })
            .await;
            let Err(err @ BackendError::Unavailable { operation, .. }) = &result else {
                panic!("{call}: expected Unavailable, got {result:?}");
            };
            assert_eq!(*operation, expected_operation, "{call}");
            assert_eq!(
                err.to_string(),
                format!("the backend failed to {expected_operation} {MASKED_NS}")
            );
            let shown = everything_shown(err);
            assert!(!shown.contains(TOKEN), "{call}: full token leaked: {shown}");
            // The API server's words are kept, masked, for diagnosis.
            assert!(
                shown.contains(&format!("{code} ")),
                "{call}: status code missing: {shown}"
            );
            assert!(
                shown.contains(&format!("namespaces \"{MASKED_NS}\"")),
                "{call}: API message missing: {shown}"
            );
        }
    }

    #[tokio::test]
    async fn a_transport_failure_is_unavailable_and_never_shows_the_full_token() {
        let name = namespace_name(ResourceType::Namespace);
        let broken = Step {
            transport_error: Some(format!(
                "connection reset by peer while reading GET {BASE}/api/v1/namespaces/{NS}"
            )),
            ..get_metadata(StatusCode::OK, keel_metadata())
        };
        let result = with_backend(vec![broken], async |backend| backend.exists(&name).await).await;
        let Err(err @ BackendError::Unavailable { operation, .. }) = &result else {
            panic!("expected Unavailable, got {result:?}");
        };
        assert_eq!(*operation, "read namespace");
        let shown = everything_shown(err);
        assert!(!shown.contains(TOKEN), "full token leaked: {shown}");
        assert!(
            shown.contains(&format!(
                "connection reset by peer while reading GET {BASE}/api/v1/namespaces/{MASKED_NS}"
            )),
            "the cause is kept, masked: {shown}"
        );
    }

    #[tokio::test]
    async fn a_database_name_is_refused_as_unsupported_without_any_request() {
        let name = BackendName::for_resource(ResourceType::Postgres, &token());
        let results = with_backend(vec![], async |backend| {
            [
                backend.create(&name, &pro()).await.map(drop),
                backend.teardown(&name).await,
                backend.exists(&name).await.map(drop),
            ]
        })
        .await;
        for result in results {
            assert!(
                matches!(
                    result,
                    Err(BackendError::Unsupported(ResourceType::Postgres))
                ),
                "{result:?}"
            );
        }
    }

    #[tokio::test]
    async fn serves_namespace_and_redis_but_not_postgres() {
        let (supported, debug) = with_backend(vec![], async |backend| {
            let supported: Vec<ResourceType> = ResourceType::ALL
                .iter()
                .copied()
                .filter(|&rt| backend.supports(rt))
                .collect();
            (supported, format!("{backend:?}"))
        })
        .await;
        assert_eq!(supported, [ResourceType::Redis, ResourceType::Namespace]);
        assert!(debug.contains(BASE), "{debug}");
    }

    #[tokio::test]
    async fn a_trailing_slash_on_the_connection_base_is_dropped() {
        let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let backend =
            KubeNamespaceBackend::new(kube::Client::new(service, "default"), format!("{BASE}/"));
        let name = NamespaceName::for_token(&token());
        assert_eq!(
            backend.object(&name).connection_url.expose(),
            format!("{BASE}/api/v1/namespaces/{NS}")
        );
    }
}
