//! Graceful shutdown: a token cancelled on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).

use tokio::signal::unix::{SignalKind, signal};
pub use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
///
/// Must be called inside a Tokio runtime. Work loops select on `token.cancelled()`, stop taking
/// new work, and finish or release what they hold before their own deadline.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sigterm_cancels_the_token() {
        let token = on_signal().unwrap();
        assert!(!token.is_cancelled());
        // Signal our own process; the handler installed above turns it into a cancellation.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), token.cancelled())
            .await
            .expect("SIGTERM did not cancel the shutdown token");
    }
}
