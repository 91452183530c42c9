//! What the service manager (systemd, or the local launcher doing the same) is told over
//! `NOTIFY_SOCKET` (sd_notify(3), through the `sd-notify` crate): READY=1 once the process can
//! do its work, STOPPING=1 when it starts to drain, and WATCHDOG=1 pings. Without
//! `NOTIFY_SOCKET` every call does nothing.

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// When the manager asked for a watchdog (`WATCHDOG_USEC`, `WatchdogSec=`), pings it at half
/// the interval from a task on the current runtime: if the runtime wedges, the pings stop and
/// the manager restarts the process. The configuration has checked the variable at start.
pub fn spawn_watchdog() {
    let timeout = match crate::config::watchdog(&crate::config::Environment) {
        Ok(Some(timeout)) => timeout,
        Ok(None) => return,
        Err(error) => {
            tracing::error!(%error, "no watchdog pings");
            return;
        }
    };
    // At least 1 µs: tokio's interval refuses a zero period.
    let every = (timeout / 2).max(std::time::Duration::from_micros(1));
    tracing::info!(every_ms = every.as_millis() as u64, "watchdog pings enabled");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
