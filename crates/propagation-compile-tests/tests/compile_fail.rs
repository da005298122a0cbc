//! Outside code cannot build a `Transition` (it can only record what `decide` returned), and
//! cannot implement a sealed port such as `keel_orphan_sweep::Reclaimer`.

/// LIB-3: `Transition::Applied` (and every other transition) cannot be built outside
/// keel-propagation, so no caller records success without the decision function.
#[test]
fn outside_code_cannot_forge_a_transition() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/compile-fail/*.rs");
}

/// LIB-18: `keel_orphan_sweep::Reclaimer` is sealed, so no type outside Keel can hand the sweep
/// an unaudited destructive reclaimer (tests use `testing::ScriptedReclaimer`).
#[test]
fn outside_code_cannot_implement_a_sealed_port() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/sealed-ports/*.rs");
}
