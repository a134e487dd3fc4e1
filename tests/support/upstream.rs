//! Test upstreams on `127.0.0.1:0`. Every response carries `x-upstream: NAME`.
//!
//! Paths: `/echo` streams the request body back (and request trailers as response trailers
//! with `grpc-status: 0` added on HTTP/2; on HTTP/1.1, the request's `Trailer` header is the
//! response's and its trailers come back); `/headers` answers the request head it saw;
//! `/delay/MS` answers after MS milliseconds; `/ws` is a WebSocket echo; anything else `ok`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::pki::Leaf;
use crate::{full, Body};

/// Protocols an upstream accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (h2c, or h2 by ALPN with TLS).
    Http2,
    /// Both, as the client asks (by ALPN with TLS, `h2` preferred).
    Both,
}

/// Builds a test upstream.
pub struct Upstream {
    name: &'static str,
    proto: Proto,
    tls: Option<Leaf>,
    delay: Duration,
    addr: Option<SocketAddr>,
    client_ca: Option<std::path::PathBuf>,
    status: Option<StatusCode>,
}

/// A running upstream; stops when dropped.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests it received.
    pub hits: Arc<AtomicUsize>,
    /// Connections it accepted.
    pub conns: Arc<AtomicUsize>,
    /// The status every answer gets (0: the normal one); see [`Running::set_status`].
    status: Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// From now on, answers every request with `status` (0: the normal answers again), also
    /// on connections already open: an upstream that starts or stops failing.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Stops accepting (the port closes; pooled connections are cut as their tasks end).
    pub fn stop(self) {}
}

impl Upstream {
    /// An HTTP/1.1 upstream.
    pub fn http1(name: &'static str) -> Upstream {
        Upstream {
            name,
            proto: Proto::Http1,
            tls: None,
            delay: Duration::ZERO,
            addr: None,
            client_ca: None,
            status: None,
        }
    }

    /// An HTTP/2 upstream.
    pub fn http2(name: &'static str) -> Upstream {
        Upstream {
            proto: Proto::Http2,
            ..Upstream::http1(name)
        }
    }

    /// An upstream that speaks HTTP/1.1 and HTTP/2, as each client asks.
    pub fn dual(name: &'static str) -> Upstream {
        Upstream {
            proto: Proto::Both,
            ..Upstream::http1(name)
        }
    }

    /// Serve TLS with this certificate.
    pub fn tls(mut self, leaf: Leaf) -> Self {
        self.tls = Some(leaf);
        self
    }

    /// With TLS, require a client certificate signed by this CA (mTLS).
    pub fn require_client_cert(mut self, ca: &std::path::Path) -> Self {
        self.client_ca = Some(ca.to_path_buf());
        self
    }

    /// Answer every request with this status (a failing endpoint).
    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(StatusCode::from_u16(status).expect("a valid status"));
        self
    }

    /// Delay every response.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// Listen on this address instead of a fresh port (to bring an endpoint back).
    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Binds and serves.
    pub async fn start(self) -> Running {
        let want = self.addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        // An upstream coming back at the address of one just dropped may find its socket
        // still closing: retry briefly.
        let start = std::time::Instant::now();
        let listener = loop {
            match TcpListener::bind(want).await {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && start.elapsed() < Duration::from_secs(5) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind upstream {want}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let acceptor = self.tls.as_ref().map(|leaf| {
            let alpn: &[&[u8]] = match self.proto {
                Proto::Http1 => &[b"http/1.1"],
                Proto::Http2 => &[b"h2"],
                Proto::Both => &[b"h2", b"http/1.1"],
            };
            tokio_rustls::TlsAcceptor::from(crate::pki::server_config(leaf, alpn, self.client_ca.as_deref()))
        });
        let (name, proto, delay, h, n) = (self.name, self.proto, self.delay, hits.clone(), conns.clone());
        let status = Arc::new(std::sync::atomic::AtomicU16::new(
            self.status.map_or(0, |s| s.as_u16()),
        ));
        let shared_status = status.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let (acceptor, h, st) = (acceptor.clone(), h.clone(), status.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let s = st.load(Ordering::SeqCst);
                        respond(req, name, delay, StatusCode::from_u16(s).ok())
                    });
                    let mut b = auto::Builder::new(TokioExecutor::new());
                    match proto {
                        Proto::Http2 => b = b.http2_only(),
                        Proto::Http1 => b = b.http1_only(),
                        Proto::Both => {}
                    }
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(tcp).await {
                                if proto == Proto::Both && s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                    // As nginx and Go servers do: the connection speaks the
                                    // protocol ALPN chose, nothing else (`serve_connection`:
                                    // the upgrade variant sniffs the preface whatever is set).
                                    let _ = b.http2_only().serve_connection(TokioIo::new(s), svc).await;
                                    return;
                                }
                                let _ = b.serve_connection_with_upgrades(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = b.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Running {
            addr,
            hits,
            conns,
            status: shared_status,
            task,
        }
    }
}

async fn respond(
    mut req: Request<Incoming>,
    name: &'static str,
    delay: Duration,
    status: Option<StatusCode>,
) -> Result<Response<Body>, std::convert::Infallible> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_string();
    let mut resp = if path == "/echo" {
        let h2 = req.version() == http::Version::HTTP_2;
        let declared = req.headers().get(http::header::TRAILER).cloned();
        // Stream frames back as they come; on HTTP/2 end with trailers like a gRPC server.
        let (tx, echo) = crate::channel_body();
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut trailers = HeaderMap::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => match f.into_data() {
                        Ok(d) => {
                            if tx.send(Ok(Frame::data(d))).await.is_err() {
                                return;
                            }
                        }
                        Err(f) => {
                            if let Ok(t) = f.into_trailers() {
                                trailers.extend(t);
                            }
                        }
                    },
                    Err(e) => {
                        let _ = tx.send(Err(Box::new(e))).await;
                        return;
                    }
                }
            }
            if h2 {
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
            }
            if !trailers.is_empty() {
                let _ = tx.send(Ok(Frame::trailers(trailers))).await;
            }
        });
        let mut resp = Response::new(echo);
        if let Some(t) = declared {
            resp.headers_mut().insert(http::header::TRAILER, t);
        }
        resp
    } else if path == "/headers" {
        let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        Response::new(full(out))
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        Response::new(full("late"))
    } else if path == "/ws" {
        let key = req.headers().get("sec-websocket-key").cloned();
        let Some(key) = key else {
            let mut r = Response::new(full("not a websocket request"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(r);
        };
        let on_up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_up.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut r = Response::new(crate::empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert("sec-websocket-accept", HeaderValue::from_str(&accept).unwrap());
        r
    } else {
        Response::new(full("ok"))
    };
    resp.headers_mut()
        .insert("x-upstream", HeaderValue::from_static(name));
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
    Ok(resp)
}

/// A raw TCP server on `127.0.0.1:0` that hands each accepted socket to `serve`, for peers
/// that misbehave in ways a real HTTP server will not; with the count of connections it
/// accepted.
pub async fn raw_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (addr, conns)
}
