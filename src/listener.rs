//! Listening on TCP or on a Unix socket (nginx on the same host talks to the app over one),
//! bound here or passed by the service manager (socket activation: the socket outlives the
//! process, so a restart makes connections wait in its backlog instead of being refused).

use crate::config::Listen;
use crate::shutdown::{self, Shutdown};
use axum::Router;
use axum::extract::Request;
use axum::http;
use axum::middleware::Next;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tower::ServiceExt;

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
                remove_if_stale(path).await.map_err(with_context)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(with_context)?;
            // Owner and group (nginx is put in the app's group) may connect; nobody else.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(with_context)?;
            Ok(Listener::Unix(listener))
        }
        Listen::Inherited(fd) => inherited(*fd).map_err(with_context),
    }
}

/// Removes the socket file at `path` only when nothing listens on it any more (connecting is
/// refused): a live one (the socket unit's, another instance's) keeps its path, else its
/// clients would silently reach this process instead, and nothing once it exits.
async fn remove_if_stale(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let in_use = || {
        std::io::Error::new(
            ErrorKind::AddrInUse,
            format!(
                "{} is in use: a process accepts connections on it (stop it, or listen elsewhere)",
                path.display()
            ),
        )
    };
    match tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(path)).await {
        // A full backlog (WouldBlock) or no answer at all: someone listens.
        Ok(Ok(_)) | Err(_) => Err(in_use()),
        Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => Err(in_use()),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot tell whether {} is in use: {e}", path.display()),
        )),
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
pub const DRAIN: Duration = Duration::from_millis(500);

/// Counted from the stop: connections still open then are closed, whatever their clients do
/// (one that never reads its answers, an HTTP/2 client that never acknowledges the GOAWAY).
/// A request that came in during `DRAIN` has the app's request timeout to be answered, and a
/// little more to be written (checked where that timeout is defined).
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(11);

/// A connection is closed when no request has been in progress on it for this long, counted
/// from the accept, then from the end of each answer: a client that sends nothing, part of the
/// HTTP/2 preface, only the preface, or never reads its answers holds no descriptor for
/// longer (the app is also reachable directly: the images publish its port). nginx's
/// client_header_timeout is the same 10 s. nginx closes its own idle upstream connections
/// sooner (http.conf, `keepalive_timeout` of the upstream), so it never sends a request on
/// a connection the app is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` resolves; then stops accepting (with socket activation, connections
/// wait in the socket's backlog for the next process), drains for `DRAIN`, asks every
/// connection to finish (HTTP/1.1: after its answer in progress; HTTP/2: GOAWAY), and closes
/// those still open at `DRAIN_DEADLINE`. hyper directly rather than `axum::serve`, which has
/// no way to bound a connection's idle time.
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
    let (finish, finishing) = shutdown::channel();
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    // The listener is dropped (this process's copy of the socket closed) as soon as it stops.
    match listener {
        Listener::Tcp(l) => accept_until(|| l.accept(), &app, &mut connections, &finishing, &mut stop).await,
        Listener::Unix(l) => accept_until(|| l.accept(), &app, &mut connections, &finishing, &mut stop).await,
    }
    let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
    trigger.fire();
    tokio::time::sleep(DRAIN).await;
    finish.fire();
    let finished = tokio::time::timeout_at(deadline, async { while connections.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            open = connections.len(),
            "closing the connections still open {DRAIN_DEADLINE:?} after the stop"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Accepts connections and serves each (on a task in `connections`) until `stop` resolves.
async fn accept_until<A, F, S, P>(
    accept: A,
    app: &Router,
    connections: &mut JoinSet<()>,
    finishing: &Shutdown,
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
        .header_read_timeout(IDLE_TIMEOUT);
    loop {
        let stream = tokio::select! {
            accepted = accept() => accepted,
            // Finished connections are reaped as they end.
            Some(_) = connections.join_next() => continue,
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
        let activity = Arc::new(Activity::new());
        let service = {
            let (app, activity) = (app.clone(), activity.clone());
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let busy = activity.begin();
                let response = app.clone().oneshot(request);
                async move {
                    let response = response.await;
                    drop(busy);
                    response
                }
            })
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        connections.spawn(drive(connection, activity, finishing.clone()));
    }
}

/// Whether a connection has a request in progress, and since when it has had none.
struct Activity(std::sync::Mutex<(usize, Instant)>);

/// A request in progress on its connection, until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity(std::sync::Mutex::new((0, Instant::now())))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (usize, Instant)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.state().0 += 1;
        Busy(self.clone())
    }

    /// When the connection will have been idle for `IDLE_TIMEOUT`; `None` while busy.
    fn idle_deadline(&self) -> Option<Instant> {
        let (in_progress, since) = *self.state();
        (in_progress == 0).then_some(since + IDLE_TIMEOUT)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.0 -= 1;
        state.1 = Instant::now();
    }
}

/// Serves one connection until it ends, it has been idle for `IDLE_TIMEOUT` (then it is
/// dropped: closed), or is asked to finish when `finishing` is set.
async fn drive<C>(connection: C, activity: Arc<Activity>, mut finishing: Shutdown)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);
    let mut finish_asked = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = finishing.wait(), if !finish_asked => {
                finish_asked = true;
                connection.as_mut().graceful_shutdown();
            }
            () = &mut idle => match activity.idle_deadline() {
                Some(deadline) if deadline <= Instant::now() => {
                    tracing::debug!("closing a connection idle for {IDLE_TIMEOUT:?}");
                    return;
                }
                Some(deadline) => idle.as_mut().reset(deadline.into()),
                None => idle.as_mut().reset((Instant::now() + IDLE_TIMEOUT).into()),
            },
        }
    }
}
