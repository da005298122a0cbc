//! Routing by resource type, end to end: the default appliers (the role applier for
//! `postgres`, the namespace quota applier for `namespace` and `redis`, the latter against a
//! tower-test Kubernetes API answering real API JSON) land a resource of every type exactly as
//! keel-provision creates it.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use keel_audit::Token;
use keel_propagation::ByResourceType;
use keel_propagation::Metrics;
use keel_propagation::kube::{KubeQuotaApplier, TierQuotas};
use keel_propagation::postgres::{PgRoleApplier, TierRoleSettings};
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_provision::BackendName;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::*;

/// Plays the Kubernetes API for the customer namespaces in `namespaces` (name → the resource
/// type keel-provision labelled it with): a metadata GET answers the namespace as provisioning
/// created it; a server-side apply of the quota is echoed back as the API server does.
/// Returns the requests it saw (method and path).
async fn api_server(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    namespaces: BTreeMap<String, &'static str>,
) -> Vec<(Method, String)> {
    let mut seen = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        seen.push((method.clone(), path.clone()));
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (status, body) = match (method, segments.as_slice()) {
            (Method::GET, ["api", "v1", "namespaces", name]) => match namespaces.get(*name) {
                Some(resource_type) => (
                    StatusCode::OK,
                    json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": {
                            "name": name,
                            "uid": "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
                            "resourceVersion": "4711",
                            "creationTimestamp": "2026-01-12T09:30:00Z",
                            "labels": {
                                "kubernetes.io/metadata.name": name,
                                "app.kubernetes.io/managed-by": "keel",
                                "keel.dev/resource-type": resource_type,
                                "keel.dev/tier": "free"
                            }
                        }
                    }),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": format!("namespaces \"{name}\" not found"),
                        "reason": "NotFound", "details": { "name": name, "kind": "namespaces" },
                        "code": 404
                    }),
                ),
            },
            (
                Method::PATCH,
                [
                    "api",
                    "v1",
                    "namespaces",
                    name,
                    "resourcequotas",
                    "keel-tier",
                ],
            ) => {
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let mut body: Value = serde_json::from_slice(&bytes).unwrap();
                body["metadata"]["namespace"] = json!(name);
                body["metadata"]["uid"] = json!("9d8c7b6a-5f4e-4d3c-8b2a-1a0b9c8d7e6f");
                body["metadata"]["resourceVersion"] = json!("4713");
                body["status"] = json!({ "hard": body["spec"]["hard"].clone(), "used": {} });
                (StatusCode::OK, body)
            }
            (method, _) => panic!("unexpected request {method} {path}"),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }
    seen
}

/// PROP-2: for each resource type, a resource shaped exactly as keel-provision creates it (its
/// provider id from `BackendName::for_resource`) is applied by the default routing.
#[tokio::test]
async fn every_provisioned_resource_type_has_an_applier_that_can_land_it() {
    let db = keel_testkit::database().await;
    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(team.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let mut namespaces = BTreeMap::new();
    let mut resources = Vec::new();
    for (i, &resource_type) in ResourceType::ALL.iter().enumerate() {
        let token = Token::parse(&format!(
            "r{i}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
        .unwrap();
        let name = BackendName::for_resource(resource_type, &token);
        match resource_type {
            ResourceType::Postgres => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE ROLE {} CONNECTION LIMIT 5",
                    name.expose()
                )))
                .execute(db.pool())
                .await
                .unwrap();
            }
            ResourceType::Namespace | ResourceType::Redis => {
                namespaces.insert(name.expose().to_owned(), resource_type.as_str());
            }
        }
        let resource = ResourceId::new_random();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             VALUES ($1, $2, $3, $4, 'free', 'active', $5, 'https://backend/x')",
        )
        .bind(resource.as_uuid())
        .bind(token.expose())
        .bind(team.as_uuid())
        .bind(resource_type.as_str())
        .bind(name.expose())
        .execute(db.pool())
        .await
        .unwrap();
        resources.push((resource_type, resource));
    }
    assert_eq!(
        store(db.pool()).reconcile(T0).await.unwrap().len(),
        resources.len()
    );

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(api_server(handle, namespaces));
    let applier = Arc::new(ByResourceType {
        postgres: Some(PgRoleApplier::new(
            db.pool().clone(),
            TierRoleSettings::standard(),
        )),
        kubernetes: Some(KubeQuotaApplier::new(
            kube::Client::new(service, "default"),
            TierQuotas::standard(),
        )),
    });
    let runner = Runner::new(
        Arc::new(store(db.pool())),
        applier,
        Metrics::register(&mut Registry::default()),
        RunnerConfig::new(worker("runner-1")),
    )
    .unwrap();
    let report = runner
        .run_batch(T0, &CancellationToken::new())
        .await
        .unwrap();
    drop(runner);
    let seen = server.await.unwrap();

    assert_eq!(report.applied, resources.len(), "{report:?}");
    for (resource_type, resource) in &resources {
        assert_eq!(
            resource_tier(db.pool(), *resource).await,
            "pro",
            "{resource_type}"
        );
        assert_eq!(
            audit_kinds(db.pool(), *resource).await,
            ["propagation.applied"],
            "{resource_type}"
        );
    }
    // Two namespace-backed resources: one metadata read and one quota apply each, and
    // nothing for the postgres one.
    let gets = seen.iter().filter(|(m, _)| *m == Method::GET).count();
    let patches = seen.iter().filter(|(m, _)| *m == Method::PATCH).count();
    assert_eq!((gets, patches), (2, 2), "{seen:?}");
}
