//! Graceful shutdown: a token cancelled on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).

use tokio::signal::unix::{SignalKind, signal};
pub use tokio_util::sync::CancellationToken;

/// Exit code when a second signal forces the process out during its drain (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
///
/// Must be called inside a Tokio runtime. Work loops select on `token.cancelled()`, stop taking
/// new work, and finish or release what they hold before their own deadline. A second SIGTERM
/// or SIGINT during the drain is not swallowed: it logs and exits at once with
/// [`EXIT_FORCED`] (FND-17), so a drain that hangs can be stopped without SIGKILL.
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
        let again = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = again,
            "second signal during the drain: exiting now without finishing it"
        );
        std::process::exit(EXIT_FORCED);
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

    /// Run by [`a_second_signal_during_the_drain_exits_at_once`] in a child process: a drain
    /// that never ends. Run alone (without the variable), it returns at once.
    #[tokio::test]
    async fn second_signal_child() {
        if std::env::var_os("KEEL_SERVICE_SIGNAL_CHILD").is_none() {
            return;
        }
        let token = on_signal().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        token.cancelled().await;
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
        // The drain that would otherwise never end.
        std::future::pending::<()>().await;
    }

    /// FND-17: after the first signal started the drain, a second one exits the process with
    /// 130 instead of being swallowed.
    #[test]
    fn a_second_signal_during_the_drain_exits_at_once() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "shutdown::tests::second_signal_child",
                "--test-threads=1",
            ])
            .env("KEEL_SERVICE_SIGNAL_CHILD", "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(EXIT_FORCED),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
