//! Listening on TCP or on a Unix socket (nginx on the same host talks to the app over one).

use crate::config::Listen;
use axum::Router;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

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

/// Serves until `stop` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: Listener,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener {
        Listener::Tcp(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
        Listener::Unix(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
    }
}
