//! The launcher's end of a `NOTIFY_SOCKET` (sd_notify(3)): what a process started as a
//! `Type=notify` unit says (READY=1, STOPPING=1, WATCHDOG=1, STATUS=).

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::watch;

/// What a process told the launcher over its notify socket.
#[derive(Clone, Debug, Default)]
pub struct Notified {
    pub ready: bool,
    pub stopping: bool,
    pub watchdog_pings: u32,
    pub status: String,
}

impl Notified {
    /// Applies one datagram (newline-separated `KEY=VALUE` lines, sd_notify(3)).
    fn apply(&mut self, datagram: &str) {
        for line in datagram.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => self.ready = true,
                Some(("STOPPING", "1")) => self.stopping = true,
                Some(("WATCHDOG", "1")) => self.watchdog_pings += 1,
                Some(("STATUS", status)) => self.status = status.to_owned(),
                _ => {}
            }
        }
    }
}

/// The receiving end of one process's `NOTIFY_SOCKET`; the socket file goes with it.
pub struct NotifySocket {
    path: PathBuf,
    state: watch::Receiver<Notified>,
    reader: tokio::task::JoinHandle<()>,
}

static NOTIFY: AtomicU32 = AtomicU32::new(0);

impl NotifySocket {
    pub(crate) fn bind(dir: &Path, name: &str) -> anyhow::Result<NotifySocket> {
        let n = NOTIFY.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{name}-{n}.notify"));
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path)
            .with_context(|| format!("cannot bind the notify socket {}", path.display()))?;
        let (tx, state) = watch::channel(Notified::default());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(len) = socket.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                tx.send_modify(|state| state.apply(&text));
            }
        });
        Ok(NotifySocket { path, state, reader })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Changes as datagrams arrive.
    pub(crate) fn watch(&self) -> watch::Receiver<Notified> {
        self.state.clone()
    }

    pub fn notified(&self) -> Notified {
        self.state.borrow().clone()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.reader.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_parsed_line_by_line() {
        let mut state = Notified::default();
        state.apply("READY=1\nSTATUS=serving on 127.0.0.1:1\n");
        state.apply("WATCHDOG=1");
        state.apply("WATCHDOG=1\nSTOPPING=1\nX_CUSTOM=2");
        assert!(state.ready && state.stopping);
        assert_eq!(state.watchdog_pings, 2);
        assert_eq!(state.status, "serving on 127.0.0.1:1");
    }
}
