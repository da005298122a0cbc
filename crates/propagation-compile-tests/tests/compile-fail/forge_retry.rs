// A retry (or a dead letter) cannot be forged either: every transition comes from `decide`.
use keel_propagation::{RetryCause, Transition};

fn main() {
    let _ = Transition::DeadLetter {
        cause: RetryCause::Abandoned,
    };
}
