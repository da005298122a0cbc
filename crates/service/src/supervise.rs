//! Background tasks whose end before shutdown is a failure of the whole process.
//!
//! A binary's work loop often has helpers spawned beside it (a reconciler, housekeeping). Left
//! to `tokio::spawn`, such a helper can panic or return an error while the process runs on
//! without it and `/readyz` stays green. [`spawn`] watches one: if it ends (returns, fails or
//! panics) before `shutdown` is cancelled, that is logged at ERROR naming the task, the task is
//! marked [failed](Supervised::failed), and `shutdown` is cancelled, so the whole process drains
//! and stops. Its [`stop`](Supervised::stop) (or [`join`](Supervised::join)) then returns
//! [`TaskFailed`]; returned from the binary's main, [`run`](crate::run) exits 1 and Kubernetes
//! restarts the pod instead of leaving it running without that work.
//!
//! A task that ends after `shutdown` was cancelled has stopped normally.
//!
//! ```no_run
//! # async fn reconcile_forever(_: keel_service::shutdown::CancellationToken) {}
//! # async fn serve(_: keel_service::shutdown::CancellationToken) {}
//! # async fn example() -> anyhow::Result<std::process::ExitCode> {
//! let shutdown = keel_service::shutdown::on_signal()?;
//! let reconciler = keel_service::supervise::spawn("reconciler", shutdown.clone(), {
//!     let shutdown = shutdown.clone();
//!     async move {
//!         reconcile_forever(shutdown).await;
//!         Ok(())
//!     }
//! });
//! // Returns on SIGTERM, or when the reconciler died and cancelled `shutdown`.
//! serve(shutdown.clone()).await;
//! reconciler.stop().await?; // exit 1 if the reconciler died
//! # Ok(std::process::ExitCode::SUCCESS)
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// A background task started with [`spawn`], whose end before shutdown stops the process.
///
/// Dropping it leaves the task running, unwatched by the caller: call [`stop`](Self::stop) or
/// [`join`](Self::join) once the work loop has returned, to learn whether the task failed.
#[derive(Debug)]
#[must_use = "call `stop` or `join` after the work loop, or a failed task does not change the exit code"]
pub struct Supervised {
    name: &'static str,
    failed: Arc<AtomicBool>,
    task: AbortHandle,
    watcher: JoinHandle<()>,
}

/// The error [`Supervised::stop`] and [`Supervised::join`] return when the task ended before
/// shutdown: the process must exit with an error (1) so that it is restarted.
#[derive(Debug, thiserror::Error)]
#[error("the background task `{task}` ended before shutdown")]
pub struct TaskFailed {
    task: &'static str,
}

impl TaskFailed {
    /// The failed task's name, as given to [`spawn`].
    pub fn task(&self) -> &'static str {
        self.task
    }
}

/// Spawns `task`, named `name` in the log, as a background task of the process.
///
/// If `task` ends before `shutdown` is cancelled (returns `Ok`, returns `Err` or panics), it is
/// logged at ERROR with its name (and the error's text for an `Err`; for a panic only that it
/// panicked, since the panic hook already printed where), the task is marked failed, and
/// `shutdown` is cancelled so the process drains and stops. If it ends after `shutdown` was
/// cancelled, it stopped normally (an `Err` or a panic during the drain is logged at WARN).
///
/// Must be called inside a Tokio runtime.
pub fn spawn<F>(name: &'static str, shutdown: CancellationToken, task: F) -> Supervised
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let inner = tokio::spawn(task);
    let abort = inner.abort_handle();
    let failed = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch(name, shutdown, inner, Arc::clone(&failed)));
    Supervised {
        name,
        failed,
        task: abort,
        watcher,
    }
}

/// Waits for the task to end and judges its end.
async fn watch(
    name: &'static str,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    failed: Arc<AtomicBool>,
) {
    let outcome = task.await;
    if matches!(&outcome, Err(e) if e.is_cancelled()) {
        // Aborted by `Supervised::stop`.
        return;
    }
    if shutdown.is_cancelled() {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                task = name,
                error = crate::error_chain(&e),
                "background task failed during shutdown"
            ),
            // Never the panic's payload (the JoinError's text holds it): it may quote a secret.
            Err(_) => tracing::warn!(task = name, "background task panicked during shutdown"),
        }
        return;
    }
    match outcome {
        Ok(Ok(())) => tracing::error!(
            task = name,
            "background task ended before shutdown; stopping the process"
        ),
        Ok(Err(e)) => tracing::error!(
            task = name,
            error = crate::error_chain(&e),
            "background task failed; stopping the process"
        ),
        Err(_) => tracing::error!(
            task = name,
            "background task panicked; stopping the process"
        ),
    }
    failed.store(true, Ordering::SeqCst);
    shutdown.cancel();
}

impl Supervised {
    /// The task's name, as given to [`spawn`].
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the task ended before shutdown (and so cancelled it). Set before the shutdown
    /// token is cancelled, so it is true once a waiter on that token sees the cancellation the
    /// task's end caused.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops the task if it is still running (it is aborted at its next `.await`, which is not a
    /// failure) and waits until its end is judged. Call it once the work loop has returned.
    ///
    /// # Errors
    ///
    /// [`TaskFailed`] if the task had ended before shutdown.
    pub async fn stop(self) -> Result<(), TaskFailed> {
        self.task.abort();
        self.join().await
    }

    /// Waits for the task to end by itself, for a task that finishes its current step and returns
    /// once `shutdown` is cancelled. Cancel `shutdown` first, or this waits for as long as the
    /// task runs.
    ///
    /// # Errors
    ///
    /// [`TaskFailed`] if the task had ended before shutdown.
    pub async fn join(self) -> Result<(), TaskFailed> {
        // The watcher only logs and sets flags; it cannot fail but for the runtime shutting down.
        let Self {
            name,
            failed,
            watcher,
            ..
        } = self;
        let _ = watcher.await;
        if failed.load(Ordering::SeqCst) {
            Err(TaskFailed { task: name })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A guard against a hang if the token is never cancelled; nothing is timed.
    async fn cancelled(token: &CancellationToken) {
        tokio::time::timeout(Duration::from_secs(60), token.cancelled())
            .await
            .expect("the task's end did not cancel the shutdown token");
    }

    #[tokio::test]
    async fn a_background_task_that_dies_stops_the_process_instead_of_running_on_without_it() {
        let shutdown = CancellationToken::new();
        let task = spawn("panics", shutdown.clone(), async {
            panic!("a bug in the first pass");
        });
        cancelled(&shutdown).await;
        assert!(task.failed());
        let err = task.stop().await.unwrap_err();
        assert_eq!(err.task(), "panics");
    }

    #[tokio::test]
    async fn a_background_task_that_returns_an_error_stops_the_process_too() {
        let shutdown = CancellationToken::new();
        let task = spawn("fails", shutdown.clone(), async {
            Err(anyhow::anyhow!("lost the database"))
        });
        cancelled(&shutdown).await;
        assert!(task.failed());
        let err = task.join().await.unwrap_err();
        assert_eq!(err.task(), "fails");
        assert!(err.to_string().contains("`fails`"), "{err}");
    }

    #[tokio::test]
    async fn a_background_task_that_returns_before_shutdown_stops_the_process_too() {
        let shutdown = CancellationToken::new();
        let task = spawn("returns", shutdown.clone(), async { Ok(()) });
        cancelled(&shutdown).await;
        assert!(task.stop().await.is_err());
    }

    #[tokio::test]
    async fn a_background_task_that_ends_after_shutdown_is_a_normal_stop() {
        for ending in ["returns", "fails", "panics"] {
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            let task = spawn("drains", shutdown.clone(), async move {
                stop.cancelled().await;
                match ending {
                    "fails" => Err(anyhow::anyhow!("failed while draining")),
                    "panics" => panic!("panicked while draining"),
                    _ => Ok(()),
                }
            });
            shutdown.cancel();
            task.join()
                .await
                .unwrap_or_else(|e| panic!("{ending}: {e}"));
        }
    }

    #[tokio::test]
    async fn stop_ends_a_task_still_running_at_shutdown_without_failing_it() {
        let shutdown = CancellationToken::new();
        let task = spawn(
            "runs forever",
            shutdown.clone(),
            std::future::pending::<anyhow::Result<()>>(),
        );
        shutdown.cancel();
        assert!(!task.failed());
        task.stop().await.unwrap();
    }

    #[tokio::test]
    async fn stop_before_shutdown_is_not_a_failure_and_does_not_cancel_shutdown() {
        let shutdown = CancellationToken::new();
        let task = spawn(
            "runs forever",
            shutdown.clone(),
            std::future::pending::<anyhow::Result<()>>(),
        );
        task.stop().await.unwrap();
        assert!(!shutdown.is_cancelled());
    }
}
