//! A [`ResourceStore`] whose every call is bounded by a deadline.
//!
//! The platform pool bounds waiting for a connection, not a statement stuck behind a lock or a
//! server that stopped answering. [`BoundedStore`] gives up on any call at its deadline with
//! [`StoreError::Unavailable`]. A call cut short may still have committed (its reply is what was
//! lost): the provisioning flow already treats every store error that way, so its conditional
//! `pending → failed` flip, not the error, decides what is torn down.

use std::future::Future;
use std::time::Duration;

use keel_audit::{AuditEvent, ResourceId, Token};
use keel_provision::{
    BackendObject, Flip, NewReservation, RedactedError, ResourceRecord, ResourceStatus,
    ResourceStore, StaleCursor, StalePage, StoreError, TokenDigest,
};
use time::OffsetDateTime;

/// `S` with every call given up at `limit`.
#[derive(Clone, Debug)]
pub struct BoundedStore<S> {
    inner: S,
    limit: Duration,
}

impl<S> BoundedStore<S> {
    /// `inner`, each call bounded by `limit`.
    pub fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.limit, call).await {
            Ok(answer) => answer,
            Err(_) => Err(StoreError::unavailable(
                operation,
                RedactedError::new(format!(
                    "no answer within {} ms (the call may still have taken effect)",
                    self.limit.as_millis()
                )),
            )),
        }
    }
}

impl<S: ResourceStore> ResourceStore for BoundedStore<S> {
    async fn reserve(&self, reservation: &NewReservation) -> Result<Token, StoreError> {
        self.bounded("reserve a resource", self.inner.reserve(reservation))
            .await
    }

    async fn activate(
        &self,
        id: ResourceId,
        object: &BackendObject,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.bounded(
            "finalize a resource",
            self.inner.activate(id, object, audit, now),
        )
        .await
    }

    async fn abandon(
        &self,
        id: ResourceId,
        audit: Option<&AuditEvent>,
        now: OffsetDateTime,
    ) -> Result<Flip, StoreError> {
        self.bounded(
            "flip a resource to failed",
            self.inner.abandon(id, audit, now),
        )
        .await
    }

    async fn stale_pending(
        &self,
        older_than: Duration,
        after: Option<StaleCursor>,
        limit: u32,
    ) -> Result<StalePage, StoreError> {
        self.bounded(
            "list stale pending resources",
            self.inner.stale_pending(older_than, after, limit),
        )
        .await
    }

    async fn retire(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.bounded("retire a resource", self.inner.retire(id, audit, now))
            .await
    }

    async fn record(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        self.bounded("record an audit event", self.inner.record(audit))
            .await
    }

    async fn record_while_active(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        self.bounded(
            "record an audit event",
            self.inner.record_while_active(id, audit),
        )
        .await
    }

    async fn get(&self, id: ResourceId) -> Result<Option<ResourceRecord>, StoreError> {
        self.bounded("read a resource", self.inner.get(id)).await
    }

    async fn live_for_digest(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<(ResourceId, ResourceStatus)>, StoreError> {
        self.bounded(
            "look up a resource by token digest",
            self.inner.live_for_digest(digest),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier};
    use keel_provision::DeprovisionReason;
    use keel_provision::postgres::PgResourceStore;

    use super::*;

    /// PROV-10: a store call stuck behind a lock (or a server that stopped answering) is given
    /// up at the deadline as `Unavailable`, for every call the request path makes.
    #[tokio::test]
    async fn every_store_call_stuck_behind_the_database_is_given_up_at_its_deadline() {
        let db = keel_testkit::database().await;
        let team = TeamId::from_uuid(db.team("pro").await);
        let store = BoundedStore::new(
            PgResourceStore::new(db.pool().clone()),
            Duration::from_millis(300),
        );
        let id = ResourceId::new_random();
        let reservation = NewReservation {
            id,
            team_id: team,
            resource_type: ResourceType::Postgres,
            tier: Tier::parse("pro").unwrap(),
            now: OffsetDateTime::now_utc(),
        };
        let token = store.reserve(&reservation).await.unwrap();
        let mut blocker = db.pool().begin().await.unwrap();
        sqlx::query("LOCK TABLE resources, audit_events IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *blocker)
            .await
            .unwrap();
        let now = OffsetDateTime::now_utc();
        let audit = AuditEvent::new(
            AuditKind::ResourceDeprovisioned,
            Actor::parse("api").unwrap(),
            now,
        )
        .attr("reason", DeprovisionReason::Operator.as_str())
        .unwrap()
        .request(RequestId::parse("req-bounded").unwrap());
        let given_up = |e: StoreError| matches!(e, StoreError::Unavailable { .. });
        let again = NewReservation {
            id: ResourceId::new_random(),
            ..reservation.clone()
        };
        assert!(given_up(store.reserve(&again).await.unwrap_err()));
        assert!(given_up(store.get(id).await.unwrap_err()));
        assert!(given_up(store.abandon(id, None, now).await.unwrap_err()));
        assert!(given_up(store.retire(id, &audit, now).await.unwrap_err()));
        assert!(given_up(store.record(&audit).await.unwrap_err()));
        assert!(given_up(
            store
                .stale_pending(Duration::from_secs(0), None, 10)
                .await
                .unwrap_err()
        ));
        assert!(given_up(
            store
                .live_for_digest(&TokenDigest::of(&token))
                .await
                .unwrap_err()
        ));
        blocker.rollback().await.unwrap();
        // Unblocked, the same store answers.
        let found = store.get(id).await.unwrap().unwrap();
        assert_eq!(found.status, ResourceStatus::Pending);
    }
}
