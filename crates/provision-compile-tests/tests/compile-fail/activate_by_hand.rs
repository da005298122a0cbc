// A handler that reaches past the flow to the store, to mark a row active by hand (PROV-19):
// outside tests the provisioner does not hand its store out.
use keel_provision::{Backend, Provisioner, ResourceStore};

fn handler<S: ResourceStore, B: Backend>(provisioner: &Provisioner<S, B>) -> &S {
    provisioner.store()
}

fn main() {}
