//! A provisioning handler that skips finalize does not build.

#[test]
fn provisioning_bypasses_do_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/compile-fail/*.rs");
}
