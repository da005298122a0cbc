//! Compile-fail tests for keel-propagation's public API: a `Transition` comes only from the
//! decision functions, so outside code cannot record `Applied` for an attempt the decision
//! function did not rule a success (LIB-3). The cases are in `tests/compile-fail/`.
