// A handler that forges the proof of finalization instead of earning it.
use keel_provision::{Provisioned, ProvisionedBody};

fn handler() -> ProvisionedBody {
    let forged = Provisioned {};
    ProvisionedBody::from(forged)
}

fn main() {}
