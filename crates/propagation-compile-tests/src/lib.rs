//! Compile-fail tests for Keel's sealed public API: a `Transition` comes only from
//! keel-propagation's decision functions, so outside code cannot record `Applied` for an attempt
//! the decision function did not rule a success (LIB-3), and `keel_orphan_sweep::Reclaimer` is
//! sealed, so outside code cannot hand the sweep an unaudited destructive reclaimer (LIB-18). The
//! cases are in `tests/compile-fail/` and `tests/sealed-ports/`.
