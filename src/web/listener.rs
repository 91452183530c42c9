//! Listening on TCP or on a Unix socket (nginx on the same host talks to the app over one).

use crate::config::Listen;
use axum::Router;
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
    }
}

/// A client must send a request's headers within this time (nginx's client_header_timeout):
/// the app is also reachable directly (the images publish its port), and without it a client
/// sending a byte now and then (slowloris) holds a connection for ever. It also closes a
/// keep-alive connection idle that long; nginx retries a request whose cached upstream
/// connection turns out closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` resolves, then lets in-flight requests finish. hyper directly rather
/// than `axum::serve`, which has no way to set the header read timeout.
pub async fn serve(
    listener: Listener,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener {
        Listener::Tcp(l) => serve_on(|| l.accept(), app, stop).await,
        Listener::Unix(l) => serve_on(|| l.accept(), app, stop).await,
    }
}

async fn serve_on<A, F, S, P>(accept: A, app: Router, stop: impl Future<Output = ()>) -> std::io::Result<()>
where
    A: Fn() -> F,
    F: Future<Output = std::io::Result<(S, P)>>,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = accept() => accepted,
            () = &mut stop => break,
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
    graceful.shutdown().await;
    Ok(())
}
