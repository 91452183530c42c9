//! Listening on TCP or on a Unix socket (nginx on the same host talks to the app over one),
//! bound here or passed by the service manager (socket activation: the socket outlives the
//! process, so a restart makes connections wait in its backlog instead of being refused).

use crate::config::Listen;
use crate::shutdown;
use axum::Router;
use axum::extract::Request;
use axum::http;
use axum::middleware::Next;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
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

/// A client must send a request's headers within this time (nginx's client_header_timeout):
/// the app is also reachable directly (the images publish its port), and without it a client
/// sending a byte now and then (slowloris) holds a connection for ever. It also closes a
/// keep-alive connection idle that long; nginx retries a request whose cached upstream
/// connection turns out closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` resolves; then stops accepting (with socket activation, connections
/// wait in the socket's backlog for the next process), drains for `DRAIN`, and lets requests
/// in flight finish. hyper directly rather than `axum::serve`, which has no way to set the
/// header read timeout.
pub async fn serve(
    listener: Listener,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (trigger, stopping) = shutdown::channel();
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
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    // The listener is dropped (this process's copy of the socket closed) as soon as it stops.
    match listener {
        Listener::Tcp(l) => accept_until(|| l.accept(), &app, &graceful, &mut stop).await,
        Listener::Unix(l) => accept_until(|| l.accept(), &app, &graceful, &mut stop).await,
    }
    trigger.fire();
    tokio::time::sleep(DRAIN).await;
    graceful.shutdown().await;
    Ok(())
}

/// Accepts connections and serves each (watched by `graceful`) until `stop` resolves.
async fn accept_until<A, F, S, P>(
    accept: A,
    app: &Router,
    graceful: &GracefulShutdown,
    mut stop: impl Future<Output = ()> + Unpin,
) where
    A: Fn() -> F,
    F: Future<Output = std::io::Result<(S, P)>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let stream = tokio::select! {
            accepted = accept() => accepted,
            () = &mut stop => return,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // keep serving the others.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
}
