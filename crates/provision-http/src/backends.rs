//! One [`Backend`] over the configured backends, chosen by resource type.

use keel_audit::{ResourceType, Tier};
use keel_provision::kube::KubeNamespaceBackend;
use keel_provision::postgres::PgClusterBackend;
use keel_provision::{Backend, BackendError, BackendName, BackendObject};

/// The backends this deployment has: databases on a shared cluster, and optionally Kubernetes
/// namespaces (for `namespace` and `redis` resources).
pub struct Backends {
    /// Customer databases.
    pub postgres: Option<PgClusterBackend>,
    /// Customer namespaces.
    pub namespaces: Option<KubeNamespaceBackend>,
}

impl Backends {
    fn postgres(&self, resource_type: ResourceType) -> Result<&PgClusterBackend, BackendError> {
        self.postgres
            .as_ref()
            .ok_or(BackendError::Unsupported(resource_type))
    }

    fn namespaces(
        &self,
        resource_type: ResourceType,
    ) -> Result<&KubeNamespaceBackend, BackendError> {
        self.namespaces
            .as_ref()
            .ok_or(BackendError::Unsupported(resource_type))
    }
}

impl Backend for Backends {
    fn supports(&self, resource_type: ResourceType) -> bool {
        match resource_type {
            ResourceType::Postgres => self.postgres.is_some(),
            ResourceType::Redis | ResourceType::Namespace => self.namespaces.is_some(),
        }
    }

    async fn create(&self, name: &BackendName, tier: &Tier) -> Result<BackendObject, BackendError> {
        let resource_type = name.resource_type();
        match resource_type {
            ResourceType::Postgres => self.postgres(resource_type)?.create(name, tier).await,
            ResourceType::Redis | ResourceType::Namespace => {
                self.namespaces(resource_type)?.create(name, tier).await
            }
        }
    }

    async fn reset_credentials(
        &self,
        name: &BackendName,
        tier: &Tier,
    ) -> Result<Option<BackendObject>, BackendError> {
        let resource_type = name.resource_type();
        match resource_type {
            ResourceType::Postgres => {
                self.postgres(resource_type)?
                    .reset_credentials(name, tier)
                    .await
            }
            ResourceType::Redis | ResourceType::Namespace => {
                self.namespaces(resource_type)?
                    .reset_credentials(name, tier)
                    .await
            }
        }
    }

    async fn teardown(&self, name: &BackendName) -> Result<(), BackendError> {
        let resource_type = name.resource_type();
        match resource_type {
            ResourceType::Postgres => self.postgres(resource_type)?.teardown(name).await,
            ResourceType::Redis | ResourceType::Namespace => {
                self.namespaces(resource_type)?.teardown(name).await
            }
        }
    }

    async fn exists(&self, name: &BackendName) -> Result<bool, BackendError> {
        let resource_type = name.resource_type();
        match resource_type {
            ResourceType::Postgres => self.postgres(resource_type)?.exists(name).await,
            ResourceType::Redis | ResourceType::Namespace => {
                self.namespaces(resource_type)?.exists(name).await
            }
        }
    }

    async fn protected(&self, name: &BackendName) -> Result<bool, BackendError> {
        let resource_type = name.resource_type();
        match resource_type {
            ResourceType::Postgres => self.postgres(resource_type)?.protected(name).await,
            ResourceType::Redis | ResourceType::Namespace => {
                self.namespaces(resource_type)?.protected(name).await
            }
        }
    }
}
