//! Listening on TCP or on a Unix socket (nginx on the same host talks to the app over one),
//! bound here or passed by the service manager (socket activation: the socket outlives the
//! process, so a restart makes connections wait in its backlog instead of being refused).

use crate::config::Listen;
use crate::shutdown::{self, Shutdown};
use axum::Router;
use axum::extract::Request;
use axum::http;
use axum::middleware::Next;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

pub async fn bind(listen: &Listen) -> std::io::Result<Listener> {
    let with_context = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}"));
    match listen {
        Listen::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(with_context),
        Listen::Unix(path) => {
            // A socket left by a previous run would make bind fail; anything else is kept.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path).map_err(with_context)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(with_context)?;
            // Owner and group (nginx is put in the app's group) may connect; nobody else.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(with_context)?;
            Ok(Listener::Unix(listener))
        }
        Listen::Inherited(fd) => inherited(*fd).map_err(with_context),
    }
}

/// Takes over a passed descriptor once it is known to be a listening stream socket.
fn inherited(fd: std::os::fd::RawFd) -> std::io::Result<Listener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    // SAFETY: the service manager passed this descriptor for this process to own
    // (sd_listen_fds(3)); config parsing hands it out once.
    let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if socket.r#type()? != socket2::Type::STREAM || !socket.is_listener()? {
        return Err(invalid("it is not a listening stream socket".into()));
    }
    socket.set_nonblocking(true)?;
    match socket.domain()? {
        socket2::Domain::UNIX => Ok(Listener::Unix(tokio::net::UnixListener::from_std(socket.into())?)),
        socket2::Domain::IPV4 | socket2::Domain::IPV6 => {
            Ok(Listener::Tcp(tokio::net::TcpListener::from_std(socket.into())?))
        }
        other => Err(invalid(format!("its address family {other:?} is neither TCP nor Unix"))),
    }
}

impl Listener {
    /// Where it listens, for the log.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix(l) => l.local_addr().map(|a| {
                a.as_pathname()
                    .map_or("unix:(unnamed)".into(), |p| format!("unix:{}", p.display()))
            }),
        }
        .unwrap_or_else(|e| format!("(unknown: {e})"))
    }
}

/// How long the app keeps serving its open connections after it stops accepting, each
/// response asking the client to close (`Connection: close`), before idle connections are
/// closed. A connection accepted just before the stop has its request read, not dropped
/// (Go's net/http gives new connections 5 s for the same reason), and nginx moves to new
/// connections after a response instead of finding an idle one closed under it.
const DRAIN: Duration = Duration::from_millis(500);

/// Serves until `stop` resolves; then stops accepting (with socket activation, connections
/// wait in the socket's backlog for the next process), drains for `DRAIN`, and lets requests
/// in flight finish.
pub async fn serve(
    listener: Listener,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (trigger, stopping) = shutdown::channel();
    let accepting = stopping.clone();
    let app = app.layer(axum::middleware::from_fn(move |request: Request, next: Next| {
        let stopping = stopping.clone();
        async move {
            // HTTP/2 has no Connection header (its server sends GOAWAY on shutdown).
            let http1 = request.version() < http::Version::HTTP_2;
            let mut response = next.run(request).await;
            if http1 && stopping.is_set() {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            response
        }
    }));
    let graceful = async move {
        stop.await;
        trigger.fire();
        tokio::time::sleep(DRAIN).await;
    };
    match listener {
        Listener::Tcp(l) => {
            axum::serve(UntilStopped::new(l, accepting), app)
                .with_graceful_shutdown(graceful)
                .await
        }
        Listener::Unix(l) => {
            axum::serve(UntilStopped::new(l, accepting), app)
                .with_graceful_shutdown(graceful)
                .await
        }
    }
}

/// Accepts until shutdown, then closes its copy of the listening socket and accepts nothing.
struct UntilStopped<L> {
    inner: Option<L>,
    stopping: Shutdown,
}

impl<L> UntilStopped<L> {
    fn new(inner: L, stopping: Shutdown) -> Self {
        UntilStopped {
            inner: Some(inner),
            stopping,
        }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for UntilStopped<L> {
    type Io = L::Io;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        if let Some(inner) = self.inner.as_mut() {
            tokio::select! {
                accepted = inner.accept() => return accepted,
                () = self.stopping.wait() => self.inner = None,
            }
        }
        std::future::pending().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.inner {
            Some(inner) => inner.local_addr(),
            None => Err(std::io::Error::other("no longer listening")),
        }
    }
}
