//! Builds audit events the way every Keel concern does, shows which consumer each kind
//! declares, and shows that a field holding a secret is refused without echoing it.
//!
//! Run with `cargo run -p keel-audit --example audit_event`.

use keel_audit::{Actor, AuditEvent, AuditKind, Consumer, ResourceId};
use time::macros::datetime;

fn main() -> Result<(), keel_audit::AuditFieldError> {
    let now = datetime!(2026-11-22 10:00 UTC);
    let event = AuditEvent::new(AuditKind::ProvisionPersistenceFailed, Actor::system(), now)
        .resource(ResourceId::new_random())
        .attr("resource_type", "postgres")?
        .attr("failed_step", "finalize")?;
    println!("{} at {}", event.kind().as_str(), event.occurred_at());

    for kind in [
        AuditKind::PropagationApplied,
        AuditKind::PropagationDeadLettered,
        AuditKind::ProvisionPersistenceFailed,
        AuditKind::RaterReconcileDeleted,
    ] {
        let consumer = match kind.consumer() {
            Consumer::CustomerNotification { .. } => "a customer notification",
            Consumer::OperatorAlert { .. } => "an operator alert",
            Consumer::PropagationWiring { .. } => "a propagation",
            Consumer::IntentionallyNone { .. } => "nobody, on purpose",
        };
        println!("{:<32} is read by {consumer}", kind.as_str());
    }

    let refused = AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), now)
        .attr("note", "postgres://app:hunter2@db/app");
    match refused {
        Ok(_) => println!("a connection URL was accepted (this must not happen)"),
        Err(e) => println!("refused: {e}"),
    }
    Ok(())
}
