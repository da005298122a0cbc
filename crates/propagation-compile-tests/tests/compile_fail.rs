//! Outside code cannot build a `Transition`: it can only record what `decide` returned.

/// LIB-3: `Transition::Applied` (and every other transition) cannot be built outside
/// keel-propagation, so no caller records success without the decision function.
#[test]
fn outside_code_cannot_forge_a_transition() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/compile-fail/*.rs");
}
