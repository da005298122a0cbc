//! Rebuilds the crate when one of the service's migrations changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
