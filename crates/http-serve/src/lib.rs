//! Serves an axum [`Router`] over HTTP/1.1 to clients that may not be trusted.
//!
//! `axum::serve` gives hyper no timer, and without one hyper's deadline for reading a request
//! head never fires: a client that opens a connection and then sends its request head a byte at
//! a time, or nothing at all, keeps the connection (and its file descriptor) for as long as it
//! likes, and a graceful shutdown waits for it to finish, which it never has to; a request whose
//! body arrives a byte at a time is held the same way, since a handler's own deadline starts once
//! the body is read. [`serve`] holds every connection to [`Limits::header_read`] for each request
//! head (an idle keep-alive connection too: the next head's deadline starts once the last
//! response is written) and every request to [`Limits::body_read`] for its body, and gives the
//! connections still open at shutdown [`Limits::shutdown_grace`] before it returns.
//!
//! ```no_run
//! # async fn run(router: axum::Router) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! keel_http_serve::serve(listener, router, shutdown, keel_http_serve::Limits::default()).await
//! # }
//! ```

use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::RequestBodyDeadline;

/// The deadlines [`serve`] holds its clients to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a client has to send a whole request head, counted from when the connection is
    /// ready to read one (accepted, or its last response written). Past it the connection is
    /// closed. Default 10 s.
    pub header_read: Duration,
    /// How long a client has to send a request's whole body, counted from when its head
    /// arrived. Past it, reading the body fails (an extractor answers its rejection, 400 for a
    /// buffered body) and the connection is closed. Default 10 s.
    pub body_read: Duration,
    /// How long the connections still open when shutdown is asked have to finish their
    /// requests; idle ones are closed at once. Past it [`serve`] returns, and what is left ends
    /// with the runtime. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting, lets the
/// open connections finish within [`Limits::shutdown_grace`] and returns.
///
/// An error accepting a connection never stops the server: a connection that failed before it
/// was accepted is skipped, and anything else (no file descriptor left, say) is logged and
/// accepting is tried again a second later.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "could not accept a connection; trying again in a second");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(RequestBodyDeadline::new(router.clone(), limits.body_read)),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = u64::try_from(limits.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
            "connections were still open when the shutdown grace ran out; no longer waiting for them"
        );
    }
    Ok(())
}

/// An error that concerns only the connection being accepted, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
