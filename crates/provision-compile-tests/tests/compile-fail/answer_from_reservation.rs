// A handler that answers 201 straight from the pending reservation.
use keel_provision::{
    Backend, ProvisionRequest, ProvisionedBody, Provisioner, ResourceStore,
};
use time::OffsetDateTime;

async fn handler<S: ResourceStore, B: Backend>(
    provisioner: &Provisioner<S, B>,
    request: ProvisionRequest,
    now: OffsetDateTime,
) -> Option<ProvisionedBody> {
    let reservation = provisioner.reserve(request, now).await.ok()?;
    Some(ProvisionedBody::from(reservation))
}

fn main() {}
