// A handler that creates the backend object and walks away from it.
#![deny(unused_must_use)]
use keel_provision::{Backend, ProvisionRequest, Provisioner, ResourceStore};
use time::OffsetDateTime;

async fn handler<S: ResourceStore, B: Backend>(
    provisioner: &Provisioner<S, B>,
    request: ProvisionRequest,
    now: OffsetDateTime,
) -> Option<()> {
    let reservation = provisioner.reserve(request, now).await.ok()?;
    provisioner.create(reservation, now).await.ok()?;
    Some(())
}

fn main() {}
