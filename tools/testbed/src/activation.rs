//! What systemd does for the app and the worker, done by the launcher: it owns the app's
//! listening socket (as `pageviews-app.socket` does) and passes it to each app process as
//! fd 3 with `LISTEN_FDS=1` and `LISTEN_PID=<that process>` (sd_listen_fds(3)); and it waits
//! for `READY=1` on a `NOTIFY_SOCKET` of its own (`Type=notify`). A restart here is therefore
//! what `systemctl restart pageviews-app` is: the socket stays, connections wait in its
//! backlog, and the new process is "up" only once it says so.

use crate::process::{Process, tail};
use anyhow::{Context, bail};
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// The descriptor number the first passed socket gets (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;
/// systemd's default `Backlog=` (SOMAXCONN); the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 4096;

/// A listening TCP socket on 127.0.0.1 that outlives the processes it is passed to.
pub struct ListenSocket {
    socket: socket2::Socket,
    port: u16,
}

impl ListenSocket {
    /// Binds a free port on 127.0.0.1 and listens.
    pub fn loopback() -> anyhow::Result<ListenSocket> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("cannot create a socket")?;
        socket.set_reuse_address(true)?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&addr.into()).context("cannot bind 127.0.0.1")?;
        socket.listen(BACKLOG)?;
        let port = socket
            .local_addr()?
            .as_socket()
            .context("a TCP socket has an IP address")?
            .port();
        Ok(ListenSocket { socket, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

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
    fn bind(dir: &Path, name: &str) -> anyhow::Result<NotifySocket> {
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

/// Starts `command` the way systemd starts a `Type=notify` unit (with `socket` passed as fd 3
/// when given), without waiting for `READY=1` (a process that is not to be ready yet: its
/// database or broker away). Notify sockets go to `dir`.
pub fn spawn(
    name: &str,
    mut command: Command,
    socket: Option<&ListenSocket>,
    dir: &Path,
    log: &Path,
) -> anyhow::Result<Process> {
    let notify = NotifySocket::bind(dir, name)?;
    let exec = Exec::new(&command, socket.map(|s| s.socket.as_raw_fd()), &notify.path)?;
    let mut exec = Some(exec);
    // SAFETY: `Exec::run` makes only async-signal-safe calls (getpid, fcntl, dup2, execve)
    // and allocates nothing; everything it needs was prepared before the fork.
    unsafe {
        command.pre_exec(move || match exec.as_mut() {
            Some(exec) => exec.run(),
            None => Ok(()),
        });
    }
    let mut process = Process::spawn(name, &mut command, log)?;
    process.notify = Some(Box::new(notify));
    Ok(process)
}

/// `spawn`, then waits up to `timeout` for `READY=1`.
pub async fn start(
    name: &str,
    command: Command,
    socket: Option<&ListenSocket>,
    dir: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<Process> {
    let mut process = spawn(name, command, socket, dir, log)?;
    let mut state = process.notify.as_ref().expect("set by spawn").state.clone();
    let ready = tokio::time::timeout(timeout, async {
        loop {
            if state.borrow_and_update().ready {
                return Ok(());
            }
            if let Some(status) = process.try_wait() {
                bail!("{name} exited with {status} before it was ready");
            }
            // Woken by a notification, or every 100 ms to notice an early exit.
            let _ = tokio::time::timeout(Duration::from_millis(100), state.changed()).await;
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => Ok(process),
        Ok(Err(e)) => Err(e.context(format!("log:\n{}", tail(log, 20)))),
        Err(_) => bail!("{name} sent no READY=1 within {timeout:?}; log:\n{}", tail(log, 20)),
    }
}

/// The exec of the child, prepared in the parent: between fork and exec only async-signal-safe
/// calls are allowed, so the environment (with room for `LISTEN_PID`, known only in the
/// child) and the argument vector are built here.
struct Exec {
    program: CString,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL, and its slot in `envp`.
    listen_pid: Vec<u8>,
    listen_pid_slot: usize,
    listen_fd: Option<RawFd>,
}

// SAFETY: the raw pointers point into `_strings`, owned by the same value; it is used by the
// forked child only.
unsafe impl Send for Exec {}
// SAFETY: as for Send; nothing writes through the pointers.
unsafe impl Sync for Exec {}

const LISTEN_PID: &[u8] = b"LISTEN_PID=";

impl Exec {
    fn new(command: &Command, listen_fd: Option<RawFd>, notify: &Path) -> anyhow::Result<Exec> {
        let program = command.get_program();
        if !program.as_bytes().contains(&b'/') {
            bail!("{program:?}: a service is started by path, not looked up on PATH");
        }
        let cstring = |s: &OsStr| CString::new(s.as_bytes()).context("a NUL byte in an argument or variable");
        // The launcher's environment, what the command sets, then what the manager sets; the
        // manager's own variables are never inherited from the launcher's environment.
        let managed = [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_PID",
        ];
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !managed.iter().any(|m| k == m))
            .collect();
        for (key, value) in command.get_envs() {
            vars.retain(|(k, _)| k != key);
            if let Some(value) = value {
                vars.push((key.to_owned(), value.to_owned()));
            }
        }
        vars.push(("NOTIFY_SOCKET".into(), notify.as_os_str().to_owned()));
        if listen_fd.is_some() {
            vars.push(("LISTEN_FDS".into(), "1".into()));
        }
        let mut strings = vec![cstring(program)?];
        for arg in command.get_args() {
            strings.push(cstring(arg)?);
        }
        let argc = strings.len();
        for (key, value) in &vars {
            let mut pair = key.clone();
            pair.push("=");
            pair.push(value);
            strings.push(cstring(&pair)?);
        }
        let mut argv: Vec<*const libc::c_char> = strings[..argc].iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = strings[argc..].iter().map(|s| s.as_ptr()).collect();
        // u32::MAX has 10 digits; the slot is filled in the child (a null entry ends envp, so
        // without a socket it is simply the terminator).
        let mut listen_pid = LISTEN_PID.to_vec();
        listen_pid.resize(LISTEN_PID.len() + 11, 0);
        let listen_pid_slot = envp.len();
        envp.push(std::ptr::null());
        envp.push(std::ptr::null());
        Ok(Exec {
            program: strings[0].clone(),
            _strings: strings,
            argv,
            envp,
            listen_pid,
            listen_pid_slot,
            listen_fd,
        })
    }

    /// In the child: puts the socket on fd 3 and its pid into `LISTEN_PID`, then execs.
    /// Returns only on failure.
    fn run(&mut self) -> std::io::Result<()> {
        if let Some(fd) = self.listen_fd {
            // SAFETY: getpid, fcntl and dup2 are async-signal-safe and have no preconditions.
            let mut pid = unsafe { libc::getpid() } as u32;
            let mut digits = [0u8; 10];
            let mut len = 0;
            loop {
                digits[len] = b'0' + (pid % 10) as u8;
                len += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in 0..len {
                self.listen_pid[LISTEN_PID.len() + i] = digits[len - 1 - i];
            }
            self.listen_pid[LISTEN_PID.len() + len] = 0;
            self.envp[self.listen_pid_slot] = self.listen_pid.as_ptr().cast();
            let moved = if fd == LISTEN_FDS_START {
                // Already there: only the close-on-exec flag has to go.
                // SAFETY: fcntl(2) on a descriptor this process owns.
                unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }
            } else {
                // The copy dup2 makes is not close-on-exec.
                // SAFETY: dup2(2) between descriptors this process owns.
                unsafe { libc::dup2(fd, LISTEN_FDS_START) }
            };
            if moved < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: program, argv and envp are NUL-terminated strings in null-terminated arrays,
        // alive for the duration of the call.
        unsafe { libc::execve(self.program.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        Err(std::io::Error::last_os_error())
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
