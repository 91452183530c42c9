//! SIGTERM / Ctrl-C handling shared by the binaries.

use tokio::sync::watch;

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
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
