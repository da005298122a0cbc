// Recording success with no applier: the variant cannot be built outside keel-propagation.
use keel_propagation::{Completion, Propagation, Transition};

fn forge(propagation: Propagation) -> Completion {
    Completion {
        propagation,
        transition: Transition::Applied { skipped: None },
    }
}

fn main() {
    let _ = forge;
}
