//! Graceful shutdown: one trigger, many listeners.
//!
//! Long-running stages take a [`Shutdown`] and stop reading new work when it
//! fires, finish (or abandon, without committing) what is in flight, commit
//! what is durable, and return. `main` fires the trigger on SIGINT/SIGTERM.

use tokio::sync::watch;

/// Fires the shutdown of everything holding a [`Shutdown`] made from it.
pub struct Trigger(watch::Sender<bool>);

/// Listens for shutdown (cheap to clone).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and its listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every listener to stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Whether shutdown has been requested.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has been requested (at once if it already was,
    /// or if the trigger was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A listener that never fires (for tests and one-shot tools).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive forever so `wait` never resolves.
        std::mem::forget(tx);
        Shutdown(rx)
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes' stop signal).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix. This is a bug.");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
