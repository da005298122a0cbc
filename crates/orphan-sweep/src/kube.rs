//! The Kubernetes inventory: every customer namespace (`instant-customer-<token>`).
//!
//! [`KubeNamespaceInventory`] lists namespaces metadata-only (`PartialObjectMetadataList`, no
//! spec or status), in pages of `limit` objects (500 by default). Each page's
//! `metadata.continue` token is sent back as `continue` for the next page, until a page comes
//! back without one (absent or empty). The API server cannot match a name prefix, so every
//! namespace is listed and the ones outside [`NAMESPACE_PREFIX`] (`kube-system`, `default`, …)
//! are dropped here, client-side.
//!
//! **Never partial.** The sweep treats "not in the inventory" as "gone", so a short list would
//! be read as missing namespaces. The result is therefore either every page or an error, never
//! the items gathered before a failure:
//!
//! - a `410 Gone` / `Expired` on any page (the continue token outlived the API server's
//!   consistent snapshot) is [`InventoryError::Expired`], carrying the pages read so far;
//! - any other failure on page *N* is [`InventoryError::Page`] with `page: N`;
//! - a server that never ends the list (a page returns the continue token it was asked with,
//!   or pagination reaches 10 000 pages) is [`InventoryError::Page`] for the page whose token
//!   is not followed.
//!
//! Namespace names carry customer tokens, and API server messages may echo them, so an error
//! keeps only the status code, reason and message, with every `instant-customer-<token>`
//! masked to `instant-customer-` plus the token's first 4 characters and `…`. Nothing else
//! from the API response (and no continue token, which encodes a name) is kept.

use std::fmt;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keel_provision::{NAMESPACE_PREFIX, RedactedError};
use kube::Api;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::core::response::reason;
use time::OffsetDateTime;

use crate::ports::{Inventory, InventoryError, InventoryItem, InventorySource};

/// Namespaces per page [`KubeNamespaceInventory::new`] asks for.
const DEFAULT_PAGE_SIZE: u32 = 500;

/// Most pages one list reads before giving up on a server that never ends it.
const MAX_PAGES: u32 = 10_000;

/// Lists the customer namespaces on a Kubernetes cluster, page by page, metadata only.
#[derive(Clone)]
pub struct KubeNamespaceInventory {
    client: kube::Client,
    page_size: u32,
    max_pages: u32,
}

impl fmt::Debug for KubeNamespaceInventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeNamespaceInventory")
            .field("page_size", &self.page_size)
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

impl KubeNamespaceInventory {
    /// An inventory that lists through `client`, 500 namespaces per page.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            page_size: DEFAULT_PAGE_SIZE,
            max_pages: MAX_PAGES,
        }
    }

    /// Asks for `n` namespaces per page instead (at least 1; `0` means 1).
    #[must_use]
    pub fn with_page_size(mut self, n: u32) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// Gives up after `n` pages (at least 1) instead of 10 000.
    #[cfg(test)]
    fn with_max_pages(mut self, n: u32) -> Self {
        self.max_pages = n.max(1);
        self
    }
}

impl Inventory for KubeNamespaceInventory {
    fn source(&self) -> InventorySource {
        InventorySource::Kubernetes
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let mut items = Vec::new();
        let mut continue_token: Option<String> = None;
        let mut pages_read: u32 = 0;
        loop {
            let page = pages_read.saturating_add(1);
            let mut params = ListParams::default().limit(self.page_size);
            if let Some(token) = &continue_token {
                params = params.continue_token(token);
            }
            let list = namespaces
                .list_metadata(&params)
                .await
                .map_err(|e| page_error(page, pages_read, &e))?;
            pages_read = page;
            items.extend(list.items.into_iter().filter_map(customer_namespace));

            let Some(next) = list.metadata.continue_.filter(|token| !token.is_empty()) else {
                return Ok(items);
            };
            if continue_token.as_deref() == Some(next.as_str()) {
                return Err(endless(
                    page,
                    "the API server answered with the continue token it was sent, so the list \
                     would never end",
                ));
            }
            if pages_read >= self.max_pages {
                return Err(endless(
                    page,
                    &format!(
                        "the API server still had more after {pages_read} pages (the limit); \
                         giving up on a list that does not end"
                    ),
                ));
            }
            continue_token = Some(next);
        }
    }
}

/// The inventory item for a customer namespace; `None` for any other namespace.
fn customer_namespace(object: PartialObjectMeta<Namespace>) -> Option<InventoryItem> {
    let meta = object.metadata;
    let name = meta
        .name
        .filter(|name| name.starts_with(NAMESPACE_PREFIX))?;
    Some(InventoryItem {
        name,
        created_at: meta.creation_timestamp.and_then(offset_date_time),
        labels: meta.labels.unwrap_or_default().into(),
        annotations: meta.annotations.unwrap_or_default().into(),
        terminating: meta.deletion_timestamp.is_some(),
    })
}

/// A Kubernetes timestamp as an [`OffsetDateTime`] (UTC); `None` if out of range.
fn offset_date_time(time: Time) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(time.0.as_nanosecond()).ok()
}

/// Whether the API server said the list (its continue token) expired: `410 Gone`.
fn is_expired(status: &kube::core::Status) -> bool {
    status.code == 410 || status.reason == reason::EXPIRED || status.reason == reason::GONE
}

/// The error for a failed request for `page`, after `pages_read` good pages.
fn page_error(page: u32, pages_read: u32, err: &kube::Error) -> InventoryError {
    let detail = if let kube::Error::Api(status) = err {
        if is_expired(status) {
            return InventoryError::Expired { pages: pages_read };
        }
        format!("{} {}: {}", status.code, status.reason, status.message)
    } else {
        err.to_string()
    };
    InventoryError::Page {
        page,
        source: Box::new(RedactedError::new(redact(&detail))),
    }
}

/// The error for a list that would not end: `page` carried a continue token not followed.
fn endless(page: u32, why: &str) -> InventoryError {
    InventoryError::Page {
        page,
        source: Box::new(RedactedError::new(redact(why))),
    }
}

/// `text` with every `instant-customer-<token>` masked to `instant-customer-` plus the
/// token's first 4 characters and `…`. The token is the run of ASCII letters and digits after
/// the prefix.
fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(NAMESPACE_PREFIX) {
        let (before, after) = rest.split_at(at + NAMESPACE_PREFIX.len());
        out.push_str(before);
        let token_len = after
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(after.len());
        let (token, tail) = after.split_at(token_len);
        if !token.is_empty() {
            out.push_str(&keel_audit::mask(token));
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use time::macros::datetime;

    use super::*;

    /// The `Accept` header of a metadata-only list: the API server answers with a
    /// `PartialObjectMetadataList` (no spec, no status).
    const METADATA_LIST_ACCEPT: &str =
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

    const NS_A: &str = "instant-customer-a1b2c3d4e5f6";
    const NS_M: &str = "instant-customer-m3n4p5q6r7s8";
    const NS_X: &str = "instant-customer-x9y8w7v6u5t4";
    const TOKENS: [&str; 3] = ["a1b2c3d4e5f6", "m3n4p5q6r7s8", "x9y8w7v6u5t4"];

    /// Real continue tokens (base64url of `{"v":"meta.k8s.io/v1","rv":4711,"start":"<ns>\u0000"}`),
    /// resuming after `NS_A`, `NS_M` and `NS_X`.
    const AFTER_A: &str = "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLWExYjJjM2Q0ZTVmNlx1MDAwMCJ9";
    const AFTER_M: &str = "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLW0zbjRwNXE2cjdzOFx1MDAwMCJ9";
    const AFTER_X: &str = "eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLXg5eTh3N3Y2dTV0NFx1MDAwMCJ9";

    const PAGE_1_OF_2: &str = "/api/v1/namespaces?&limit=2";
    const PAGE_2_OF_2: &str = "/api/v1/namespaces?&limit=2&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLWExYjJjM2Q0ZTVmNlx1MDAwMCJ9";
    const PAGE_3_OF_2: &str = "/api/v1/namespaces?&limit=2&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLXg5eTh3N3Y2dTV0NFx1MDAwMCJ9";

    /// What the fake API server expects next (always a metadata-only GET), and its answer.
    struct Step {
        uri: &'static str,
        reply: Reply,
    }

    enum Reply {
        /// 200 with this body.
        List(Value),
        /// An error `Status` (or any other body) with this code.
        Status(StatusCode, Value),
        /// A plain-text error body, as a proxy in front of the API server sends.
        Text(StatusCode, String),
        /// The connection failed before any response.
        Transport(String),
    }

    fn step(uri: &'static str, reply: Reply) -> Step {
        Step { uri, reply }
    }

    /// One namespace as a `PartialObjectMetadata` list item.
    fn namespace(
        name: &str,
        uid: &str,
        created: &str,
        extra_labels: Value,
        annotations: Value,
    ) -> Value {
        let mut labels = json!({ "kubernetes.io/metadata.name": name });
        if let (Some(labels), Some(extra)) = (labels.as_object_mut(), extra_labels.as_object()) {
            labels.extend(extra.clone());
        }
        let mut metadata = json!({
            "name": name,
            "uid": uid,
            "resourceVersion": "4711",
            "creationTimestamp": created,
            "labels": labels,
            "managedFields": [{
                "manager": "kubectl-create",
                "operation": "Update",
                "apiVersion": "v1",
                "time": created,
                "fieldsType": "FieldsV1",
                "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:kubernetes.io/metadata.name": {} } } }
            }]
        });
        if !annotations.is_null() {
            metadata["annotations"] = annotations;
        }
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata
        })
    }

    fn customer(name: &str, uid: &str, created: &str, team: &str) -> Value {
        namespace(
            name,
            uid,
            created,
            json!({ "app.kubernetes.io/managed-by": "keel", "keel.dev/resource-type": "namespace" }),
            json!({ "keel.dev/team-id": team, "keel.dev/provisioned-by": "keel-provision" }),
        )
    }

    fn system(name: &str, uid: &str) -> Value {
        namespace(name, uid, "2025-11-03T08:00:00Z", json!({}), Value::Null)
    }

    /// A `PartialObjectMetadataList` page; `continue_token` is `None` on the last page.
    fn page(items: Vec<Value>, continue_token: Option<&str>, remaining: Option<u64>) -> Reply {
        let mut metadata = json!({ "resourceVersion": "4711" });
        if let Some(token) = continue_token {
            metadata["continue"] = json!(token);
        }
        if let Some(remaining) = remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
        Reply::List(json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "items": items
        }))
    }

    /// The first two pages of the cluster's namespaces, two per page.
    fn first_page() -> Reply {
        page(
            vec![
                system("default", "0e6e3b1c-5b0f-4c43-9a39-0c2b1c8a7d01"),
                customer(
                    NS_A,
                    "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
                    "2026-01-12T09:30:00Z",
                    "team-7",
                ),
            ],
            Some(AFTER_A),
            Some(4),
        )
    }

    fn second_page() -> Reply {
        page(
            vec![
                customer(
                    NS_M,
                    "2a4d6f80-1c3e-4a5b-8d7f-9e0a1b2c3d4e",
                    "2026-02-01T17:45:12Z",
                    "team-8",
                ),
                customer(
                    NS_X,
                    "7b9c1d3e-5f7a-4b9c-8d1e-2f3a4b5c6d7e",
                    "2026-03-09T00:00:01Z",
                    "team-9",
                ),
            ],
            Some(AFTER_X),
            Some(2),
        )
    }

    fn status(code: StatusCode, reason: &str, message: &str) -> Reply {
        Reply::Status(
            code,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code.as_u16()
            }),
        )
    }

    fn expired() -> Reply {
        status(
            StatusCode::GONE,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        )
    }

    fn internal_error() -> Reply {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &format!(
                "Internal error occurred: unable to decode namespaces \"{NS_X}\" (after \
                 \"{NS_A}\", {NS_M}): etcdserver: request timed out"
            ),
        )
    }

    fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Body> {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap()
    }

    /// Plays the API server for `steps` in order, asserting each request (method, exact URI
    /// with query string, `Accept` header), then asserts no further request arrives before the
    /// client is dropped.
    async fn serve(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        steps: Vec<Step>,
    ) {
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("step {i}: expected GET {}", step.uri));
            assert_eq!(request.method(), Method::GET, "step {i}");
            assert_eq!(request.uri().to_string(), step.uri, "step {i}");
            assert_eq!(
                request
                    .headers()
                    .get(http::header::ACCEPT)
                    .map(|v| v.to_str().unwrap()),
                Some(METADATA_LIST_ACCEPT),
                "step {i}: namespaces must be listed as PartialObjectMetadataList"
            );
            match step.reply {
                Reply::List(body) => send.send_response(respond(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&body).unwrap(),
                )),
                Reply::Status(code, body) => send.send_response(respond(
                    code,
                    "application/json",
                    serde_json::to_vec(&body).unwrap(),
                )),
                Reply::Text(code, text) => {
                    send.send_response(respond(code, "text/plain", text.into_bytes()));
                }
                Reply::Transport(message) => send.send_error(RedactedError::new(message)),
            }
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }

    /// Lists through `configure(inventory)` against a fake API server expecting exactly
    /// `steps`, and checks no error text carries a full token.
    async fn run(
        configure: impl FnOnce(KubeNamespaceInventory) -> KubeNamespaceInventory,
        steps: Vec<Step>,
    ) -> Result<Vec<InventoryItem>, InventoryError> {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, steps));
        let inventory = configure(KubeNamespaceInventory::new(kube::Client::new(
            service, "default",
        )));
        assert_eq!(inventory.source(), InventorySource::Kubernetes);
        let listed = inventory.list().await;
        drop(inventory);
        server.await.unwrap();
        if let Err(error) = &listed {
            assert_no_token(error);
        }
        listed
    }

    fn two_per_page(inventory: KubeNamespaceInventory) -> KubeNamespaceInventory {
        inventory.with_page_size(2)
    }

    /// Every text an error shows: Display and Debug of it and of each source.
    fn error_texts(error: &InventoryError) -> Vec<String> {
        let mut texts = vec![error.to_string(), format!("{error:?}")];
        let mut source = error.source();
        while let Some(current) = source {
            texts.push(current.to_string());
            texts.push(format!("{current:?}"));
            source = current.source();
        }
        texts
    }

    fn assert_no_token(error: &InventoryError) {
        for text in error_texts(error) {
            for token in TOKENS {
                assert!(!text.contains(token), "full token {token} leaked: {text}");
            }
        }
    }

    /// The Display of the error's direct source.
    fn source_text(error: &InventoryError) -> String {
        error.source().map(ToString::to_string).unwrap_or_default()
    }

    fn labels(pairs: &[(&str, &str)]) -> crate::Labels {
        pairs.iter().copied().collect()
    }

    fn expected(name: &str, created_at: OffsetDateTime, team: &str) -> InventoryItem {
        InventoryItem {
            name: name.to_owned(),
            created_at: Some(created_at),
            labels: labels(&[
                ("app.kubernetes.io/managed-by", "keel"),
                ("keel.dev/resource-type", "namespace"),
                ("kubernetes.io/metadata.name", name),
            ]),
            annotations: labels(&[
                ("keel.dev/provisioned-by", "keel-provision"),
                ("keel.dev/team-id", team),
            ]),
            terminating: false,
        }
    }

    #[tokio::test]
    async fn every_page_is_followed_and_only_customer_namespaces_are_returned() {
        let listed = run(
            two_per_page,
            vec![
                step(PAGE_1_OF_2, first_page()),
                step(PAGE_2_OF_2, second_page()),
                step(
                    PAGE_3_OF_2,
                    page(
                        vec![
                            system("kube-node-lease", "3c5e7a9b-1d3f-4e5a-9b7c-1d3e5f7a9b1c"),
                            system("kube-system", "4d6f8a0b-2e4a-4f6b-8c8d-2e4f6a8b0c2d"),
                        ],
                        None,
                        None,
                    ),
                ),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            listed,
            vec![
                expected(NS_A, datetime!(2026-01-12 09:30:00 UTC), "team-7"),
                expected(NS_M, datetime!(2026-02-01 17:45:12 UTC), "team-8"),
                expected(NS_X, datetime!(2026-03-09 00:00:01 UTC), "team-9"),
            ]
        );
    }

    #[tokio::test]
    async fn an_empty_continue_token_ends_the_list() {
        let listed = run(
            two_per_page,
            vec![step(
                PAGE_1_OF_2,
                page(
                    vec![
                        system("default", "0e6e3b1c-5b0f-4c43-9a39-0c2b1c8a7d01"),
                        namespace(
                            NS_A,
                            "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
                            "2026-01-12T09:30:00Z",
                            json!({}),
                            Value::Null,
                        ),
                    ],
                    Some(""),
                    None,
                ),
            )],
        )
        .await
        .unwrap();
        assert_eq!(
            listed,
            vec![InventoryItem {
                name: NS_A.to_owned(),
                created_at: Some(datetime!(2026-01-12 09:30:00 UTC)),
                labels: labels(&[("kubernetes.io/metadata.name", NS_A)]),
                annotations: crate::Labels::new(),
                terminating: false,
            }]
        );
    }

    /// SWEEP-4: a namespace stuck terminating (it has a `deletionTimestamp`, as the API server
    /// answers it) is listed as terminating, so the sweep tracks it and never reclaims it again.
    #[tokio::test]
    async fn a_terminating_namespace_is_listed_as_terminating() {
        let mut stuck = namespace(
            NS_A,
            "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
            "2026-01-12T09:30:00Z",
            json!({ "app.kubernetes.io/managed-by": "keel" }),
            Value::Null,
        );
        stuck["metadata"]["deletionTimestamp"] = json!("2026-01-13T10:00:00Z");
        stuck["metadata"]["finalizers"] = json!(["example.com/stuck"]);
        let listed = run(
            two_per_page,
            vec![step(PAGE_1_OF_2, page(vec![stuck], Some(""), None))],
        )
        .await
        .unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].terminating);
    }

    #[tokio::test]
    async fn new_lists_500_per_page_and_the_page_size_is_at_least_one() {
        let empty = || page(vec![], None, None);
        let listed = run(|i| i, vec![step("/api/v1/namespaces?&limit=500", empty())]).await;
        assert_eq!(listed.unwrap(), vec![]);
        let listed = run(
            |i| i.with_page_size(0),
            vec![step("/api/v1/namespaces?&limit=1", empty())],
        )
        .await;
        assert_eq!(listed.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn an_expired_list_on_page_2_is_expired_after_1_page_with_no_items() {
        let listed = run(
            two_per_page,
            vec![
                step(PAGE_1_OF_2, first_page()),
                step(PAGE_2_OF_2, expired()),
            ],
        )
        .await;
        assert!(
            matches!(listed, Err(InventoryError::Expired { pages: 1 })),
            "{listed:?}"
        );
    }

    #[tokio::test]
    async fn a_server_error_on_page_3_is_a_page_3_error_with_no_items() {
        let listed = run(
            two_per_page,
            vec![
                step(PAGE_1_OF_2, first_page()),
                step(PAGE_2_OF_2, second_page()),
                step(PAGE_3_OF_2, internal_error()),
            ],
        )
        .await;
        let Err(error @ InventoryError::Page { page: 3, .. }) = &listed else {
            panic!("expected a page 3 error, got {listed:?}");
        };
        assert_eq!(
            source_text(error),
            "500 InternalError: Internal error occurred: unable to decode namespaces \
             \"instant-customer-x9y8…\" (after \"instant-customer-a1b2…\", \
             instant-customer-m3n4…): etcdserver: request timed out"
        );
    }

    #[tokio::test]
    async fn a_forbidden_first_page_is_a_page_1_error() {
        let listed = run(
            |i| i,
            vec![step(
                "/api/v1/namespaces?&limit=500",
                status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    "namespaces is forbidden: User \"system:serviceaccount:keel:orphan-sweep\" \
                     cannot list resource \"namespaces\" in API group \"\" at the cluster scope",
                ),
            )],
        )
        .await;
        let Err(error @ InventoryError::Page { page: 1, .. }) = &listed else {
            panic!("expected a page 1 error, got {listed:?}");
        };
        assert!(
            source_text(error).starts_with("403 Forbidden: namespaces is forbidden: User"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn no_error_text_contains_a_full_token() {
        let leaky = format!("namespaces \"{NS_A}\" and {NS_M}/{NS_X} are unavailable");
        let cases: Vec<(u32, Reply)> = vec![
            (2, internal_error()),
            (
                2,
                status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    &leaky,
                ),
            ),
            (2, status(StatusCode::FORBIDDEN, "Forbidden", &leaky)),
            (2, Reply::Text(StatusCode::BAD_GATEWAY, leaky.clone())),
            (2, Reply::Transport(leaky)),
            (2, expired()),
        ];
        for (failing_page, reply) in cases {
            // `run` checks Display, Debug and the whole source chain for every token.
            let listed = run(
                two_per_page,
                vec![step(PAGE_1_OF_2, first_page()), step(PAGE_2_OF_2, reply)],
            )
            .await;
            let error = listed.unwrap_err();
            let texts = error_texts(&error).join("\n");
            match &error {
                InventoryError::Page { page, .. } => {
                    assert_eq!(*page, failing_page, "{texts}");
                    assert!(texts.contains("instant-customer-a1b2…"), "{texts}");
                }
                InventoryError::Expired { pages } => assert_eq!(*pages, 1, "{texts}"),
            }
        }
    }

    #[tokio::test]
    async fn a_server_repeating_the_same_continue_token_is_stopped() {
        let listed = run(
            two_per_page,
            vec![
                step(PAGE_1_OF_2, first_page()),
                step(PAGE_2_OF_2, page(vec![], Some(AFTER_A), Some(4))),
            ],
        )
        .await;
        let Err(error @ InventoryError::Page { page: 2, .. }) = &listed else {
            panic!("expected a page 2 error, got {listed:?}");
        };
        assert!(source_text(error).contains("would never end"), "{error:?}");
    }

    #[tokio::test]
    async fn a_list_that_never_ends_is_stopped_at_the_page_cap() {
        let listed = run(
            |i| i.with_page_size(2).with_max_pages(3),
            vec![
                step(PAGE_1_OF_2, first_page()),
                step(
                    PAGE_2_OF_2,
                    page(
                        vec![customer(NS_M, "2a4d6f80-1c3e-4a5b-8d7f-9e0a1b2c3d4e", "2026-02-01T17:45:12Z", "team-8")],
                        Some(AFTER_M),
                        Some(1),
                    ),
                ),
                step(
                    "/api/v1/namespaces?&limit=2&continue=eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6NDcxMSwic3RhcnQiOiJpbnN0YW50LWN1c3RvbWVyLW0zbjRwNXE2cjdzOFx1MDAwMCJ9",
                    second_page(),
                ),
            ],
        )
        .await;
        let Err(error @ InventoryError::Page { page: 3, .. }) = &listed else {
            panic!("expected a page 3 error, got {listed:?}");
        };
        assert!(source_text(error).contains("after 3 pages"), "{error:?}");
    }

    #[test]
    fn redaction_masks_every_prefixed_token_and_nothing_else() {
        assert_eq!(
            redact(
                "\"instant-customer-a1b2c3d4e5f6\", instant-customer-m3n4p5q6r7s8-x, \
                 instant-customer-, kube-system, instant-customer-ab"
            ),
            "\"instant-customer-a1b2…\", instant-customer-m3n4…-x, instant-customer-, \
             kube-system, instant-customer-…"
        );
        assert_eq!(redact("no names here"), "no names here");
    }
}
