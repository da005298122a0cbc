//! keel-audit against a real Postgres (one fresh database per test) and its fake.

mod consumers;
mod contract;
mod list;
mod notify;
mod partitions;
mod postgres;
mod privileges;
mod regressions;
mod screen;
mod seal;

use keel_audit::{Actor, AuditEvent, AuditKind, RequestId, ResourceId, TeamId};
use time::macros::datetime;

/// A fully populated event of `kind`.
fn sample(kind: AuditKind, n: u32) -> AuditEvent {
    AuditEvent::new(
        kind,
        Actor::parse("keel-test").unwrap(),
        datetime!(2026-11-22 09:30:00.123456789 UTC) + time::Duration::seconds(n.into()),
    )
    .team(TeamId::new_random())
    .resource(ResourceId::new_random())
    .request(RequestId::parse(&format!("req-{n}")).unwrap())
    .attr("tier", "pro")
    .unwrap()
    .attr("n", n.to_string())
    .unwrap()
}
