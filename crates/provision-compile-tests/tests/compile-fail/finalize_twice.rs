// A handler that reuses a created object after finalizing it (say, to finalize it twice).
use keel_provision::{Backend, ProvisionRequest, Provisioned, Provisioner, ResourceStore};
use time::OffsetDateTime;

async fn handler<S: ResourceStore, B: Backend>(
    provisioner: &Provisioner<S, B>,
    request: ProvisionRequest,
    now: OffsetDateTime,
) -> Option<(Provisioned, Provisioned)> {
    let reservation = provisioner.reserve(request, now).await.ok()?;
    let created = provisioner.create(reservation, now).await.ok()?;
    let first = provisioner.finalize(created, now).await.ok()?;
    let second = provisioner.finalize(created, now).await.ok()?;
    Some((first, second))
}

fn main() {}
