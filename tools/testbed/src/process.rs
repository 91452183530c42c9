//! Child processes that are stopped (whole process group) when dropped, and helpers to find
//! programs, pick ports and wait for readiness.

use anyhow::{Context, bail};
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running child in its own process group. Dropping it stops the group: SIGTERM, then
/// SIGKILL after a grace period.
pub struct Process {
    name: String,
    child: Option<Child>,
    /// Set for processes started by `activation::start`.
    pub(crate) notify: Option<Box<crate::notify::NotifySocket>>,
}

impl Process {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Process> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(Process {
            name: name.to_owned(),
            child: Some(child),
            notify: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-(child.id() as i32), signal) };
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` and waits up to `grace` for the exit, then kills the group.
    pub fn stop_with(&mut self, signal: i32, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: as above.
        unsafe { libc::kill(-(child.id() as i32), signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                // Helpers the child left in its group (rabbitmq's script) go too.
                // SAFETY: kill(2) on our own child's process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(process = %self.name, "did not stop within {grace:?}; killing it");
        // SAFETY: kill(2) on our own child's process group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        child.wait().ok()
    }

    /// `stop_with` for async callers: waits without blocking a runtime thread.
    pub async fn stop_async(&mut self, signal: i32, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                if let Some(child) = self.child.take() {
                    // Helpers left in its group go too, as in `stop_with`. SAFETY: as above.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                }
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop_with(libc::SIGKILL, Duration::from_secs(5))
    }

    /// Sends `signal` to the process alone (systemd's `KillMode=process`: a supervisor such as
    /// Patroni stops what it runs itself), waits up to `grace` for its exit, then kills what
    /// is left of its group.
    pub async fn stop_alone_async(&mut self, signal: i32, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_wait().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop_with(libc::SIGKILL, Duration::from_secs(5))
    }

    /// What the process told the launcher (processes started by `activation::start`).
    pub fn notified(&self) -> Option<crate::notify::Notified> {
        self.notify.as_ref().map(|n| n.notified())
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.stop_with(libc::SIGTERM, Duration::from_secs(15))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds `name` on PATH (or in `extra_dirs`), or says which package provides it.
pub fn find_program(name: &str, extra_dirs: &[&str], package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path).chain(extra_dirs.iter().map(PathBuf::from));
    for dir in candidates {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` was not found on PATH: install {package} (Debian: apt-get install {package})")
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a probe socket on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every 100 ms until it succeeds or `timeout` passes; the error names `what`
/// and the last failure.
pub async fn wait_until<F, Fut, T>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => bail!("{what} not ready after {timeout:?}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// uid and gid of a system user, for dropping root (PostgreSQL refuses to run as root).
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; read immediately.
    let entry = unsafe { libc::getpwnam(cname.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: not null, so it points at getpwnam's static entry, read before any other call.
    unsafe { Some(((*entry).pw_uid, (*entry).pw_gid)) }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
