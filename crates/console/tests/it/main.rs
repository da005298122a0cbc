//! keel-console over HTTP against a real Postgres: sign-in, sessions, CSRF, every page and
//! every action (and its parity with the CLIs' functions).

mod app;
mod flows;
mod unavailable;
