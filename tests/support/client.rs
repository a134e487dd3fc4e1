//! Real clients: HTTP/1.1 and h2c over TCP, HTTP/1.1 and h2 over TLS (with SNI and an
//! optional client certificate), and raw-socket helpers for malformed input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Body;

/// One client connection.
pub enum Client {
    /// HTTP/1.1.
    H1(http1::SendRequest<Body>),
    /// HTTP/2.
    H2(http2::SendRequest<Body>),
}

async fn h1_over<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: I) -> Client {
    let (s, c) = http1::handshake(TokioIo::new(io)).await.expect("h1 handshake");
    tokio::spawn(async move {
        let _ = c.with_upgrades().await;
    });
    Client::H1(s)
}

async fn h2_over<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: I) -> Client {
    let (s, c) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = c.await;
    });
    Client::H2(s)
}

/// A TLS connection to `addr` with SNI `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
}

impl Client {
    /// HTTP/1.1 over TCP.
    pub async fn h1(addr: SocketAddr) -> Client {
        h1_over(TcpStream::connect(addr).await.expect("connect")).await
    }

    /// HTTP/2 with prior knowledge over TCP.
    pub async fn h2c(addr: SocketAddr) -> Client {
        h2_over(TcpStream::connect(addr).await.expect("connect")).await
    }

    /// TLS; HTTP/2 if the server picked `h2` by ALPN, else HTTP/1.1.
    pub async fn tls(addr: SocketAddr, sni: &str, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Client> {
        let s = tls_connect(addr, sni, cfg).await?;
        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(if h2 { h2_over(s).await } else { h1_over(s).await })
    }

    /// Whether this connection speaks HTTP/2.
    pub fn is_h2(&self) -> bool {
        matches!(self, Client::H2(_))
    }

    /// Sends a request. Relative URIs are fine on HTTP/1.1; on HTTP/2 an `http://host`
    /// authority is added from the `host` header.
    pub async fn send(&mut self, mut req: Request<Body>) -> hyper::Result<Response<Incoming>> {
        match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Client::H2(s) => {
                if req.uri().authority().is_none() {
                    let host = req
                        .headers_mut()
                        .remove("host")
                        .map(|h| h.to_str().unwrap().to_string())
                        .unwrap_or_else(|| "localhost".into());
                    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                    *req.uri_mut() = format!("http://{host}{pq}").parse().unwrap();
                }
                *req.version_mut() = http::Version::HTTP_2;
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// Sends `method path` to `host` with extra headers and an empty body; the response with
    /// its whole body as text.
    pub async fn send_text(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
    ) -> Response<String> {
        let mut b = Request::builder().method(method).uri(path).header("host", host);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let r = self.send(b.body(crate::empty()).unwrap()).await.unwrap();
        let (parts, body) = r.into_parts();
        let body = String::from_utf8_lossy(&crate::collect(body).await.unwrap()).into_owned();
        Response::from_parts(parts, body)
    }

    /// GET `path` with `Host: host`; panics on a transport error.
    pub async fn get(&mut self, path: &str, host: &str) -> Response<Incoming> {
        let req = Request::get(path)
            .header("host", host)
            .body(crate::empty())
            .unwrap();
        self.send(req).await.expect("request")
    }
}

/// Reads from `s` until the end of a message head (`\r\n\r\n`), in chunks: what was read
/// (it may run past the head), or `None` if the peer closed first. For raw test servers.
pub async fn read_head_chunks(s: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf)
}

/// Writes raw bytes on a fresh connection and reads the answer until the server closes
/// (or `wait` passes). Returns what was read and whether the server closed the connection.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    raw_exchange_parts(addr, &[bytes], wait).await
}

/// [`raw_exchange`] with the bytes sent in parts, 100 ms apart, so the proxy reads each part
/// on its own.
pub async fn raw_exchange_parts(addr: SocketAddr, parts: &[&[u8]], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s.write_all(part).await.expect("write");
        s.flush().await.expect("flush");
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The status code of the first response in raw HTTP/1 output.
pub fn raw_status(out: &str) -> Option<u16> {
    out.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

/// A GET on a new connection to a proxy at its connection cap: spawned, and checked to be
/// still waiting a moment later. [`Waiting::served`] awaits its answer once the caller freed
/// a place.
pub struct Waiting(tokio::task::JoinHandle<u16>);

impl Waiting {
    /// Starts the GET and checks it waits.
    pub async fn start(addr: SocketAddr, why: &str) -> Waiting {
        let h = tokio::spawn(async move { Client::h1(addr).await.get("/", "x").await.status().as_u16() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!h.is_finished(), "{why}");
        Waiting(h)
    }

    /// The status it got, within 5 s.
    pub async fn served(self, why: &str) -> u16 {
        tokio::time::timeout(Duration::from_secs(5), self.0)
            .await
            .unwrap_or_else(|_| panic!("{why}"))
            .expect("the client task")
    }
}
