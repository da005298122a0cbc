// A handler that creates the backend object and answers 201 without finalizing the row.
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
    let created = provisioner.create(reservation, now).await.ok()?;
    Some(ProvisionedBody::from(created))
}

fn main() {}
