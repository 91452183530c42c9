//! SIGTERM / Ctrl-C handling shared by the binaries.

use tokio::sync::watch;

/// Resolves on SIGTERM or SIGINT, after telling the service manager the process is stopping.
/// The handlers are installed by this call, not when the future is first polled: a signal
/// that arrives after the caller has announced readiness never kills the process outright.
pub fn signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on Unix");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        crate::systemd::stopping();
    }
}

/// A flag that many tasks can wait on; set once when the process should stop.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Ticks every `interval` (the first at once) until shutdown: `while t.tick().await {}`.
    /// A slow iteration delays the next tick rather than causing a burst.
    pub fn ticker(self, interval: std::time::Duration) -> Ticker {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { ticks, stopping: self }
    }
}

pub struct Ticker {
    ticks: tokio::time::Interval,
    stopping: Shutdown,
}

impl Ticker {
    /// `false` once shutdown has begun.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.ticks.tick() => true,
            _ = self.stopping.wait() => false,
        }
    }
}
