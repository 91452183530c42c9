//! A TCP link in front of a server on loopback, which a test can cut: every connection, old
//! and new, closed at once, as a host answering with resets does. (A host that goes silent
//! needs the kernel to drop packets: `patroni::Partition`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Bytes flow both ways.
    Up,
    /// Every connection, old and new, is closed at once.
    Refusing,
}

pub struct Link {
    pub port: u16,
    state: watch::Sender<LinkState>,
    accepted: Arc<AtomicU32>,
}

impl Link {
    /// Starts forwarding a new loopback port to `upstream`.
    pub async fn start(upstream: u16, state: LinkState) -> anyhow::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = watch::channel(state);
        let accepted = Arc::new(AtomicU32::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(carry(client, upstream, rx.clone()));
            }
        });
        Ok(Link {
            port,
            state: tx,
            accepted,
        })
    }

    pub fn set(&self, state: LinkState) {
        let _ = self.state.send(state);
    }

    /// Connections accepted so far (each one a connection attempt of a client).
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// One connection through the link, for as long as the link is up.
async fn carry(mut client: TcpStream, upstream: u16, mut state: watch::Receiver<LinkState>) {
    if *state.borrow_and_update() == LinkState::Refusing {
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = state.wait_for(|s| *s == LinkState::Refusing) => {}
    }
}
