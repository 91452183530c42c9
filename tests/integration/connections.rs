//! What a client reaching the app directly can do to its connections: none may hold one open
//! without sending a request, nor keep the app from exiting after SIGTERM.

use crate::support::TestEnv;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The app's idle timeout (`listener::IDLE_TIMEOUT`) with a margin for a loaded machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(20);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: the client's half of the HTTP/2 connection preface.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// HEADERS on stream 1, END_STREAM | END_HEADERS: `GET /healthz` (HPACK: indexed `:method
/// GET` and `:scheme http`, literal `:path` and `:authority`).
fn h2_get_healthz() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x44, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x41, 9]);
    block.extend_from_slice(b"localhost");
    let mut frame = vec![0, 0, block.len() as u8, 1, 0x5, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    frame
}

/// Reads frames until stream 1 ends (its response is complete); answers nothing, not even the
/// server's SETTINGS.
async fn read_h2_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    loop {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).await?;
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).await?;
        let (kind, flags) = (header[3], header[4]);
        let stream_id = u32::from_be_bytes([header[5] & 0x7f, header[6], header[7], header[8]]);
        if stream_id == 1 && kind <= 1 && flags & 0x1 != 0 {
            return Ok(());
        }
    }
}

/// An h2c connection whose `GET /healthz` was answered, and that then answers nothing.
async fn silent_h2_client(port: u16) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(H2_PREFACE).await?;
    stream.write_all(H2_SETTINGS).await?;
    stream.write_all(&h2_get_healthz()).await?;
    tokio::time::timeout(Duration::from_secs(10), read_h2_response(&mut stream)).await??;
    Ok(stream)
}

/// An HTTP/1.1 client that pipelines requests and never reads an answer: returns once the app
/// is stuck writing to it (neither the client's writes nor the app's answers progress for a
/// second: its answers fill the buffers between them), with the writer still trying.
async fn pipelining_client_that_never_reads(
    port: u16,
    log: &std::path::Path,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // A small receive buffer: the app's answers fill it sooner.
    socket.set_recv_buffer_size(4096)?;
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.set_nonblocking(true)?;
    let mut stream = TcpStream::from_std(socket.into())?;
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let writer = tokio::spawn(async move {
        // /stats: several kilobytes an answer, and no row written.
        let requests = "GET /stats HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(100);
        while stream.write_all(requests.as_bytes()).await.is_ok() {
            counter.fetch_add(requests.len() as u64, Ordering::Relaxed);
        }
    });
    let progress = || {
        let answered = std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("path=/stats")
            .count();
        (written.load(Ordering::Relaxed), answered)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (progress(), Instant::now());
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the app kept answering for 60 s");
        anyhow::ensure!(!writer.is_finished(), "the app closed the connection");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now.1 > 0 && last.1.elapsed() >= Duration::from_secs(1) {
            return Ok(writer);
        }
    }
}

/// Waits until the app closes `stream` (EOF or reset); how long that took.
async fn closed_by_the_app(mut stream: TcpStream, what: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut sink = Vec::new();
    match tokio::time::timeout(CLOSED_WITHIN, stream.read_to_end(&mut sink)).await {
        Ok(_) => Ok(started.elapsed()),
        Err(_) => anyhow::bail!("{what}: still open after {CLOSED_WITHIN:?}"),
    }
}

/// After SIGTERM the app drains, then closes what is still open and exits 0, whatever its
/// clients do: here one that pipelines requests and never reads the answers, and an h2c
/// client that never answers the server's SETTINGS, PING or GOAWAY.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_in_time_despite_clients_that_never_read_or_answer() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let mut app = env.app(&[]).await?;
    let writer = pipelining_client_that_never_reads(app.port, &env.log(&format!("app-{}", app.port))).await?;
    let _h2 = silent_h2_client(app.port).await?;

    let started = Instant::now();
    // The drain deadline (11 s after the stop) and a margin for a loaded machine.
    let status = app.process.stop_async(libc::SIGTERM, Duration::from_secs(25)).await;
    let took = started.elapsed();
    writer.abort();
    assert!(
        status.is_some_and(|s| s.success()),
        "the app did not exit 0 within 25 s of SIGTERM ({status:?} after {took:?}); log:\n{}",
        env.log_text(&format!("app-{}", app.port))
    );
    eprintln!("exited {took:?} after SIGTERM");
    Ok(())
}

/// A connection is closed when no request comes within the idle timeout, from the accept
/// on: also before the app knows whether it speaks HTTP/1.1 or HTTP/2, and on an HTTP/2
/// connection with no stream open.
#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_request_are_closed() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.migrate()?;
    let app = env.app(&[]).await?;
    let connect = || TcpStream::connect(("127.0.0.1", app.port));

    let nothing = connect().await?;
    let mut partial = connect().await?;
    partial.write_all(&H2_PREFACE[..16]).await?;
    let mut preface = connect().await?;
    preface.write_all(H2_PREFACE).await?;
    preface.write_all(H2_SETTINGS).await?;
    let answered = silent_h2_client(app.port).await?;

    let results = futures_util::future::join_all([
        closed_by_the_app(nothing, "a connection that sends nothing"),
        closed_by_the_app(partial, "half an HTTP/2 preface"),
        closed_by_the_app(preface, "an h2c preface, then nothing"),
        closed_by_the_app(answered, "an h2c connection idle after its request"),
    ])
    .await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| e.to_string())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    eprintln!("closed after {results:?}");
    // The app still serves.
    let status = crate::support::client().get(app.url("/healthz")).send().await?.status();
    assert_eq!(status, 200);
    Ok(())
}

/// A socket another process listens on (the one `pageviews-app.socket` holds, say) is
/// never replaced: the app refuses to start and names the setting; the socket keeps working.
#[test]
fn a_live_unix_socket_is_never_taken_over() -> anyhow::Result<()> {
    let dir = pageviews_testbed::ScratchDir::new("pageviews-live-socket")?;
    let path = dir.path().join("app.sock");
    let holder = std::os::unix::net::UnixListener::bind(&path)?;
    let listen = path.to_str().expect("a UTF-8 path");
    let (code, stderr) = crate::config_errors::run(
        crate::support::binaries().app_command(),
        &[
            ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
            ("AMQP_URL", "amqp://u:p@127.0.0.1:1/%2f"),
            ("PAGEVIEWS_LISTEN", listen),
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("PAGEVIEWS_LISTEN: cannot listen on unix:{listen}")) && stderr.contains("is in use"),
        "{stderr}"
    );
    // Connections still reach the process that held the socket first.
    let _client = std::os::unix::net::UnixStream::connect(&path)?;
    holder.set_nonblocking(true)?;
    holder
        .accept()
        .map_err(|e| anyhow::anyhow!("the holder's socket was replaced: {e}"))?;
    Ok(())
}
