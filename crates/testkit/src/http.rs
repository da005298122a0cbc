//! A bare HTTP/1.1 client for tests of the binaries' listeners: a `GET` over a raw socket, and
//! a free local address to listen on.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A local address nothing listens on now (the port is released on return, so a server started
/// right after can bind it).
pub fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("the loopback interface can bind an ephemeral port")
}

/// `GET path` on `addr` (`Connection: close`), waiting up to 10 s for something to listen there;
/// the whole response, status line and headers included.
///
/// # Panics
/// When nothing listens on `addr` within 10 s, or the connection fails mid-request.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    for _ in 0..100 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            let request = format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .expect("the request is written");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .await
                .expect("the response is read");
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {addr}");
}
