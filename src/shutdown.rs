//! Shutdown signals: the future that `serve` hands to [`crate::app::run`]
//! as its shutdown trigger. What happens next (health NOT_SERVING, refusing
//! new calls, draining within `shutdown_grace`, settling downloads) is
//! [`crate::app::run`]'s.

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
