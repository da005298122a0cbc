//! One story run against every `AuditSink`: the fake and the Postgres adapter must agree.

use keel_audit::postgres::{AuditFilter, PgAuditSink, fetch};
use keel_audit::{AuditEvent, AuditKind, AuditSink, MemoryAuditSink};

use crate::sample;

/// Records one event, then a batch, then an empty batch; returns what the sink should now hold.
async fn story<S: AuditSink>(sink: &S) -> Vec<AuditEvent> {
    let one = sample(AuditKind::ProvisionCreated, 0);
    sink.record(&one).await.unwrap();
    let batch: Vec<AuditEvent> = AuditKind::ALL
        .iter()
        .enumerate()
        .map(|(i, &kind)| sample(kind, i as u32 + 1))
        .collect();
    sink.record_batch(&batch).await.unwrap();
    sink.record_batch(&[]).await.unwrap();
    std::iter::once(one).chain(batch).collect()
}

#[tokio::test]
async fn memory_sink_keeps_every_event_in_order() {
    let sink = MemoryAuditSink::new();
    let expected = story(&sink).await;
    assert_eq!(sink.events(), expected);
}

#[tokio::test]
async fn postgres_sink_keeps_every_event_in_order_and_round_trips_every_field() {
    let db = keel_testkit::database().await;
    let sink = PgAuditSink::new(db.pool().clone());
    let expected = story(&sink).await;
    let mut conn = db.pool().acquire().await.unwrap();
    let stored: Vec<AuditEvent> = fetch(&mut conn, &AuditFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.event)
        .collect();
    assert_eq!(stored, expected);
}

#[tokio::test]
async fn memory_sink_failures_record_nothing() {
    let sink = MemoryAuditSink::new();
    sink.fail_next(1);
    let batch = [
        sample(AuditKind::PropagationApplied, 1),
        sample(AuditKind::PropagationApplied, 2),
    ];
    assert!(sink.record_batch(&batch).await.is_err());
    assert!(
        sink.events().is_empty(),
        "a failed batch must record nothing"
    );
    sink.record_batch(&batch).await.unwrap();
    assert_eq!(sink.kinds(), vec![AuditKind::PropagationApplied; 2]);
    assert_eq!(sink.calls(), 2);
}
