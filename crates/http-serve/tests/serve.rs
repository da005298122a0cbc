//! `keel_http_serve::serve` against real TCP clients: requests are answered, a request head that
//! never completes loses its connection, and a shutdown is never held open by a slow client.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use keel_http_serve::{Limits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A guard against a test hanging forever; far longer than any deadline configured here.
const GUARD: Duration = Duration::from_secs(60);

async fn start(
    limits: Limits,
) -> (
    SocketAddr,
    CancellationToken,
    JoinHandle<std::io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/echo", post(|body: Bytes| async move { body }));
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, router, shutdown.clone(), limits));
    (addr, shutdown, server)
}

/// Everything the server sends until it closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(GUARD, stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A connection to `addr` on which `request` (all or part of one) has been sent.
async fn send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// Asks the server to stop and waits until it has.
async fn stop(shutdown: CancellationToken, server: JoinHandle<std::io::Result<()>>) {
    shutdown.cancel();
    tokio::time::timeout(GUARD, server)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_request_is_answered_and_the_connection_kept_alive() {
    let (addr, shutdown, server) = start(Limits::default()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: keel\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0; 1024];
        let n = tokio::time::timeout(GUARD, stream.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
    }
    stop(shutdown, server).await;
}

/// A client that sends part of a request head and then nothing, or nothing at all, loses its
/// connection at the header deadline; so does a keep-alive connection left idle after a request.
#[tokio::test]
async fn a_request_head_that_never_completes_loses_its_connection() {
    let (addr, shutdown, server) = start(Limits {
        header_read: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut partial = send(addr, b"GET /hello HTTP/1.1\r\nHost: keel\r\n").await;
    let answer = read_to_close(&mut partial).await;
    assert!(!answer.contains("hello"), "{answer}");

    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");

    let mut idle = send(addr, b"GET /hello HTTP/1.1\r\nHost: keel\r\n\r\n").await;
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    stop(shutdown, server).await;
}

/// A body sent a byte at a time is cut off at the body deadline: the request is answered with
/// the extractor's rejection instead of waiting for the client, and the connection closed; a
/// body sent in time is read whole.
#[tokio::test]
async fn a_body_that_never_completes_is_cut_off() {
    let (addr, shutdown, server) = start(Limits {
        body_read: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut slow = send(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: keel\r\nContent-Length: 100\r\n\r\n{",
    )
    .await;
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");

    let mut whole = send(
        addr,
        b"POST /echo HTTP/1.1\r\nHost: keel\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    let answer = read_to_close(&mut whole).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"),
        "{answer}"
    );

    stop(shutdown, server).await;
}

/// A client holding a connection open in the middle of its request head does not keep the
/// server from stopping: it returns once the shutdown grace is over, and accepts nothing more.
#[tokio::test]
async fn a_slow_client_does_not_hold_a_shutdown_open() {
    let (addr, shutdown, server) = start(Limits {
        header_read: Duration::from_secs(3600),
        shutdown_grace: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let slow = send(addr, b"GET /hello HTTP/1.1\r\n").await;
    // The server has taken the connection before it is asked to stop.
    let mut probe = send(
        addr,
        b"GET /hello HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(read_to_close(&mut probe).await.starts_with("HTTP/1.1 200"));

    // Stops although a client is still sending its request head.
    stop(shutdown, server).await;
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "the listener was closed");
    drop(slow);
}
